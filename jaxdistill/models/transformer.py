"""Flax causal LM of all the families (models/families/): they differ only in ModelConfig's capabilities.

One module, configured by `ModelConfig`; `forward` is the pure entry point
(params pytree in, arrays out). Blocks of one kind are stored stacked (`ModelConfig.stacks`: each
leaf has a leading layer axis) and run as one `lax.scan` per run of consecutive blocks, so compile
time does not grow with depth; the remat policy applies to the scanned block. Windowed and global
layers share a stack: each layer's window rides along the scan. Attention goes through
`attention.attend` (cuDNN flash attention, or query blocks under remat): no layer keeps a B*H*L*L map.
Per-layer outputs are returned only when asked for: hidden states (the scan's outputs), router logits,
and for the static tuples `qk_layers` / `attention_layers` / `expert_layers` each such layer's q and k
(from which the attention losses recompute map rows block by block), its full map (inspection), or
its per-expert outputs, written into slots of buffers the scan carries.
`forward_cached` runs new tokens on top of a `KVCache` (prefill, then one token per decode step): the
scan carries the cache too, each layer writing its keys and values into its slot and attending to it.
"""

import dataclasses
import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models import attention, moe
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.rope import apply_rope, inverse_frequencies
from jaxdistill.parallel import constrain_batch

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@flax.struct.dataclass
class LMOutput:
  """What `forward` returns.

  logits_BxLxV: next-token logits in the compute dtype (None when `compute_logits=False`).
  final_hidden_BxLxD: the final-normed hidden state that the LM head reads.
  hidden_states: `num_layers + 1` arrays [B, L, D] in the transformers convention: the embeddings,
    the output of each block, and for the last entry the final-normed output (None unless requested).
  attentions: attention probabilities [B, H, L, L] in float32, one per entry of `attention_layers`
    (formed whole from that layer's q and k: for inspection and parity, not for losses).
  router_logits: router logits [B, L, E] in float32, one per sparse (MoE) layer in layer order, when
    `output_router_logits`; () otherwise and for dense models.
  expert_outputs: every expert's unweighted output [B, L, E, D] in the compute dtype, one per entry of
    `expert_layers` (sparse layers of MoE models only; () for dense models).
  queries_keys: one `attention.QueriesKeys` per entry of `qk_layers`.
  """
  logits_BxLxV: jax.Array | None
  final_hidden_BxLxD: jax.Array
  hidden_states: tuple[jax.Array, ...] | None
  attentions: tuple[jax.Array, ...]
  router_logits: tuple[jax.Array, ...] = ()
  expert_outputs: tuple[jax.Array, ...] = ()
  queries_keys: tuple[attention.QueriesKeys, ...] = ()


@flax.struct.dataclass
class KVCache:
  """Every layer's keys and values of the tokens run so far, in a buffer of T columns (`forward_cached`).

  k_BxLxTxGxK, v_BxLxTxGxK: keys (after RoPE and k norm) and values of the L layers (all stacks, by layer
    index), G key/value heads (never expanded to the query heads), in the compute dtype: 2 x B x L x T x G x K
    numbers. Columns at `index` and beyond are not written yet.
  mask_BxT: 1 for real tokens, 0 for (left) padding and for columns not written yet.
  index: int32 scalar, the columns written so far; the next token goes to column `index`, in every row.
  """
  k_BxLxTxGxK: jax.Array
  v_BxLxTxGxK: jax.Array
  mask_BxT: jax.Array
  index: jax.Array


