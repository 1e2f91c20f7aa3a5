"""Attention without B x H x L x L memory: the fused kernel, a query-block loop, and probability rows.

Three implementations of softmax(q k^T * scale + causal/padding mask) v, picked by
`ModelConfig.attention` ('auto' resolves it where the model is traced, `resolve_implementation`):
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's flash attention (NVIDIA GPUs
  of compute capability >= 8.0, fp16/bf16, head_dim a multiple of 8 up to 128). It never forms the
  scores, and keeps only a [B, H, L] log-sum-exp for the backward pass. 'auto' picks it where it runs.
- `blockwise`: queries in blocks of `attention_block` rows, each block's [B, H, block, L] scores formed,
  used and dropped inside a `jax.checkpoint`, so the backward pass recomputes them block by block and
  the step never holds more than one block's rows. 'auto' picks it everywhere else (CPU, the P100's
  sm_60, fp32). Its arithmetic is the materialised path's, row for row.
- `xla`: `jax.nn.dot_product_attention(implementation='xla')`, XLA's einsum-softmax-einsum, which forms
  the whole [B, H, L, L] (forced only, for comparison).

GQA is never expanded: queries are grouped [B, L, G, R, K] against the G key/value heads. The mask is
causal by query and key index, restricted to keys with mask 1 and, with a sliding window of W (Mistral),
to the W - 1 keys before the query; a query always sees itself (so no row is empty); with `right_padded` (every row's padding at its end, as the packed training data is) the
causal mask alone is exact for every real token, and the fused kernel gets no mask tensor at all.
The window may be a traced per-layer value (a scanned stack mixing windowed and full layers). Scores may be
soft-capped, cap * tanh(scores / cap) before the mask (Gemma 2): cuDNN has no such option, so 'auto' then
picks blockwise and `xla` materialises the scores itself.

`attention_probs` gives the float32 probability rows of any set of queries; the attention-transfer and
router losses call it one query block at a time (`query_blocks`) on the q and k a layer returned.
`attend_to_keys` is the blockwise path for queries at any indices over any keys: a KV cache's prefill
and decode steps (`transformer.forward_cached`) attend to the cache's whole buffer through it.
"""

from typing import Callable

import flax
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "cudnn", "blockwise", "xla")
_CUDNN_DTYPES = ("bfloat16", "float16")


@flax.struct.dataclass
class QueriesKeys:
  """A layer's attention inputs after RoPE and q/k norms: enough to recompute any row of its map.

  q_BxLxNxK: queries (N heads); k_BxLxGxK: keys (G key/value heads); scale: the float32 scalar the
  scores are multiplied by (head_dim ** -0.5, and 1 / (layer + 1) for GPT-2's inverse-layer option);
  window: the layer's sliding window (0: none); softcap: the layer's score soft-cap (0: none).
  """
  q_BxLxNxK: jax.Array
  k_BxLxGxK: jax.Array
  scale: jax.Array
  window: int = flax.struct.field(pytree_node=False, default=0)
  softcap: float = flax.struct.field(pytree_node=False, default=0.0)


def resolve_implementation(requested: str, dtype: str, head_dim: int, softcap: float = 0.0) -> str:
  """The implementation that runs: `requested`, or for 'auto' cuDNN where it has a kernel, else blockwise."""
  if requested != "auto":
    return requested
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if (device.platform == "gpu" and capability and float(capability) >= 8.0 and dtype in _CUDNN_DTYPES
      and head_dim % 8 == 0 and head_dim <= 128 and not softcap):
    return "cudnn"
  return "blockwise"


def allowed_BxQxS(query_index_BxQ: jax.Array, key_mask_BxS: jax.Array, window: int | jax.Array = 0) -> jax.Array:
  """Which keys each query sees: earlier-or-same index, mask 1, within `window` (> 0) indices; always itself."""
  key_index_1x1xS = jnp.arange(key_mask_BxS.shape[1])[None, None, :]
  query_BxQx1 = query_index_BxQ[:, :, None]
  seen = (key_index_1x1xS <= query_BxQx1) & key_mask_BxS.astype(bool)[:, None, :]
  if not isinstance(window, int):  # traced: one layer's window of a scanned stack, 0 for its full layers
    seen &= (window <= 0) | (query_BxQx1 - key_index_1x1xS < window)
  elif window:
    seen &= query_BxQx1 - key_index_1x1xS < window
  return seen | (key_index_1x1xS == query_BxQx1)


