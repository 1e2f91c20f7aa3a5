"""total_variation: the total variation distance between the teacher's and the student's next-token
distributions at the curriculum's kd temperature, a masked token mean:

  TVD(p, q) = 1/2 sum_v |p_v - q_v|,   p = softmax(z_t / T) (teacher, no gradient), q = softmax(z_s / T),

over the ids both vocabularies cover (kd's cut), loss = sum_tokens(mask * TVD) / sum(mask).

Why: unlike KL it is symmetric and bounded in [0, 1], so a token the student gives almost no mass
cannot blow it up, and it weighs every token by its probability mass rather than by log-ratios. It
is not T^2-scaled: the distance stays in [0, 1] at every temperature. Computed in float32 (float64
inputs stay float64), over chunks of `distill.chunk_size` tokens as kd is, so neither model's full
[B, L, V] probabilities exist at once.

Off by default (weight 0 in every phase; `curriculum.total_variation` turns it on). Records cannot
serve it (they keep the teacher's top-k probabilities and the tail's total mass, not each tail token's),
nor can two tokenizers (it compares two distributions over one vocabulary).

References:
  Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation, ACL 2023 (TVD among
  the f-divergences for distillation).
"""

import jax
import jax.numpy as jnp

from jaxdistill.objective import losses
from jaxdistill.objective.component import Component, Entry, Needs, Term, TermContext


def total_variation_loss(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, mask_BxL: jax.Array, *,
                         temperature: jax.Array | float, chunk_size: int | None = None) -> jax.Array:
  """Masked token mean of 1/2 sum_v |softmax(z_t / T)_v - softmax(z_s / T)_v|; no gradient into the teacher.

  Args:
    student_logits_BxLxV, teacher_logits_BxLxV: logits over the same vocabulary (any float dtype).
    mask_BxL: which tokens count.
    temperature: T > 0 (a traced scalar is fine: the curriculum schedules it).
    chunk_size: tokens per chunk (`losses.token_chunks`); None or 0 computes all tokens at once.
  """
  dtype = jnp.promote_types(student_logits_BxLxV.dtype, jnp.float32)
  temperature = jnp.asarray(temperature, dtype)

  def per_token(student_NxV, teacher_NxV):
    q_NxV = jax.nn.softmax(student_NxV.astype(dtype) / temperature, axis=-1)
    p_NxV = jax.nn.softmax(jax.lax.stop_gradient(teacher_NxV).astype(dtype) / temperature, axis=-1)
    return 0.5 * jnp.sum(jnp.abs(p_NxV - q_NxV), axis=-1)

  per_token_BxL = losses.token_chunks(per_token, (student_logits_BxLxV, teacher_logits_BxLxV), chunk_size)
  return losses.masked_mean(per_token_BxL, mask_BxL)


def term(ctx: TermContext) -> Term:
  vocab, chunk_size = ctx.shared_vocab, ctx.obj.distill.chunk_size

  def total_variation(student_logits, teacher_logits, mask, temperature):
    return total_variation_loss(student_logits[..., :vocab], teacher_logits[..., :vocab], mask,
                                temperature=temperature, chunk_size=chunk_size)

  return total_variation, (ctx.student_out.logits_BxLxV, ctx.teacher_out.logits_BxLxV, ctx.mask_BxL,
                           ctx.kd_temperature)


COMPONENT = Component("total_variation", Entry("total_variation", (0.0, 0.0, 0.0)), term, Needs(teacher=True),
                      records=False, two_tokenizers=False)