def _init(cfg: ModelConfig):
  del cfg
  return nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
  """RMSNorm or LayerNorm computed in float32 and cast back, as transformers does.

  With `norm_unit_offset` the RMSNorm weight w stores the scale's offset from 1 and the product with
  (1 + w) is taken in float32 before the cast (transformers' Gemma order; Llama casts first).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
      init = nn.initializers.zeros if cfg.norm_unit_offset else nn.initializers.ones
      scale = self.param("scale", init, (features,), cfg.param_dtype)
      normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
      if cfg.norm_unit_offset:
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(cfg.dtype)
      return scale.astype(cfg.dtype) * normed.astype(cfg.dtype)
    scale = self.param("scale", nn.initializers.ones, (features,), cfg.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), cfg.param_dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.dtype)


def _dense(cfg: ModelConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=_init(cfg), name=name)


class Attention(nn.Module):
  """Grouped-query attention; returns the output, the layer's queries and keys (after RoPE and norms) and the cache.

  `window` is the layer's sliding window (0: none): a python int, or traced in a scan over a stack that
  mixes windowed and full layers; it also picks the windowed layers' RoPE (`local_rope`). With a `cache`
  the keys and values go into its slot `layer` and the queries attend to all of that slot
  (`_attend_cached`; `mask_BxL` is then unused); without one the cache returned is None.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxL, layer, right_padded: bool, window: int | jax.Array = 0,
               cache: KVCache | None = None):
    cfg = self.cfg
    batch, length, _ = x_BxLxD.shape
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _dense(cfg, heads * head_dim, cfg.qkv_bias, "q")(x_BxLxD).reshape(batch, length, heads, head_dim)
    k = _dense(cfg, kv_heads * head_dim, cfg.qkv_bias, "k")(x_BxLxD).reshape(batch, length, kv_heads, head_dim)
    v = _dense(cfg, kv_heads * head_dim, cfg.qkv_bias, "v")(x_BxLxD).reshape(batch, length, kv_heads, head_dim)
    if cfg.qk_norm:
      q = Norm(cfg, name="q_norm")(q)
      k = Norm(cfg, name="k_norm")(k)
    if cfg.rope is not None:
      inv_freq = _inverse_frequencies(cfg, window)
      q = apply_rope(q, positions_BxL, inv_freq)
      k = apply_rope(k, positions_BxL, inv_freq)
    if cache is None:
      out_BxLxNxK = attention.attend(
          q, k, v, mask_BxL, head_scale=cfg.attention_scale, layer_factor=_layer_factor(cfg, layer),
          implementation=attention.resolve_implementation(cfg.attention, cfg.dtype, head_dim, cfg.attn_logit_softcap),
          block=cfg.attention_block, right_padded=right_padded, window=window, windows=(cfg.sliding_window, 0),
          softcap=cfg.attn_logit_softcap)
    else:
      out_BxLxNxK, cache = _attend_cached(cfg, q, k, v, cache, layer, window)
    out_BxLxD = _dense(cfg, cfg.hidden_size, cfg.o_bias, "o")(out_BxLxNxK.reshape(batch, length, heads * head_dim))
    return out_BxLxD, q, k, cache


def _attend_cached(cfg: ModelConfig, q_BxSxNxK, k_BxSxGxK, v_BxSxGxK, cache: KVCache, layer, window):
  """Writes S new tokens' keys and values into slot `layer` of `cache` at columns index.., then attends to all T.

  The queries sit at columns index + arange(S): causality by column hides the unwritten ones, the cache's
  mask the padding. Always the blockwise arithmetic (the fused kernels take no cache), a block of
  `cfg.attention_block` queries at a time, so a long prefill never holds more than a block's rows.
  Returns (out_BxSxNxK, the cache with the new keys and values).
  """
  batch, new = q_BxSxNxK.shape[:2]
  start = (0, layer, cache.index, 0, 0)
  k_cache = jax.lax.dynamic_update_slice(cache.k_BxLxTxGxK, k_BxSxGxK[:, None], start)
  v_cache = jax.lax.dynamic_update_slice(cache.v_BxLxTxGxK, v_BxSxGxK[:, None], start)
  factor = _layer_factor(cfg, layer)
  out_BxSxNxK = attention.attend_to_keys(
      q_BxSxNxK, jax.lax.dynamic_index_in_dim(k_cache, layer, 1, keepdims=False),
      jax.lax.dynamic_index_in_dim(v_cache, layer, 1, keepdims=False),
      jnp.broadcast_to(cache.index + jnp.arange(new), (batch, new)), cache.mask_BxT,
      cfg.attention_scale if factor is None else cfg.attention_scale * factor, block=cfg.attention_block,
      window=window, softcap=cfg.attn_logit_softcap)
  return out_BxSxNxK, cache.replace(k_BxLxTxGxK=k_cache, v_BxLxTxGxK=v_cache)