def attention_probs(q_BxQxNxK: jax.Array, k_BxSxGxK: jax.Array, query_index_BxQ: jax.Array,
                    key_mask_BxS: jax.Array, scale, window: int | jax.Array = 0, softcap: float = 0.0) -> jax.Array:
  """Float32 attention probabilities [B, N, Q, S] of the queries at sequence indices `query_index_BxQ`.

  scores = (q k^T) * scale accumulated in float32, then with `softcap` > 0 softcap * tanh(scores / softcap);
  keys a query may not see get float32's lowest value; softmax over the keys. Query heads are grouped over
  the G key heads (GQA), never repeated.
  """
  batch, queries, heads, head_dim = q_BxQxNxK.shape
  kv_heads = k_BxSxGxK.shape[2]
  q_BxQxGxRxK = q_BxQxNxK.reshape(batch, queries, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqgrk,bsgk->bgrqs", q_BxQxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32) * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  allowed = allowed_BxQxS(query_index_BxQ, key_mask_BxS, window)
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1).reshape(batch, heads, queries, -1)


def query_blocks(fn: Callable, arrays: tuple, block: int):
  """`fn(*arrays)` for arrays whose axis 1 indexes queries, computed `block` queries at a time.

  `fn` maps arrays [B, Q, ...] to a pytree of arrays [B, Q, ...]. With more than `block` queries the
  queries are padded to whole blocks (padding repeats query 0, whose rows are always finite), each
  block runs under `jax.checkpoint` in a `lax.map`, and the results are concatenated back: the forward
  and backward passes hold one block's intermediates at a time. With `block` queries or fewer (or
  block 0) `fn` runs once on everything.
  """
  queries = arrays[0].shape[1]
  if not block or queries <= block:
    return fn(*arrays)
  num_blocks = -(-queries // block)
  pad = num_blocks * block - queries

  def split(a):
    a = jnp.concatenate([a, jnp.repeat(a[:, :1], pad, axis=1)], axis=1) if pad else a
    a = a.reshape((a.shape[0], num_blocks, block) + a.shape[2:])
    return jnp.moveaxis(a, 1, 0)

  def join(v):
    v = jnp.moveaxis(v, 0, 1)
    return v.reshape((v.shape[0], num_blocks * block) + v.shape[3:])[:, :queries]

  values = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(a) for a in arrays))
  return jax.tree.map(join, values)


