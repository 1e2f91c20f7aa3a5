"""Flax causal LM covering the Llama, Qwen2, Qwen3, GPT-2, Qwen3-MoE and Mixtral families.

One module, configured by `ModelConfig`; `forward` is the pure entry point
(params pytree in, arrays out). Hidden states, attention maps, router logits and
per-expert outputs are only computed and returned when asked for: `attention_layers`
and `expert_layers` are static tuples, so the B*H*L*L probabilities and the
B*L*E*D expert outputs of other layers never exist.
"""

import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models import moe
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
  attentions: attention probabilities [B, H, L, L] in float32, one per entry of `attention_layers`.
  router_logits: router logits [B, L, E] in float32, one per sparse (MoE) layer in layer order, when
    `output_router_logits`; () otherwise and for dense models.
  expert_outputs: every expert's unweighted output [B, L, E, D] in the compute dtype, one per entry of
    `expert_layers` (sparse layers of MoE models only; () for dense models).
  """
  logits_BxLxV: jax.Array | None
  final_hidden_BxLxD: jax.Array
  hidden_states: tuple[jax.Array, ...] | None
  attentions: tuple[jax.Array, ...]
  router_logits: tuple[jax.Array, ...] = ()
  expert_outputs: tuple[jax.Array, ...] = ()


def _init(cfg: ModelConfig):
  del cfg
  return nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
  """RMSNorm or LayerNorm computed in float32 and cast back, as transformers does."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
      scale = self.param("scale", nn.initializers.ones, (features,), cfg.param_dtype)
      normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
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


def attention_mask_BxLxL(mask_BxL: jax.Array) -> jax.Array:
  """Causal mask restricted to valid keys; each query may always see itself, so no row is empty."""
  length = mask_BxL.shape[1]
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  allowed = causal_LxL[None] & mask_BxL.astype(bool)[:, None, :]
  return allowed | jnp.eye(length, dtype=bool)[None]


class Attention(nn.Module):
  cfg: ModelConfig
  layer_idx: int

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, allowed_BxLxL, return_probs: bool):
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
      inv_freq = inverse_frequencies(cfg.rope, head_dim)
      q = apply_rope(q, positions_BxL, inv_freq)
      k = apply_rope(k, positions_BxL, inv_freq)

    groups = heads // kv_heads
    q_BxLxGxKxH = q.reshape(batch, length, kv_heads, groups, head_dim)
    scale = head_dim ** -0.5
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= self.layer_idx + 1
    scores = jnp.einsum("bqgrk,bsgk->bgrqs", q_BxLxGxKxH, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed_BxLxL[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxL = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrqs,bsgk->bqgrk", probs_BxGxRxLxL.astype(cfg.dtype), v)
    out_BxLxD = _dense(cfg, cfg.hidden_size, cfg.o_bias, "o")(out.reshape(batch, length, heads * head_dim))
    probs_BxHxLxL = probs_BxGxRxLxL.reshape(batch, heads, length, length) if return_probs else None
    return out_BxLxD, probs_BxHxLxL


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
  With `return_experts` every expert runs on every token instead (E / k times the expert FLOPs), the
  layer output is mixed from those same outputs, and they are returned [B, L, E, D].
  Returns (out_BxLxD, router_logits_BxLxE float32, expert_outputs_BxLxExD or None).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, return_experts: bool):
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
    if return_experts:
      y_TxExD = moe.all_expert_outputs(x_TxD, gate_ExDxI, up_ExDxI, down_ExIxD, act)
      y_TxKxD = jnp.take_along_axis(y_TxExD, chosen_TxK[..., None], axis=1)
      expert_outputs = y_TxExD.reshape(batch, length, experts, hidden)
    else:
      y_TxKxD = moe.chosen_expert_outputs(x_TxD, chosen_TxK, gate_ExDxI, up_ExDxI, down_ExIxD, act)
      expert_outputs = None
    out_BxLxD = moe.mix(y_TxKxD, weights_TxK).reshape(batch, length, hidden)
    return out_BxLxD, logits_BxLxE, expert_outputs


class Block(nn.Module):
  """Pre-norm attention and MLP (or routed experts) with residuals.

  Returns (x_BxLxD, attention probs or None, router logits or None, expert outputs or None).
  """
  cfg: ModelConfig
  layer_idx: int

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, allowed_BxLxL, return_probs: bool, return_experts: bool = False):
    attn_out, probs = Attention(self.cfg, self.layer_idx, name="attn")(
        Norm(self.cfg, name="attn_norm")(x_BxLxD), positions_BxL, allowed_BxLxL, return_probs)
    x_BxLxD = x_BxLxD + attn_out
    normed_BxLxD = Norm(self.cfg, name="mlp_norm")(x_BxLxD)
    if self.cfg.is_sparse_layer(self.layer_idx):
      mlp_out, router_logits, expert_outputs = SparseMoE(self.cfg, name="mlp")(normed_BxLxD, return_experts)
    else:
      mlp_out, router_logits, expert_outputs = MLP(self.cfg, name="mlp")(normed_BxLxD), None, None
    return x_BxLxD + mlp_out, probs, router_logits, expert_outputs


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: ModelConfig):
  """`Block`, or with `cfg.remat` a `Block` whose backward pass recomputes what the policy does not keep.

  Static arguments (the return flags, 4 and 5 counting `self`) stay Python values under the transform.
  """
  if cfg.remat == "none":
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(4, 5))


