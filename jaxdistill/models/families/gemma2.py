"""Gemma 2 (`Gemma2ForCausalLM`), and the Gemma mapping Gemma 3's text model shares (families/gemma3_text.py).

A Gemma block is the Llama block with extras, each a ModelConfig capability the shared transformer reads:
windowed and global layers in one stack (config.json `layer_types`; without it every `global_every`-th layer
is global), token embeddings times sqrt(hidden_size), RMSNorm by (1 + w), a norm after attention and after
the MLP as well (four per block: input, post_attention, pre_feedforward, post_feedforward), scores scaled by
query_pre_attn_scalar ** -0.5 and a gelu-tanh gated MLP. Gemma 2 soft-caps the attention scores and the final
logits (so its attention never runs on cuDNN). Keys a config.json lacks take transformers' class defaults
(head_dim 256, a window of 4096, ...), since that is the model transformers builds from the file.
"""

import dataclasses
import functools
from typing import Any, Mapping

from jaxdistill.errors import ModelLoadError
from jaxdistill.models.config import ModelConfig, RopeConfig, check_activation, require_hf, rope_from_hf, rope_to_hf
from jaxdistill.models.families import llama
from jaxdistill.models.families.base import Family, Rule, attention_rules, linear, norm

_LAYER_TYPES = ("sliding_attention", "full_attention")
# Gemma's four norms of a block: transformers' name -> the Flax block's.
_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
          ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "mlp_post_norm"))


@dataclasses.dataclass(frozen=True)
class Variant:
  """What sets the Gemma generations apart; the defaults are transformers' Gemma2Config's."""
  global_every: int = 2              # without `layer_types`, layer i is global when (i + 1) % global_every == 0
  pattern_key: str | None = None     # config.json key overriding `global_every` (Gemma 3: sliding_window_pattern)
  attn_logit_softcap: float | None = 50.0   # None: transformers ignores config.json's attn_logit_softcapping
  final_logit_softcap: float = 30.0  # when config.json does not say
  max_position_embeddings: int = 8192
  rope_theta: float = 10000.0        # the global layers' RoPE base when config.json does not say
  local_rope_theta: float | None = None  # the windowed layers' own RoPE base (Gemma 3); None: one RoPE for all
  qk_norm: bool = False              # (1 + w) RMSNorm on queries and keys (Gemma 3)


def family(name: str, architecture: str, **variant) -> Family:
  """The Family of a Gemma `model_type`."""
  v = Variant(**variant)
  # An arch group meets the Llama block's limits (grouped-query heads, an even head_dim for RoPE).
  return Family(name=name, architecture=architecture, from_hf=functools.partial(_from_hf, name, v),
                to_hf=functools.partial(_to_hf, v), from_arch=functools.partial(_from_arch, name, v),
                check_arch=llama.FAMILY.check_arch, weight_rules=_rules, windowed=True)


def _model(name: str, v: Variant, window: int, full_layers: tuple[int, ...], rope: RopeConfig,
           local_rope: RopeConfig | None, **fields) -> ModelConfig:
  """Gemma's fixed choices; with no windowed layer the window (and a local RoPE) is dropped, so equal models
  have equal configs."""
  if not window or len(full_layers) == fields["num_layers"]:
    window, full_layers, local_rope = 0, (), None
  return ModelConfig(family=name, sliding_window=window, full_attention_layers=full_layers, rope=rope,
                     local_rope=local_rope, qk_norm=v.qk_norm, norm_unit_offset=True, post_norms=True,
                     scale_embeddings=True, **fields)


