"""The trainable parts of the objective besides the student: layer projections, contrastive projection, router."""

import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models import ModelConfig
from jaxdistill.objective import router

if TYPE_CHECKING:  # spec.py imports the registry; the heads need only the type
  from jaxdistill.objective.spec import ResolvedObjective


class DistillHeads(nn.Module):
  """Layer projections (one per `layer_map` pair), the contrastive projection and the router."""
  cfg: "ResolvedObjective"  # static (hashable): layer_map and router.num_experts size the heads
  teacher_dim: int

  def setup(self):
    self.layer_proj = [nn.Dense(self.teacher_dim, name=f"layer_proj_{i}") for i in range(len(self.cfg.layer_map))]
    self.contrastive_proj = nn.Dense(self.teacher_dim)
    self.router = router.Router(self.cfg.router.num_experts, self.teacher_dim)

  def __call__(self, student_states, pooled_BxD):
    """student_states: hidden_states of the student. Returns every head's output."""
    projected = [proj(student_states[s].astype(jnp.float32))
                 for proj, (s, _) in zip(self.layer_proj, self.cfg.layer_map)]
    gate_logits, routed = self.router(student_states[-1])
    return {"layerwise": projected, "contrastive": self.contrastive_proj(pooled_BxD),
            "gate_logits": gate_logits, "routed": routed}


def init_heads(cfg, student: ModelConfig, teacher: ModelConfig | None, rng: jax.Array):
  """Random params of the DistillHeads; {} when no enabled component reads them."""
  if not cfg.needs_heads:
    return {}
  return _init_heads(cfg, student, teacher, rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_heads(cfg, student: ModelConfig, teacher: ModelConfig, rng: jax.Array):
  states = [jnp.zeros((1, 2, student.hidden_size), jnp.float32)] * (student.num_layers + 1)
  return DistillHeads(cfg, teacher.hidden_size).init(rng, states, jnp.zeros((1, student.hidden_size)))["params"]