class CausalLM(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    block = _block_class(cfg)
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, embedding_init=_init(cfg))
    if cfg.rope is None:
      self.pos_embed = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                                param_dtype=cfg.param_dtype, embedding_init=_init(cfg))
    self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = Norm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, False, "lm_head")

  def __call__(self, input_ids_BxL, mask_BxL, positions_BxL, output_hidden_states: bool = False,
               attention_layers: Sequence[int] = (), compute_logits: bool = True,
               output_router_logits: bool = False, expert_layers: Sequence[int] = ()) -> LMOutput:
    x_BxLxD = self.embed(input_ids_BxL)
    if self.cfg.rope is None:
      x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
    x_BxLxD = constrain_batch(x_BxLxD)
    allowed_BxLxL = attention_mask_BxLxL(mask_BxL)
    hidden_states, attentions, router_logits, expert_outputs = [x_BxLxD], {}, [], {}
    for i, layer in enumerate(self.layers):
      x_BxLxD, probs, logits_BxLxE, experts_BxLxExD = layer(
          x_BxLxD, positions_BxL, allowed_BxLxL, i in attention_layers, i in expert_layers)
      x_BxLxD = constrain_batch(x_BxLxD)
      hidden_states.append(x_BxLxD)
      if probs is not None:
        attentions[i] = probs
      if logits_BxLxE is not None:
        router_logits.append(logits_BxLxE)
      if experts_BxLxExD is not None:
        expert_outputs[i] = experts_BxLxExD
    final_BxLxD = self.final_norm(x_BxLxD)
    hidden_states[-1] = final_BxLxD
    return LMOutput(
        logits_BxLxV=self.unembed(final_BxLxD) if compute_logits else None,
        final_hidden_BxLxD=final_BxLxD,
        hidden_states=tuple(hidden_states) if output_hidden_states else None,
        attentions=tuple(attentions[i] for i in attention_layers),
        router_logits=tuple(router_logits) if output_router_logits else (),
        expert_outputs=tuple(expert_outputs[i] for i in expert_layers if i in expert_outputs))

  def unembed(self, hidden_BxLxD):
    """LM head: final hidden states -> logits (tied to the embeddings or a separate matrix)."""
    if self.cfg.tie_word_embeddings:
      return self.embed.attend(hidden_BxLxD)
    return self.lm_head(hidden_BxLxD)


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


@functools.partial(jax.jit, static_argnames=("cfg", "output_hidden_states", "attention_layers",
                                             "compute_logits", "output_router_logits", "expert_layers"))
def forward(params, cfg: ModelConfig, input_ids_BxL, mask_BxL=None, positions_BxL=None, *,
            output_hidden_states: bool = False, attention_layers: tuple[int, ...] = (),
            compute_logits: bool = True, output_router_logits: bool = False,
            expert_layers: tuple[int, ...] = ()) -> LMOutput:
  """Pure forward pass.

  Args:
    params: the params pytree of `CausalLM(cfg)`.
    cfg: the architecture (static).
    input_ids_BxL: int token ids.
    mask_BxL: 1 for real tokens, 0 for padding (left or right); all ones when None.
    positions_BxL: position ids; by default counted over real tokens (`default_positions`).
    output_hidden_states: also return every hidden state.
    attention_layers: layer indices whose attention probabilities are returned.
    compute_logits: False skips the LM head (a chunked loss can apply `unembed` itself).
    output_router_logits: also return the [B, L, E] float32 router logits of every sparse layer.
    expert_layers: sparse layer indices whose per-expert outputs [B, L, E, D] are returned; those layers
      run every expert on every token (E / k times their expert FLOPs). Dense models ignore it.
  """
  if mask_BxL is None:
    mask_BxL = jnp.ones_like(input_ids_BxL)
  if positions_BxL is None:
    positions_BxL = default_positions(mask_BxL)
  for layer in attention_layers:
    if not 0 <= layer < cfg.num_layers:
      raise ValueError(f"attention layer {layer} is outside 0..{cfg.num_layers - 1}")
  if cfg.num_experts:
    for layer in expert_layers:
      if not cfg.is_sparse_layer(layer):
        raise ValueError(f"expert layer {layer} is not a sparse (MoE) layer; those are {cfg.sparse_layers}")
  return CausalLM(cfg).apply({"params": params}, input_ids_BxL, mask_BxL, positions_BxL,
                             output_hidden_states, tuple(attention_layers), compute_logits,
                             output_router_logits, tuple(expert_layers))


@functools.partial(jax.jit, static_argnames=("cfg",))
def unembed(params, cfg: ModelConfig, hidden_BxLxD) -> jax.Array:
  """Logits for (a chunk of) final hidden states."""
  return CausalLM(cfg).apply({"params": params}, hidden_BxLxD, method=CausalLM.unembed)