def _inverse_frequencies(cfg: ModelConfig, window):
  """The RoPE frequencies of a layer with sliding window `window` (traced in a mixed scan: both, then one picked)."""
  inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
  if cfg.local_rope is None:
    return inv_freq
  local = inverse_frequencies(cfg.local_rope, cfg.head_dim)
  if isinstance(window, int):
    return local if window else inv_freq
  return jnp.where(window > 0, local, inv_freq)


def _layer_factor(cfg: ModelConfig, layer):
  """GPT-2's `scale_attn_by_inverse_layer_idx`: 1 / (layer + 1) (layer may be traced); None otherwise."""
  if not cfg.scale_attn_by_inverse_layer_idx:
    return None
  return 1.0 / (jnp.asarray(layer, jnp.float32) + 1.0)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    act = _ACTIVATIONS[cfg.activation]
    if cfg.gated_mlp:
      gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate")(x_BxLxD)
      up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up")(x_BxLxD)
      return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down")(act(gate) * up)
    hidden = act(_dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "fc")(x_BxLxD))
    return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "proj")(hidden)


class SparseMoE(nn.Module):
  """Routed SwiGLU experts in place of the dense MLP (Qwen3-MoE, Mixtral).

  Router (no bias) -> float32 softmax -> top-k (renormalised when `norm_topk_prob`) -> the weighted sum
  of the chosen experts, evaluated sparsely by sorting tokens by expert (`moe.chosen_expert_outputs`).
  `capture` = (buffer [S, B, L, E, D], slot): when slot >= 0 (it may be traced), every expert runs on every
  token instead (E / k times the expert FLOPs), the layer output is mixed from those same outputs, and
  they are written to buffer[slot]; slot -1 leaves the buffer as it is.
  Returns (out_BxLxD, router_logits_BxLxE float32, the buffer or None).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, capture=None):
    cfg = self.cfg
    batch, length, hidden = x_BxLxD.shape
    experts, width = cfg.num_experts, cfg.moe_intermediate_size
    # Logits in the compute dtype, as transformers computes them, then float32 for the softmax.
    logits_BxLxE = _dense(cfg, experts, False, "router")(x_BxLxD).astype(jnp.float32)
    weights_TxK, chosen_TxK = moe.route(logits_BxLxE.reshape(-1, experts), cfg.num_experts_per_tok,
                                        cfg.norm_topk_prob)
    gate_ExDxI, up_ExDxI, down_ExIxD = (
        jnp.asarray(self.param(name, _init(cfg), shape, cfg.param_dtype), cfg.dtype)
        for name, shape in (("gate", (experts, hidden, width)), ("up", (experts, hidden, width)),
                            ("down", (experts, width, hidden))))
    act = _ACTIVATIONS[cfg.activation]
    x_TxD = x_BxLxD.reshape(-1, hidden)

    def chosen(buffer):
      return moe.chosen_expert_outputs(x_TxD, chosen_TxK, gate_ExDxI, up_ExDxI, down_ExIxD, act), buffer

    def every_expert(buffer):
      y_TxExD = moe.all_expert_outputs(x_TxD, gate_ExDxI, up_ExDxI, down_ExIxD, act)
      y_BxLxExD = y_TxExD.reshape(batch, length, experts, hidden).astype(buffer.dtype)
      return (jnp.take_along_axis(y_TxExD, chosen_TxK[..., None], axis=1),
              jax.lax.dynamic_update_index_in_dim(buffer, y_BxLxExD, slot, 0))

    if capture is None:
      y_TxKxD, buffer = chosen(None)
    else:
      buffer, slot = capture
      if isinstance(slot, int):  # unrolled layers: the choice is static
        y_TxKxD, buffer = every_expert(buffer) if slot >= 0 else chosen(buffer)
      else:
        y_TxKxD, buffer = jax.lax.cond(slot >= 0, every_expert, chosen, buffer)
    out_BxLxD = moe.mix(y_TxKxD, weights_TxK).reshape(batch, length, hidden)
    return out_BxLxD, logits_BxLxE, buffer


class Block(nn.Module):
  """Pre-norm attention and MLP (or routed experts) with residuals; with `post_norms` each sublayer's
  output is normed too before its residual add.

  Returns (x_BxLxD, the layer's q and k, router logits or None, the expert-capture buffer or None, the
  KV cache with this layer's keys and values written, or None without one).
  """
  cfg: ModelConfig
  sparse: bool = False  # routed experts instead of the dense MLP

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxL, layer, right_padded: bool = False, capture=None,
               window: int | jax.Array = 0, cache: KVCache | None = None):
    cfg = self.cfg
    attn_out, q, k, cache = Attention(cfg, name="attn")(
        Norm(cfg, name="attn_norm")(x_BxLxD), positions_BxL, mask_BxL, layer, right_padded, window, cache)
    if cfg.post_norms:
      attn_out = Norm(cfg, name="attn_post_norm")(attn_out)
    x_BxLxD = x_BxLxD + attn_out
    normed_BxLxD = Norm(cfg, name="mlp_norm")(x_BxLxD)
    if self.sparse:
      mlp_out, router_logits, buffer = SparseMoE(cfg, name="mlp")(normed_BxLxD, capture)
    else:
      mlp_out, router_logits, buffer = MLP(cfg, name="mlp")(normed_BxLxD), None, capture and capture[0]
    if cfg.post_norms:
      mlp_out = Norm(cfg, name="mlp_post_norm")(mlp_out)
    return x_BxLxD + mlp_out, q, k, router_logits, buffer, cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack_init(cfg: ModelConfig, sparse: bool, count: int):
  """Initialiser of one stack: `count` independently initialised blocks, each leaf stacked on axis 0."""
  cfg = dataclasses.replace(cfg, attention="blockwise")  # the weights do not depend on the kernel

  def init(rng):
    x_BxLxD = jnp.zeros((1, 2, cfg.hidden_size), cfg.dtype)
    ones_BxL = jnp.ones((1, 2), jnp.int32)
    def one(key):
      return Block(cfg, sparse, parent=None).init(key, x_BxLxD, default_positions(ones_BxL), ones_BxL, 0)["params"]
    return jax.vmap(one)(jax.random.split(rng, count))
  return init


@flax.struct.dataclass
class _Carry:
  """What flows from block to block: the residual stream, the buffers the requested outputs go to, the KV cache."""
  x_BxLxD: jax.Array
  q_buffer: jax.Array | None        # [S + 1, B, L, N, K]: slot s holds qk_layers[s]; the last is scratch
  k_buffer: jax.Array | None        # [S + 1, B, L, G, K]
  expert_buffer: jax.Array | None   # [X, B, L, E, D]: slot x holds expert_layers[x]
  cache: KVCache | None = None      # each layer writes its keys and values into its slot (`forward_cached`)


def _runs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
  """The layers split into runs of consecutive blocks of one stack: (stack name, layers)."""
  runs: list[tuple[str, list[int]]] = []
  for layer in range(cfg.num_layers):
    stack = cfg.stack_of(layer)[0]
    if runs and runs[-1][0] == stack:
      runs[-1][1].append(layer)
    else:
      runs.append((stack, [layer]))
  return [(stack, tuple(layers)) for stack, layers in runs]


def _run_blocks(cfg: ModelConfig, stack_params, stack: str, layers: tuple[int, ...], carry: _Carry, positions_BxL,
                mask_BxL, qk_slots: dict[int, int], expert_slots: dict[int, int], right_padded: bool,
                output_hidden_states: bool, output_router_logits: bool):
  """Blocks `layers` (consecutive, one stack) on `carry`: one lax.scan, or unrolled without `cfg.scan_layers`.

  Returns (carry, (hidden states [n, B, L, D] of each layer, or None unless `output_hidden_states`;
  router logits [n, B, L, E], or None unless `output_router_logits` on a sparse stack)).
  """
  block = Block(cfg, sparse=stack == "moe_blocks", parent=None)  # unbound: applied to explicit params
  first = cfg.stack_of(layers[0])[1]
  if (first, len(layers)) != (0, len(cfg.stacks[stack])):
    stack_params = jax.tree.map(lambda p: p[first:first + len(layers)], stack_params)
  scratch = len(qk_slots)
  windows = [cfg.window_of(layer) for layer in layers]
  # Windowed and full layers in one scan: each layer's window rides along as a traced int; otherwise it is static.
  traced_window = cfg.scan_layers and len(set(windows)) > 1

  def apply_block(params, x_BxLxD, layer, capture, window, cache):
    return block.apply({"params": params}, x_BxLxD, positions_BxL, mask_BxL, layer, right_padded, capture, window,
                       cache)

  if cfg.remat != "none" and carry.cache is None:  # decoding with a cache takes no gradient
    apply_block = jax.checkpoint(apply_block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                                 static_argnums=() if traced_window else (4,))

  def one(carry: _Carry, xs):
    params, layer, qk_slot, expert_slot, window = xs
    window = windows[0] if window is None else window
    capture = None if carry.expert_buffer is None else (carry.expert_buffer, expert_slot)
    x_BxLxD, q, k, router_logits, expert_buffer, cache = apply_block(params, carry.x_BxLxD, layer, capture, window,
                                                                     carry.cache)
    x_BxLxD = constrain_batch(x_BxLxD)
    q_buffer, k_buffer = carry.q_buffer, carry.k_buffer
    if q_buffer is not None:
      q_buffer = jax.lax.dynamic_update_index_in_dim(q_buffer, q, qk_slot, 0)
      k_buffer = jax.lax.dynamic_update_index_in_dim(k_buffer, k, qk_slot, 0)
    return _Carry(x_BxLxD, q_buffer, k_buffer, expert_buffer, cache), (
        x_BxLxD if output_hidden_states else None, router_logits if output_router_logits else None)

  qk_index = [qk_slots.get(layer, scratch) for layer in layers]
  expert_index = [expert_slots.get(layer, -1) for layer in layers]
  if cfg.scan_layers:
    xs = (stack_params, jnp.asarray(layers, jnp.int32), jnp.asarray(qk_index, jnp.int32),
          jnp.asarray(expert_index, jnp.int32), jnp.asarray(windows, jnp.int32) if traced_window else None)
    return jax.lax.scan(one, carry, xs)
  outputs = []
  for i, layer in enumerate(layers):
    carry, ys = one(carry, (jax.tree.map(lambda p, i=i: p[i], stack_params), layer, qk_index[i], expert_index[i],
                            windows[i]))
    outputs.append(ys)
  return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)


class CausalLM(nn.Module):
  """Embeddings, the block stacks (`ModelConfig.stacks`), the final norm and the LM head."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, embedding_init=_init(cfg))
    if cfg.rope is None:
      self.pos_embed = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, embedding_init=_init(cfg))
    self.stacks = {name: self.param(name, _stack_init(cfg, name == "moe_blocks", len(layers)))
                   for name, layers in cfg.stacks.items()}
    self.final_norm = Norm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, False, "lm_head")

  def __call__(self, input_ids_BxL, mask_BxL, positions_BxL, output_hidden_states: bool = False,
               qk_layers: Sequence[int] = (), compute_logits: bool = True, output_router_logits: bool = False,
               expert_layers: Sequence[int] = (), right_padded: bool = False) -> LMOutput:
    cfg = self.cfg
    batch, length = input_ids_BxL.shape
    x_BxLxD = self.embed_tokens(input_ids_BxL, positions_BxL)
    qk_slots = {layer: slot for slot, layer in enumerate(qk_layers)}
    expert_slots = {layer: slot for slot, layer in enumerate(expert_layers)}
    heads = (len(qk_layers) + 1, batch, length)
    carry = _Carry(
        x_BxLxD,
        jnp.zeros(heads + (cfg.num_heads, cfg.head_dim), cfg.dtype) if qk_layers else None,
        jnp.zeros(heads + (cfg.num_kv_heads, cfg.head_dim), cfg.dtype) if qk_layers else None,
        jnp.zeros((len(expert_layers), batch, length, cfg.num_experts, cfg.hidden_size), cfg.dtype)
        if expert_layers else None)
    hidden_states, router_logits = [x_BxLxD], []
    for stack, layers in _runs(cfg):
      carry, (hidden_NxBxLxD, logits_NxBxLxE) = _run_blocks(
          cfg, self.stacks[stack], stack, layers, carry, positions_BxL, mask_BxL, qk_slots, expert_slots,
          right_padded, output_hidden_states, output_router_logits)
      if hidden_NxBxLxD is not None:
        hidden_states.extend(hidden_NxBxLxD[i] for i in range(len(layers)))
      if logits_NxBxLxE is not None:
        router_logits.extend(logits_NxBxLxE[i] for i in range(len(layers)))
    final_BxLxD = self.final_norm(carry.x_BxLxD)
    hidden_states = hidden_states[:-1] + [final_BxLxD]
    queries_keys = tuple(
        attention.QueriesKeys(carry.q_buffer[slot], carry.k_buffer[slot], jnp.float32(cfg.attention_scale) * (
            1.0 if _layer_factor(cfg, layer) is None else _layer_factor(cfg, layer)), window=cfg.window_of(layer),
            softcap=cfg.attn_logit_softcap)
        for slot, layer in enumerate(qk_layers))
    return LMOutput(
        logits_BxLxV=self.unembed(final_BxLxD) if compute_logits else None,
        final_hidden_BxLxD=final_BxLxD,
        hidden_states=tuple(hidden_states) if output_hidden_states else None,
        attentions=(),
        router_logits=tuple(router_logits) if output_router_logits else (),
        expert_outputs=tuple(carry.expert_buffer[slot] for slot in range(len(expert_layers))),
        queries_keys=queries_keys)

  def embed_tokens(self, input_ids_BxL, positions_BxL):
    """Token embeddings (scaled with `scale_embeddings`) plus learned position embeddings where there is no RoPE."""
    cfg = self.cfg
    x_BxLxD = self.embed(input_ids_BxL)
    if cfg.scale_embeddings:  # sqrt(hidden_size) rounded to float32, then to the compute dtype, as transformers does
      x_BxLxD = x_BxLxD * jnp.asarray(np.float32(cfg.hidden_size ** 0.5), x_BxLxD.dtype)
    if cfg.rope is None:
      x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
    return constrain_batch(x_BxLxD)

  def extend_cache(self, input_ids_BxL, positions_BxL, cache: KVCache,
                   compute_logits: bool) -> tuple[jax.Array | None, jax.Array, KVCache]:
    """The blocks on L new tokens whose columns of `cache.mask_BxT` are already set: (logits or None, the
    final-normed hidden state, the cache with every layer's new keys and values)."""
    carry = _Carry(self.embed_tokens(input_ids_BxL, positions_BxL), None, None, None, cache)
    for stack, layers in _runs(self.cfg):
      carry, _ = _run_blocks(self.cfg, self.stacks[stack], stack, layers, carry, positions_BxL, None, {}, {},
                             right_padded=False, output_hidden_states=False, output_router_logits=False)
    final_BxLxD = self.final_norm(carry.x_BxLxD)
    return self.unembed(final_BxLxD) if compute_logits else None, final_BxLxD, carry.cache

  def unembed(self, hidden_BxLxD):
    """LM head: final hidden states -> logits (tied to the embeddings or a separate matrix), soft-capped
    with `final_logit_softcap`."""
    cfg = self.cfg
    logits = self.embed.attend(hidden_BxLxD) if cfg.tie_word_embeddings else self.lm_head(hidden_BxLxD)
    if cfg.final_logit_softcap:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def default_positions(mask_BxL: jax.Array) -> jax.Array:
  """Position of each token counted over real tokens only, so left padding does not shift positions."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_params(cfg: ModelConfig, rng: jax.Array):
  """Random parameters (normal(0.02) weights, unit norms) in `cfg.param_dtype`, in one compiled call."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return CausalLM(cfg).init(rng, ids, jnp.ones_like(ids), default_positions(jnp.ones_like(ids)))["params"]


