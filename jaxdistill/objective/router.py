"""Student-aware router over E teacher "experts" and its three losses.

The router reads a student hidden state and produces, per token, a gate over E teacher experts:
the routed experts of one block of a mixture-of-experts teacher (every expert's output on every
token, not only the ones the teacher chose), otherwise the outputs of E evenly spaced teacher blocks. Because the gate is computed from the *student's* state and trained with the
student, it learns which teacher representation this student can use at each token. Its top-k
grows and its gate temperature anneals with training progress (step-indexed schedules).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.objective import attention_maps, losses

EXPERT_SOURCES = ("auto", "moe", "blocks")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  experts: str = "auto"            # moe: the routed experts of a mixture-of-experts teacher's block; blocks: E
                                   # evenly spaced teacher blocks; auto: moe for an MoE teacher, else blocks
  moe_layer: int = -1              # the teacher block whose experts are routed (moe); -1: its last sparse block
  num_experts: int = 4             # E with blocks (with moe: the teacher's expert count)
  top_k_start: int = 1             # experts mixed per token at the start of training...
  top_k_end: int = 2               # ...and at the end (linear in progress, rounded)
  temperature_start: float = 2.0   # gate softmax temperature at the start...
  temperature_end: float = 0.5     # ...annealed linearly to this
  load_balance_coef: float = 0.1   # routing_load_balance weight = feature weight * this
  attention_alignment_coef: float = 0.5  # routing_attention_alignment weight = feature weight * this


def expert_layers(teacher_layers: int, num_experts: int) -> tuple[int, ...]:
  """E evenly spaced teacher blocks, as indices into `hidden_states` (1..Nt); the last is the top block.

  With more experts than blocks some blocks repeat; index 0 (the embeddings) is never used.
  """
  return tuple(max(1, round((e + 1) * teacher_layers / num_experts)) for e in range(num_experts))


def schedule(progress: jax.Array, cfg: RouterConfig) -> tuple[jax.Array, jax.Array]:
  """(top_k int32, temperature float32) at training progress in [0, 1]."""
  progress = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  top_k = jnp.round(cfg.top_k_start + (cfg.top_k_end - cfg.top_k_start) * progress).astype(jnp.int32)
  temperature = cfg.temperature_start + (cfg.temperature_end - cfg.temperature_start) * progress
  return jnp.clip(top_k, 1, cfg.num_experts), temperature


class Router(nn.Module):
  """Gate logits over experts and the student state projected to the teacher's width."""
  num_experts: int
  teacher_dim: int

  @nn.compact
  def __call__(self, student_BxLxD):
    x = student_BxLxD.astype(jnp.float32)
    gate_logits_BxLxE = nn.Dense(self.num_experts, name="gate")(x)
    projected_BxLxDt = nn.Dense(self.teacher_dim, name="proj")(x)
    return gate_logits_BxLxE, projected_BxLxDt


def gates(gate_logits_BxLxE: jax.Array, top_k: jax.Array, temperature: jax.Array) -> jax.Array:
  """Softmax(logits / temperature) over each token's `top_k` largest logits; 0 for the others.

  `top_k` may be traced: the k largest are found by rank, not by `lax.top_k`.
  """
  scaled = gate_logits_BxLxE / temperature
  rank = jnp.argsort(jnp.argsort(-scaled, axis=-1), axis=-1)
  return jax.nn.softmax(jnp.where(rank < top_k, scaled, -jnp.inf), axis=-1)


def normalized_experts(expert_states_ExBxLxD) -> jax.Array:
  """Each expert state ([E, B, L, D], or E states [B, L, D]) divided by its per-token RMS, so experts of
  any scale weigh the same."""
  x = jax.lax.stop_gradient(jnp.stack(list(expert_states_ExBxLxD))).astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def feature_loss(projected_BxLxD, gates_BxLxE, experts_ExBxLxD, mask_BxL) -> jax.Array:
  """routing_feature: mean_d (P(h_s) - sum_e g_e * t_e / rms(t_e))^2, masked token mean.

  The target is a gate-weighted mix of RMS-normalised teacher expert states (RMS <= 1), so the
  loss is 1 or less for a zero projection, whatever the teacher's activation scale. Gradients
  reach both the projection and the gate.
  """
  target_BxLxD = jnp.einsum("ble,ebld->bld", gates_BxLxE, experts_ExBxLxD)
  per_token = jnp.mean(jnp.square(projected_BxLxD.astype(jnp.float32) - target_BxLxD), axis=-1)
  return losses.masked_mean(per_token, mask_BxL)


