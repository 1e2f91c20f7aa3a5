"""Logit distillation between two vocabularies, on positions where both models have read the same text.

The student's distribution q (over V_s) and the teacher's p (over V_t) at one aligned position
predict the same continuation of the same text, in different tokens. The vocabularies share a set
M of tokens that stand for identical bytes (`data.alignment.vocab_mapping`: teacher id j <-> student
id sigma(j)); the rest, U_t and U_s, have no counterpart. The loss is KL's chain rule over the
partition {M, U}, with the unmatched part compared vocabulary-free:

  kd_x = T^2 [ sum_{j in M} p_j log(p_j / q_sigma(j))          exact KL on the shared tokens
               + u_p log(u_p / u_q)                            the unmatched mass, as one outcome
               + u_p * ULD(p|U_t, q|U_s) ]                     the unmatched tails, vocabulary-free

with u_p = sum_{U_t} p, u_q = sum_{U_s} q (so the first two terms are KL over the matched tokens
plus one "other" outcome), and ULD the Universal Logit Distillation distance: the L1 distance
between the two conditional tail distributions, each sorted in decreasing order (compared rank by
rank, over their `uld_top_k` largest probabilities). With identical vocabularies U is empty,
u_p = 0, and kd_x is exactly the forward KL of `losses.kd_loss`.

References:
  Boizard et al., Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
  LLMs, 2024 (the sorted-probability distance).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.losses import masked_mean, token_chunks

_EPS = 1e-12


@flax.struct.dataclass
class VocabMap:
  """The tokens two vocabularies share (identical bytes), as arrays the jitted step takes."""
  teacher_ids_M: jax.Array          # int32 teacher ids of the shared tokens
  student_ids_M: jax.Array          # int32 student ids, pairwise with teacher_ids_M
  student_to_teacher_Vs: jax.Array  # int32 teacher id of every student id, -1 when it has none

  @classmethod
  def from_pairs(cls, teacher_ids_M, student_ids_M, student_vocab: int) -> "VocabMap":
    teacher_ids_M, student_ids_M = np.asarray(teacher_ids_M, np.int32), np.asarray(student_ids_M, np.int32)
    student_to_teacher_Vs = np.full((student_vocab,), -1, np.int32)
    student_to_teacher_Vs[student_ids_M] = teacher_ids_M
    return cls(jnp.asarray(teacher_ids_M), jnp.asarray(student_ids_M), jnp.asarray(student_to_teacher_Vs))


def gather_positions(x_BxLx: jax.Array, positions_BxA: jax.Array) -> jax.Array:
  """x[b, positions[b, a], ...] -> [B, A, ...]: one model's values at its aligned positions."""
  index = positions_BxA.reshape(positions_BxA.shape + (1,) * (x_BxLx.ndim - 2))
  return jnp.take_along_axis(x_BxLx, index.astype(jnp.int32), axis=1)


def _unmatched(vocab: int, matched_ids_M: jax.Array) -> jax.Array:
  return jnp.ones((vocab,), bool).at[matched_ids_M].set(False)