def param_shapes(cfg: ModelConfig):
  """The params pytree as `jax.ShapeDtypeStruct`s, computed without allocating anything."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


@functools.partial(jax.jit, static_argnames=("cfg", "output_hidden_states", "attention_layers", "qk_layers",
                                             "compute_logits", "output_router_logits", "expert_layers",
                                             "right_padded"))
def forward(params, cfg: ModelConfig, input_ids_BxL, mask_BxL=None, positions_BxL=None, *,
            output_hidden_states: bool = False, attention_layers: tuple[int, ...] = (),
            qk_layers: tuple[int, ...] = (), compute_logits: bool = True, output_router_logits: bool = False,
            expert_layers: tuple[int, ...] = (), right_padded: bool = False) -> LMOutput:
  """Pure forward pass.

  Args:
    params: the params pytree of `CausalLM(cfg)`.
    cfg: the architecture (static).
    input_ids_BxL: int token ids.
    mask_BxL: 1 for real tokens, 0 for padding (left or right); all ones when None.
    positions_BxL: position ids; by default counted over real tokens (`default_positions`).
    output_hidden_states: also return every hidden state.
    attention_layers: layer indices whose whole attention maps [B, H, L, L] are returned (inspection).
    qk_layers: layer indices whose queries and keys are returned (`LMOutput.queries_keys`): what the
      attention losses recompute map rows from, a block of queries at a time.
    compute_logits: False skips the LM head (a chunked loss can apply `unembed` itself).
    output_router_logits: also return the [B, L, E] float32 router logits of every sparse layer.
    expert_layers: sparse layer indices whose per-expert outputs [B, L, E, D] are returned; those layers
      run every expert on every token (E / k times their expert FLOPs). Dense models ignore it.
    right_padded: a promise that every row's padding (mask 0) is at its end, as in packed training
      rows; the fused attention kernel then needs no mask tensor (the causal mask alone is exact for
      every real token). Left padding needs the default False.
  """
  if mask_BxL is None:
    mask_BxL = jnp.ones_like(input_ids_BxL)
  if positions_BxL is None:
    positions_BxL = default_positions(mask_BxL)
  for kind, layers in (("attention", attention_layers), ("qk", qk_layers)):
    for layer in layers:
      if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"{kind} layer {layer} is outside 0..{cfg.num_layers - 1}")
  if cfg.num_experts:
    for layer in expert_layers:
      if not cfg.is_sparse_layer(layer):
        raise ValueError(f"expert layer {layer} is not a sparse (MoE) layer; those are {cfg.sparse_layers}")
  else:
    expert_layers = ()
  requested = tuple(dict.fromkeys(tuple(qk_layers) + tuple(attention_layers)))
  out = CausalLM(cfg).apply({"params": params}, input_ids_BxL, mask_BxL, positions_BxL, output_hidden_states,
                            requested, compute_logits, output_router_logits, tuple(expert_layers), right_padded)
  by_layer = dict(zip(requested, out.queries_keys))
  return out.replace(attentions=tuple(attention.full_maps(by_layer[i], mask_BxL) for i in attention_layers),
                     queries_keys=tuple(by_layer[i] for i in qk_layers))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """An empty KV cache of `length` columns for `batch` rows: 2 x batch x layers x length x kv heads x head_dim
  numbers in the compute dtype, batch axis pinned like the residual stream's."""
  shape = (batch, cfg.num_layers, length, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(constrain_batch(jnp.zeros(shape, cfg.dtype)), constrain_batch(jnp.zeros(shape, cfg.dtype)),
                 constrain_batch(jnp.zeros((batch, length), jnp.int32)), jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("cfg", "compute_logits"))
def forward_cached(params, cfg: ModelConfig, input_ids_BxL, cache: KVCache, mask_BxL=None, positions_BxL=None, *,
                   compute_logits: bool = True) -> tuple[LMOutput, KVCache]:
  """Runs L new tokens on top of the tokens in `cache` (a prefill, or one decode step with L = 1).

  The new tokens go to columns index..index+L-1 of the cache, in every row, and attend to everything
  written before them there and to each other causally, with the windows, soft-caps and scales of
  `forward`: running a sequence in pieces gives `forward`'s outputs for it, up to float rounding. Cost
  per token: one token's matmuls plus attention over the cache's T columns (the unwritten ones are
  masked), instead of a forward over the whole sequence.

  Args:
    params: the params pytree of `CausalLM(cfg)`.
    cfg: the architecture (static).
    input_ids_BxL: int token ids; index + L must not exceed the cache's T columns.
    cache: from `init_cache`, or the cache a previous call returned.
    mask_BxL: 1 for real tokens, 0 for padding (the prompt's left padding); all ones when None.
    positions_BxL: position ids; by default counted over the real tokens of the cache and these, as
      `default_positions` counts them over the whole sequence (left padding does not shift positions).
    compute_logits: False skips the LM head (`LMOutput.logits_BxLxV` is None).

  Returns:
    (LMOutput with the logits and final hidden states of the new tokens only; the cache, `index` advanced by L).
  """
  batch, length = input_ids_BxL.shape
  mask_BxL = jnp.ones((batch, length), jnp.int32) if mask_BxL is None else jnp.asarray(mask_BxL, jnp.int32)
  if positions_BxL is None:
    seen_Bx1 = jnp.sum(cache.mask_BxT, axis=1, keepdims=True)  # unwritten columns are 0
    positions_BxL = jnp.maximum(seen_Bx1 + jnp.cumsum(mask_BxL, axis=1) - 1, 0)
  cache = cache.replace(mask_BxT=jax.lax.dynamic_update_slice(cache.mask_BxT, mask_BxL, (0, cache.index)))
  logits_BxLxV, final_BxLxD, cache = CausalLM(cfg).apply({"params": params}, input_ids_BxL, positions_BxL, cache,
                                                          compute_logits, method=CausalLM.extend_cache)
  cache = KVCache(constrain_batch(cache.k_BxLxTxGxK), constrain_batch(cache.v_BxLxTxGxK),
                  constrain_batch(cache.mask_BxT), cache.index + length)
  return LMOutput(logits_BxLxV, final_BxLxD, hidden_states=None, attentions=()), cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def unembed(params, cfg: ModelConfig, hidden_BxLxD) -> jax.Array:
  """Logits for (a chunk of) final hidden states."""
  return CausalLM(cfg).apply({"params": params}, hidden_BxLxD, method=CausalLM.unembed)
