"""layerwise: hidden-state distillation over `distill.layer_map` (default uniform), mean over the pairs of

  nmse:   ||P(h_s) - h_t||^2 / ||h_t||^2      or      cosine: 1 - cos(P(h_s), h_t),

a masked token mean, P a learned projection to the teacher's width (a DistillHeads `layer_proj_i`).
Records keep the teacher states the map reads (`hidden` [L, M, D]).
"""

import jax
import jax.numpy as jnp

from jaxdistill.models import ModelConfig
from jaxdistill.objective import losses
from jaxdistill.objective.component import Component, Entry, Needs, RecordPart, Term, TermContext


def record_layers(obj) -> tuple[int, ...]:
  """The teacher hidden_states indices a record keeps: those `layer_map` reads, each once, in order."""
  return tuple(sorted({t for _, t in obj.layer_map}))


def _record(teacher_out, teacher_mask_BxL, obj) -> dict[str, jax.Array]:
  del teacher_mask_BxL
  return {"hidden": jnp.stack([teacher_out.hidden_states[t] for t in record_layers(obj)], axis=2)}


def _layout(obj, teacher: ModelConfig, seq_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  return {"hidden": (teacher.dtype, (seq_len, len(record_layers(obj)), teacher.hidden_size))}


def term(ctx: TermContext) -> Term:
  obj = ctx.obj
  if obj.teacher == "records":
    index = {t: i for i, t in enumerate(record_layers(obj))}
    targets = [ctx.record["hidden"][:, :, index[t]] for _, t in obj.layer_map]
  else:
    targets = [ctx.at_teacher(ctx.teacher_out.hidden_states[t]) for _, t in obj.layer_map]
  distance = obj.distill.hidden_distance

  def layerwise(projected, teacher_states, mask):
    return losses.layerwise_loss(projected, teacher_states, mask, distance)

  return layerwise, ([ctx.at_student(p) for p in ctx.heads_out["layerwise"]], targets, ctx.pairs_BxA)


COMPONENT = Component("layerwise", Entry("layerwise", (0.0, 0.0, 0.05)), term,
                      Needs(heads=True, teacher_states=True), records=True, record=RecordPart(_record, _layout))