def attend_to_keys(q_BxQxNxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, query_index_BxQ: jax.Array,
                   key_mask_BxS: jax.Array, scale, *, block: int, window: int | jax.Array = 0,
                   softcap: float = 0.0) -> jax.Array:
  """Attention output [B, Q, N, K] of queries at sequence indices `query_index_BxQ` over the keys 0..S-1.

  The blockwise implementation: `attention_probs` rows, `block` queries at a time (`query_blocks`; 0: all
  at once), cast to the values' dtype and summed over the values. Self-attention passes the queries' own
  keys; a KV cache passes its whole buffer, of which the causal-by-index mask hides the unwritten columns.
  """
  batch, _, heads, head_dim = q_BxQxNxK.shape
  keys, kv_heads = k_BxSxGxK.shape[1:3]

  def rows(q_BxQxNxK, index_BxQ):
    probs_BxGxRxQxS = attention_probs(q_BxQxNxK, k_BxSxGxK, index_BxQ, key_mask_BxS, scale, window, softcap).reshape(
        batch, kv_heads, heads // kv_heads, q_BxQxNxK.shape[1], keys)
    out = jnp.einsum("bgrqs,bsgk->bqgrk", probs_BxGxRxQxS.astype(v_BxSxGxK.dtype), v_BxSxGxK)
    return out.reshape(batch, -1, heads, head_dim)

  return query_blocks(rows, (q_BxQxNxK, query_index_BxQ), block)


def attend(q_BxLxNxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, key_mask_BxL: jax.Array, *,
           head_scale: float, layer_factor, implementation: str, block: int, right_padded: bool,
           window: int | jax.Array = 0, windows: tuple[int, ...] = (), softcap: float = 0.0) -> jax.Array:
  """Attention output [B, L, N, K] in the inputs' dtype.

  Args:
    q_BxLxNxK, k_BxLxGxK, v_BxLxGxK: queries (N heads) and keys/values (G heads, G divides N).
    key_mask_BxL: 1 for real tokens, 0 for padding (left or right).
    head_scale: the static part of the score scale (head_dim ** -0.5, or query_pre_attn_scalar ** -0.5).
    layer_factor: None, or a further (possibly traced) factor (GPT-2's 1 / (layer + 1)).
    implementation: one of IMPLEMENTATIONS other than 'auto' (`resolve_implementation`).
    block: query rows per block of the blockwise implementation.
    right_padded: every row's padding is at its end (the fused kernels then take the causal mask alone).
    window: > 0: each query sees itself and the window - 1 keys before it (sliding-window attention). It may
      be traced (one layer's of a scanned stack), taking one of the static values `windows`.
    windows: the values a traced `window` takes: the fused kernels' mask-free local window is static, so
      with `right_padded` each is compiled and the layer's one runs.
    softcap: > 0: the scores are soft-capped, softcap * tanh(scores / softcap), before the mask.
  """
  if implementation not in IMPLEMENTATIONS[1:]:
    raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
  if softcap and implementation == "cudnn":
    raise ValueError(f"cuDNN attention cannot soft-cap the scores (softcap={softcap}); use blockwise or xla")
  if implementation == "blockwise" or softcap:  # dot_product_attention has no soft-cap: xla materialises itself
    scale = head_scale if layer_factor is None else head_scale * layer_factor
    index_BxL = jnp.broadcast_to(jnp.arange(key_mask_BxL.shape[1]), key_mask_BxL.shape)
    return attend_to_keys(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, index_BxL, key_mask_BxL, scale,
                          block=block if implementation == "blockwise" else 0, window=window, softcap=softcap)
  if right_padded and not isinstance(window, int):
    def static(w):
      return lambda: attend(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, key_mask_BxL, head_scale=head_scale,
                            layer_factor=layer_factor, implementation=implementation, block=block,
                            right_padded=True, window=w)
    return jax.lax.switch(jnp.argmax(jnp.asarray(windows) == window), [static(w) for w in windows])
  if layer_factor is not None:  # the fused kernels take a static scale: the traced factor goes into q
    q_BxLxNxK = q_BxLxNxK * jnp.asarray(layer_factor, q_BxLxNxK.dtype)
  mask = None
  if not right_padded:
    length = key_mask_BxL.shape[1]
    index_BxL = jnp.broadcast_to(jnp.arange(length), key_mask_BxL.shape)
    mask = allowed_BxQxS(index_BxL, key_mask_BxL, window)[:, None]
  local_window = (window - 1, 0) if right_padded and window else None  # a mask tensor holds the window already
  return jax.nn.dot_product_attention(q_BxLxNxK, k_BxLxGxK, v_BxLxGxK, mask=mask, scale=head_scale,
                                      is_causal=right_padded, local_window_size=local_window,
                                      implementation=implementation)


def full_maps(qk: QueriesKeys, key_mask_BxL: jax.Array) -> jax.Array:
  """The whole float32 map [B, N, L, L] of one layer (inspection and parity; losses use blocks)."""
  batch, length = key_mask_BxL.shape
  index_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return attention_probs(qk.q_BxLxNxK, qk.k_BxLxGxK, index_BxL, key_mask_BxL, qk.scale, qk.window, qk.softcap)