def _sorted_tail(probs_NxV: jax.Array, unmatched_V: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """(the unmatched probabilities renormalised, largest first, top_k of them; their total mass u)."""
  tail_NxV = jnp.where(unmatched_V[None, :], probs_NxV, 0.0)
  mass_N = jnp.sum(tail_NxV, axis=-1)
  top_NxK, _ = jax.lax.top_k(tail_NxV, top_k)
  return top_NxK / jnp.maximum(mass_N, _EPS)[:, None], mass_N


def cross_vocab_kd_loss(student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
                        teacher_ids_M: jax.Array, student_ids_M: jax.Array, *, temperature: jax.Array | float,
                        uld_top_k: int = 128, chunk_size: int | None = None) -> jax.Array:
  """The module docstring's kd_x as a masked mean over aligned positions.

  Args:
    student_logits_BxAxVs, teacher_logits_BxAxVt: each model's logits at its aligned positions
      (`gather_positions`); computed in float32 chunk by chunk.
    mask_BxA: which aligned pairs count.
    teacher_ids_M, student_ids_M: int32 ids of the shared tokens, pairwise (one to one).
    temperature: T > 0, traced or not.
    uld_top_k: ranks compared by the ULD term (clipped to the smaller vocabulary).
    chunk_size: aligned positions per float32 chunk; None: all at once.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  vocab_s, vocab_t = student_logits_BxAxVs.shape[-1], teacher_logits_BxAxVt.shape[-1]
  unmatched_s, unmatched_t = _unmatched(vocab_s, student_ids_M), _unmatched(vocab_t, teacher_ids_M)
  top_k = min(uld_top_k, vocab_s, vocab_t)

  def per_position(student_NxVs, teacher_NxVt):
    log_q = jax.nn.log_softmax(student_NxVs.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_NxVt).astype(jnp.float32) / temperature, axis=-1)
    log_p_M, log_q_M = log_p[:, teacher_ids_M], log_q[:, student_ids_M]
    p_M = jnp.exp(log_p_M)
    exact_N = jnp.sum(jnp.where(p_M > 0, p_M * (log_p_M - log_q_M), 0.0), axis=-1)
    tail_p, mass_p = _sorted_tail(jnp.exp(log_p), unmatched_t, top_k)
    tail_q, mass_q = _sorted_tail(jnp.exp(log_q), unmatched_s, top_k)
    other_N = jnp.where(mass_p > 0, mass_p * (jnp.log(jnp.maximum(mass_p, _EPS)) - jnp.log(jnp.maximum(mass_q, _EPS))),
                        0.0)
    uld_N = jnp.sum(jnp.abs(tail_p - tail_q), axis=-1)
    return exact_N + other_N + mass_p * uld_N

  per_position_BxA = token_chunks(per_position, (student_logits_BxAxVs, teacher_logits_BxAxVt), chunk_size)
  return temperature ** 2 * masked_mean(per_position_BxA, mask_BxA)


def aligned_attention(maps_BxHxLxL: jax.Array, positions_BxA: jax.Array, mask_BxA: jax.Array) -> jax.Array:
  """One model's attention among its aligned positions: rows and columns gathered, rows renormalised.

  Row a of the result is query `positions[a]` attending over the keys `positions[0..A)`, restricted
  to real pairs (mask 1) and renormalised to sum to 1, so two models' maps over the same aligned
  text are comparable distributions ([B, H, A, A]).
  """
  index_Bx1xAx1 = positions_BxA.astype(jnp.int32)[:, None, :, None]
  rows_BxHxAxL = jnp.take_along_axis(maps_BxHxLxL, index_Bx1xAx1, axis=2)
  sub_BxHxAxA = jnp.take_along_axis(rows_BxHxAxL, jnp.swapaxes(index_Bx1xAx1, 2, 3), axis=3).astype(jnp.float32)
  sub_BxHxAxA = jnp.where(mask_BxA.astype(bool)[:, None, None, :], sub_BxHxAxA, 0.0)
  return sub_BxHxAxA / jnp.maximum(jnp.sum(sub_BxHxAxA, axis=-1, keepdims=True), _EPS)


def top1_agreement(student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
                   student_to_teacher_Vs: jax.Array) -> jax.Array:
  """Share of real aligned pairs where the student's top token is the teacher's top token (by bytes).

  `student_to_teacher_Vs` maps each student id to its teacher id, or -1 when it has none.
  """
  mapped_BxA = student_to_teacher_Vs[jnp.argmax(student_logits_BxAxVs, -1)]
  agree_BxA = (mapped_BxA == jnp.argmax(teacher_logits_BxAxVt, -1)).astype(jnp.float32)
  return masked_mean(agree_BxA, mask_BxA)