def _from_hf(name: str, v: Variant, hf: dict[str, Any], where: str) -> ModelConfig:
  if hf.get("use_bidirectional_attention"):
    raise ModelLoadError(f"{where}: use_bidirectional_attention=true is not supported; only causal attention is")
  layers = int(require_hf(hf, "num_hidden_layers", where))
  rope, local_rope = _ropes(v, hf, where)
  attn_cap = hf.get("attn_logit_softcapping", v.attn_logit_softcap) if v.attn_logit_softcap is not None else None
  attention_bias = bool(hf.get("attention_bias", False))
  return _model(
      name, v, window=int(hf.get("sliding_window", 4096) or 0), full_layers=_full_layers(v, hf, layers, where),
      rope=rope, local_rope=local_rope,
      vocab_size=int(require_hf(hf, "vocab_size", where)),
      hidden_size=int(require_hf(hf, "hidden_size", where)),
      num_layers=layers,
      num_heads=int(require_hf(hf, "num_attention_heads", where)),
      num_kv_heads=int(hf.get("num_key_value_heads", 4)),
      head_dim=int(hf.get("head_dim", 256)),
      intermediate_size=int(require_hf(hf, "intermediate_size", where)),
      max_position_embeddings=int(hf.get("max_position_embeddings", v.max_position_embeddings)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      activation=check_activation(hf.get("hidden_activation", "gelu_pytorch_tanh"), where),
      qkv_bias=attention_bias, o_bias=attention_bias,
      attn_logit_softcap=float(attn_cap or 0.0),
      final_logit_softcap=float(hf.get("final_logit_softcapping", v.final_logit_softcap) or 0.0),
      query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar", 256)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _full_layers(v: Variant, hf: dict[str, Any], layers: int, where: str) -> tuple[int, ...]:
  """The global layers: those `layer_types` calls 'full_attention', or transformers' pattern without it."""
  types = hf.get("layer_types")
  if types is None:
    every = int(hf.get(v.pattern_key) or v.global_every) if v.pattern_key else v.global_every
    return tuple(i for i in range(layers) if (i + 1) % every == 0)
  if len(types) != layers or set(types) - set(_LAYER_TYPES):
    raise ModelLoadError(f"{where}: layer_types must give one of {', '.join(_LAYER_TYPES)} for each of the "
                         f"{layers} layers; it is {types}")
  return tuple(i for i, kind in enumerate(types) if kind == "full_attention")


def _ropes(v: Variant, hf: dict[str, Any], where: str) -> tuple[RopeConfig, RopeConfig | None]:
  """(the global layers' RoPE, the windowed layers' own or None)."""
  if v.local_rope_theta is None:
    return rope_from_hf(hf, where, v.rope_theta), None
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params:  # transformers >= 5: one RoPE per layer type
    full, local = {"rope_parameters": params["full_attention"]}, {"rope_parameters": params.get("sliding_attention")}
  else:  # the hub's files: the global RoPE, and a base for the windowed layers
    full = {"rope_theta": hf.get("rope_theta"), "rope_scaling": hf.get("rope_scaling")}
    local = {"rope_theta": hf.get("rope_local_base_freq")}
  local_rope = rope_from_hf(local, where, v.local_rope_theta)
  if local_rope.rope_type != "default":
    raise ModelLoadError(f"{where}: a {local_rope.rope_type!r} scaled RoPE on the sliding-window layers is not "
                         "supported; only a base of their own (rope_local_base_freq) is")
  return rope_from_hf(full, where, v.rope_theta), local_rope


def _to_hf(v: Variant, cfg: ModelConfig) -> dict[str, Any]:
  out = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_activation": cfg.activation,
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.qkv_bias,
      "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
      # transformers builds the windowed mask even where no layer uses it, and needs a window for it
      "sliding_window": cfg.sliding_window or cfg.max_position_embeddings,
      "layer_types": [_LAYER_TYPES[not cfg.window_of(i)] for i in range(cfg.num_layers)],
      "attn_logit_softcapping": cfg.attn_logit_softcap or None,
      "final_logit_softcapping": cfg.final_logit_softcap or None, "use_bidirectional_attention": False,
      **rope_to_hf(cfg.rope),
  }
  if v.local_rope_theta is not None:
    out["rope_local_base_freq"] = (cfg.local_rope or RopeConfig(theta=v.local_rope_theta)).theta
  return out


def _from_arch(name: str, v: Variant, arch: Mapping[str, Any]) -> ModelConfig:
  """Transformers' defaults for the rest; the query scale is 1 / sqrt(head_dim), as in Gemma 2 2B and 9B."""
  layers, head_dim = arch["num_layers"], arch["hidden_size"] // arch["num_heads"]
  return _model(
      name, v, window=arch["sliding_window"],
      full_layers=tuple(i for i in range(layers) if (i + 1) % v.global_every == 0),
      rope=RopeConfig(theta=v.rope_theta),
      local_rope=None if v.local_rope_theta is None else RopeConfig(theta=v.local_rope_theta),
      vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], num_layers=layers,
      num_heads=arch["num_heads"], num_kv_heads=arch["num_kv_heads"], head_dim=head_dim,
      intermediate_size=arch["intermediate_size"], max_position_embeddings=arch["max_position_embeddings"],
      activation="gelu_pytorch_tanh", attn_logit_softcap=v.attn_logit_softcap or 0.0,
      final_logit_softcap=v.final_logit_softcap, query_pre_attn_scalar=head_dim,
      tie_word_embeddings=arch["tie_word_embeddings"])


def _rules(cfg: ModelConfig, fused_experts: bool) -> list[Rule]:
  del fused_experts  # no experts
  rules = [Rule("model.embed_tokens.weight", (("embed", "embedding"),))]
  for i in range(cfg.num_layers):
    hf, fx = f"model.layers.{i}", (f"layers_{i}",)
    for hf_norm, flax_norm in _NORMS:
      rules += norm(f"{hf}.{hf_norm}", fx + (flax_norm,), False)
    rules += attention_rules(hf, fx, cfg)
    for name in ("gate", "up", "down"):
      rules += linear(f"{hf}.mlp.{name}_proj", fx + ("mlp", name), False)
  rules += norm("model.norm", ("final_norm",), False)
  if not cfg.tie_word_embeddings:
    rules += linear("lm_head", ("lm_head",), False)
  return rules


FAMILY = family("gemma2", "Gemma2ForCausalLM")
