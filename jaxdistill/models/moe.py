"""Mixture-of-experts routing and expert evaluation, as pure functions (the Flax module is `SparseMoE`).

Routing follows transformers' Qwen3-MoE and Mixtral: softmax of the router logits in float32, the
top-k experts per token, their probabilities optionally renormalised to sum to one. Experts are SwiGLU
MLPs whose kernels are stacked on a leading expert axis E. Tokens are flattened to T = B * L rows.

Two exact evaluations (no token is ever dropped, every shape is static, so both jit once):
- `chosen_expert_outputs`: the T * k (token, expert) pairs are sorted by expert, each expert's group
  padded to a whole number of row tiles, and one tile at a time multiplied by its expert's kernels
  (a grouped matmul in a `lax.map`). FLOPs: those of the k chosen experts plus at most E * (tile - 1)
  padding rows. This is the default.
- `all_expert_outputs`: every expert on every token, [T, E, D]: E / k times the expert FLOPs and a
  [T, E, I] intermediate. Used only where the per-expert outputs themselves are wanted.
"""

from typing import Callable

import jax
import jax.numpy as jnp

_MAX_TILE = 128  # rows per grouped-matmul step; larger tiles waste more padding per expert


def route(router_logits_TxE: jax.Array, top_k: int, renormalise: bool) -> tuple[jax.Array, jax.Array]:
  """(weights_TxK float32, experts_TxK int32): the top-k experts of each token and their mixing weights.

  weights = softmax(logits)[chosen], divided by their sum when `renormalise` (Mixtral always,
  Qwen3-MoE when `norm_topk_prob`). Exact ties go to the lower expert index (`lax.top_k`).
  """
  probs_TxE = jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)
  weights_TxK, experts_TxK = jax.lax.top_k(probs_TxE, top_k)
  if renormalise:
    weights_TxK = weights_TxK / jnp.sum(weights_TxK, axis=-1, keepdims=True)
  return weights_TxK, experts_TxK.astype(jnp.int32)


def swiglu(x_NxD, gate_DxI, up_DxI, down_IxD, act: Callable) -> jax.Array:
  """One expert: down(act(x @ gate) * (x @ up))."""
  return (act(x_NxD @ gate_DxI) * (x_NxD @ up_DxI)) @ down_IxD


def all_expert_outputs(x_TxD, gate_ExDxI, up_ExDxI, down_ExIxD, act: Callable) -> jax.Array:
  """Every expert's unweighted output for every token, [T, E, D] (dense: E / k times the FLOPs)."""
  h_TxExI = act(jnp.einsum("td,edi->tei", x_TxD, gate_ExDxI)) * jnp.einsum("td,edi->tei", x_TxD, up_ExDxI)
  return jnp.einsum("tei,eid->ted", h_TxExI, down_ExIxD)


def _tile_rows(assignments: int, num_experts: int) -> int:
  """A power of two near the mean group size, in [8, 128]: padding stays small and tiles stay matmul-sized."""
  mean = -(-assignments // num_experts)
  return min(_MAX_TILE, max(8, 1 << (mean - 1).bit_length()))


def chosen_expert_outputs(x_TxD, experts_TxK, gate_ExDxI, up_ExDxI, down_ExIxD, act: Callable,
                          tile: int | None = None) -> jax.Array:
  """The unweighted outputs [T, K, D] of each token's chosen experts, by sorting tokens by expert.

  Args:
    x_TxD: token inputs.
    experts_TxK: int expert index of each token's k choices (from `route`).
    gate_ExDxI, up_ExDxI, down_ExIxD: the stacked expert kernels.
    act: the gate activation.
    tile: rows per grouped-matmul step (default from the sizes: `_tile_rows`).
  """
  tokens, top_k = experts_TxK.shape
  num_experts = gate_ExDxI.shape[0]
  pairs = tokens * top_k
  tile = tile or _tile_rows(pairs, num_experts)
  expert_P = experts_TxK.reshape(pairs)
  order_P = jnp.argsort(expert_P, stable=True)        # pair p of the sorted list is pair order_P[p]
  sorted_expert_P = expert_P[order_P]
  size_E = jnp.bincount(expert_P, length=num_experts)
  padded_E = (size_E + tile - 1) // tile * tile
  padded_end_E = jnp.cumsum(padded_E)
  # Row of each sorted pair in the padded layout: its group's padded start plus its rank in the group.
  rank_P = jnp.arange(pairs) - (jnp.cumsum(size_E) - size_E)[sorted_expert_P]
  row_P = (padded_end_E - padded_E)[sorted_expert_P] + rank_P
  num_tiles = -(-(pairs + num_experts * (tile - 1)) // tile)  # static bound on the padded rows
  rows_RxD = jnp.zeros((num_tiles * tile, x_TxD.shape[1]), x_TxD.dtype).at[row_P].set(
      x_TxD[order_P // top_k], unique_indices=True)
  # Tiles past the last group are all padding; any expert index will do for them.
  tile_expert_N = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(num_tiles) * tile, side="right"),
                              num_experts - 1)

  def one_tile(args):
    x_tile, e = args
    return swiglu(x_tile, gate_ExDxI[e], up_ExDxI[e], down_ExIxD[e], act)

  y_NxSxD = jax.lax.map(one_tile, (rows_RxD.reshape(num_tiles, tile, -1), tile_expert_N))
  y_sorted_PxD = y_NxSxD.reshape(num_tiles * tile, -1)[row_P]
  y_PxD = jnp.zeros_like(y_sorted_PxD).at[order_P].set(y_sorted_PxD, unique_indices=True)
  return y_PxD.reshape(tokens, top_k, -1)


def mix(y_TxKxD: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """The MoE output: the chosen experts' outputs weighted by the router, [T, D]."""
  return jnp.einsum("tkd,tk->td", y_TxKxD, weights_TxK.astype(y_TxKxD.dtype))
