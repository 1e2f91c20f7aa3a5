"""contrastive: InfoNCE between the masked-mean-pooled student state (projected to the teacher's width)
and the teacher's, in-batch negatives, cosine similarities over `distill.contrastive_temperature`.

Records keep the teacher's pooled final state (`pooled` [D]).
"""

import jax
import jax.numpy as jnp

from jaxdistill.models import ModelConfig
from jaxdistill.objective import losses
from jaxdistill.objective.component import Component, Entry, Needs, RecordPart, Term, TermContext


def _record(teacher_out, teacher_mask_BxL, obj) -> dict[str, jax.Array]:
  del obj
  return {"pooled": losses.masked_mean_pool(teacher_out.hidden_states[-1], teacher_mask_BxL)}


def _layout(obj, teacher: ModelConfig, seq_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  del obj, seq_len
  return {"pooled": ("float32", (teacher.hidden_size,))}


def term(ctx: TermContext) -> Term:
  if ctx.obj.teacher == "records":
    teacher_pooled_BxD = ctx.record["pooled"]
  else:
    teacher_pooled_BxD = losses.masked_mean_pool(ctx.teacher_out.hidden_states[-1],
                                                 ctx.batch["teacher_attention_mask"])
  temperature = ctx.obj.distill.contrastive_temperature

  def contrastive(student_BxD, teacher_BxD, valid_B):
    return losses.contrastive_loss(student_BxD, teacher_BxD, temperature=temperature, valid_B=valid_B)

  return contrastive, (ctx.heads_out["contrastive"], teacher_pooled_BxD, jnp.any(ctx.mask_BxL > 0, axis=1))


COMPONENT = Component("contrastive", Entry("contrastive", (0.0, 0.0, 0.05)), term,
                      Needs(heads=True, teacher_states=True), records=True, record=RecordPart(_record, _layout))