def load_balance_loss(gate_logits_BxLxE, gates_BxLxE, temperature, mask_BxL) -> jax.Array:
  """routing_load_balance (Switch Transformer): E * sum_e f_e * P_e.

  f_e: share of the (token, chosen expert) assignments that went to e (no gradient);
  P_e: mean over tokens of softmax(logits / temperature)_e. Equals 1 under perfectly uniform use,
  and grows as routing concentrates (f ~ P gives E * sum_e P_e^2 >= 1).

  References:
    Fedus et al., Switch Transformers, 2021.
  """
  mask = mask_BxL.astype(jnp.float32)[..., None]
  chosen_BxLxE = (gates_BxLxE > 0).astype(jnp.float32) * mask
  share_E = jax.lax.stop_gradient(jnp.sum(chosen_BxLxE, (0, 1)) / jnp.maximum(jnp.sum(chosen_BxLxE), 1.0))
  probs_BxLxE = jax.nn.softmax(gate_logits_BxLxE / temperature, axis=-1) * mask
  mean_prob_E = jnp.sum(probs_BxLxE, (0, 1)) / jnp.maximum(jnp.sum(mask), 1.0)
  return gate_logits_BxLxE.shape[-1] * jnp.sum(share_E * mean_prob_E)


def attention_alignment_loss(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL) -> jax.Array:
  """routing_attention_alignment: KL(routed teacher attention || student attention), per query.

  For each query token the target row is the gate-weighted mix of the experts' head-averaged
  attention rows, sum_e g_e(query) * A_e[query, :]. A convex mix of distributions is a
  distribution, and the gates sum to 1, so the target can neither vanish nor be scaled down: the
  loss is 0 only when the student's head-averaged attention equals a mix of real teacher attention
  patterns. The gate gradient moves each token toward the experts whose attention the student can
  follow. The routed experts of one MoE block share that block's attention: one map, the target.
  The definition on whole maps; training uses `attention_alignment_blockwise` (equal values and gradients).
  """
  return losses.masked_mean(_alignment_kl(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL), mask_BxL)


def _alignment_kl(student_BxHxQxK, expert_rows, gates_BxQxE, key_mask_BxK) -> jax.Array:
  """Per query [B, Q]: KL(gate mix of the experts' head-averaged rows || student's head-averaged row)."""
  expert_ExBxQxK = jax.lax.stop_gradient(jnp.stack([m.astype(jnp.float32).mean(axis=1) for m in expert_rows]))
  if len(expert_rows) == 1:  # the experts of one MoE block share its attention: the mix is that map
    target_BxQxK = jnp.sum(gates_BxQxE, axis=-1)[..., None] * expert_ExBxQxK[0]
  else:
    target_BxQxK = jnp.einsum("bqe,ebqk->bqk", gates_BxQxE, expert_ExBxQxK)
  student_Bx1xQxK = student_BxHxQxK.astype(jnp.float32).mean(axis=1, keepdims=True)
  return losses.rows_kl(target_BxQxK[:, None], student_Bx1xQxK, key_mask_BxK)  # the target keeps its gradient


def attention_alignment_blockwise(student_view: attention_maps.MapView, expert_views, gates_BxQxE, mask_BxQ,
                                  block: int) -> jax.Array:
  """`attention_alignment_loss` from q and k (`attention_maps`), a block of queries at a time."""
  def block_kl(view_rows, gates_block):
    return _alignment_kl(view_rows[0], view_rows[1:], gates_block, mask_BxQ)

  per_query = attention_maps.per_query(block_kl, (student_view, *expert_views), (gates_BxQxE,), block)
  return losses.masked_mean(per_query, mask_BxQ)
