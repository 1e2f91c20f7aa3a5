"""The Llama block (RMSNorm, rotary attention, SwiGLU MLP) and the small ways its families differ.

Llama, Qwen2, Qwen3, Mistral, Phi-3 and the mixture-of-experts Qwen3-MoE and Mixtral are one block in
transformers too; each family module states its `Quirks` and `family()` builds the `Family` from them.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

from jaxdistill.errors import ModelLoadError
from jaxdistill.models.config import ModelConfig, RopeConfig, check_activation, require_hf, rope_from_hf, rope_to_hf
from jaxdistill.models.families.base import Family, Path, Rule, attention_rules, check, linear, norm


@dataclasses.dataclass(frozen=True)
class Experts:
  """How a mixture-of-experts family writes its experts in config.json and (per expert) in checkpoints."""
  from_hf: Callable[[dict[str, Any], str], dict[str, Any]]  # config.json -> ModelConfig's expert fields
  to_hf: Callable[[ModelConfig], dict[str, Any]]
  module: str = "mlp"   # per-expert tensors: `{layer}.{module}.experts.{e}.{name}.weight`, router `{module}.gate`
  names: tuple[tuple[str, str], ...] = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


@dataclasses.dataclass(frozen=True)
class Quirks:
  """What sets one Llama-like family apart; the defaults are Llama's (and transformers' LlamaConfig's)."""
  # None: config.json's `attention_bias` on q, k, v and o; True: q/k/v biases, no o bias (Qwen2); False: none
  # (Mixtral has no `attention_bias`).
  qkv_bias: bool | None = None
  qk_norm: bool = False            # RMSNorm on queries and keys (Qwen3)
  windowed: bool = False           # config.json's `sliding_window` applies to every layer (Mistral, Mixtral, Phi-3)
  fused_projections: bool = False  # one qkv_proj and one gate_up_proj tensor per layer (Phi-3)
  rope_theta: float = 10000.0      # transformers' default rope_theta
  norm_eps: float = 1e-6           # transformers' default rms_norm_eps
  experts: Experts | None = None   # a mixture-of-experts family
  hf_keys: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}  # config.json keys only this family writes
  check_arch: Callable[[Mapping[str, Any], str], None] = lambda arch, where: None  # this family's own refusals


def family(name: str, architecture: str, **quirks) -> Family:
  """The Family of a Llama-like `model_type` with these `Quirks`."""
  q = Quirks(**quirks)
  return Family(name=name, architecture=architecture, from_hf=functools.partial(_from_hf, name, q),
                to_hf=functools.partial(_to_hf, q), from_arch=functools.partial(_from_arch, name, q),
                check_arch=functools.partial(_check_arch, q), weight_rules=functools.partial(_rules, q),
                moe=q.experts is not None, windowed=q.windowed)


def _from_hf(name: str, q: Quirks, hf: dict[str, Any], where: str) -> ModelConfig:
  if hf.get("use_sliding_window"):  # Qwen's per-layer windows (max_window_layers)
    raise ModelLoadError(f"{where}: use_sliding_window=true is not supported; only full attention is")
  window = hf.get("sliding_window") if q.windowed else None  # Qwen's is off unless used
  if float(hf.get("partial_rotary_factor") or 1.0) != 1.0:
    raise ModelLoadError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported; only "
                         "rotary embeddings over the whole head are")
  hidden = int(require_hf(hf, "hidden_size", where))
  heads = int(require_hf(hf, "num_attention_heads", where))
  attention_bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
      family=name,
      vocab_size=int(require_hf(hf, "vocab_size", where)),
      hidden_size=hidden,
      num_layers=int(require_hf(hf, "num_hidden_layers", where)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      intermediate_size=int(require_hf(hf, "intermediate_size", where)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      norm_eps=float(hf.get("rms_norm_eps", q.norm_eps)),
      activation=check_activation(hf.get("hidden_act", "silu"), where),
      rope=rope_from_hf(hf, where, default_theta=q.rope_theta),
      qkv_bias=attention_bias if q.qkv_bias is None else q.qkv_bias,
      o_bias=attention_bias if q.qkv_bias is None else False,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=q.qk_norm,
      sliding_window=int(window or 0),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **(q.experts.from_hf(hf, where) if q.experts else {}))


def routed_experts(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """num_experts and num_experts_per_tok of a MoE `config.json`, whichever key holds the expert count."""
  # Hub files say `num_experts` (Qwen3-MoE) or `num_local_experts` (Mixtral); transformers 5 writes the
  # latter for both.
  counts = {k: int(hf[k]) for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
  if not counts:
    raise ModelLoadError(f"{where}: config.json has no 'num_experts', which the {hf['model_type']} family needs")
  if len(set(counts.values())) > 1:
    raise ModelLoadError(f"{where}: num_experts and num_local_experts disagree ({counts})")
  return dict(num_experts=next(iter(counts.values())),
              num_experts_per_tok=int(require_hf(hf, "num_experts_per_tok", where)))


def _to_hf(q: Quirks, cfg: ModelConfig) -> dict[str, Any]:
  out = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": cfg.activation,
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings, **rope_to_hf(cfg.rope), **q.hf_keys(cfg),
  }
  if q.windowed:
    out["sliding_window"] = cfg.sliding_window or None
  if q.experts:
    out.update(q.experts.to_hf(cfg))
  return out


def _from_arch(name: str, q: Quirks, arch: Mapping[str, Any]) -> ModelConfig:
  experts = {}
  if q.experts:
    experts = dict(num_experts=arch["num_experts"], num_experts_per_tok=arch["num_experts_per_tok"],
                   moe_intermediate_size=arch["moe_intermediate_size"] or arch["intermediate_size"],
                   norm_topk_prob=arch["norm_topk_prob"], decoder_sparse_step=arch["decoder_sparse_step"])
  return ModelConfig(
      family=name, vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], num_layers=arch["num_layers"],
      num_heads=arch["num_heads"], num_kv_heads=arch["num_kv_heads"],
      head_dim=arch["hidden_size"] // arch["num_heads"], intermediate_size=arch["intermediate_size"],
      max_position_embeddings=arch["max_position_embeddings"], norm_eps=q.norm_eps,
      rope=RopeConfig(theta=q.rope_theta), qkv_bias=bool(q.qkv_bias), qk_norm=q.qk_norm,
      sliding_window=arch["sliding_window"], tie_word_embeddings=arch["tie_word_embeddings"], **experts)


def _check_arch(q: Quirks, arch: Mapping[str, Any], where: str) -> None:
  heads = arch["num_heads"]
  check(heads % arch["num_kv_heads"] == 0, where, "num_kv_heads", arch["num_kv_heads"],
        f"a divisor of num_heads={heads}")
  check((arch["hidden_size"] // heads) % 2 == 0, where, "num_heads", heads,
        "a value giving an even head_dim (rotary embeddings)")
  q.check_arch(arch, where)


def _expert_rules(q: Quirks, cfg: ModelConfig, hf_layer: str, flax_mlp: Path, fused: bool) -> list[Rule]:
  """Router and stacked expert kernels of one sparse layer, in the per-expert or the fused layout."""
  if fused:
    return [*linear(f"{hf_layer}.mlp.gate", flax_mlp + ("router",), False),
            Rule(f"{hf_layer}.mlp.experts.gate_up_proj", (flax_mlp + ("gate",), flax_mlp + ("up",)), transpose=True),
            Rule(f"{hf_layer}.mlp.experts.down_proj", (flax_mlp + ("down",),), transpose=True)]
  hf_moe = f"{hf_layer}.{q.experts.module}"
  rules = linear(f"{hf_moe}.gate", flax_mlp + ("router",), False)
  for flax_name, hf_name in q.experts.names:
    rules.append(Rule(f"{hf_moe}.experts.{{e}}.{hf_name}.weight", (flax_mlp + (flax_name,),), transpose=True,
                      stack=cfg.num_experts))
  return rules


def _rules(q: Quirks, cfg: ModelConfig, fused_experts: bool) -> list[Rule]:
  rules = [Rule("model.embed_tokens.weight", (("embed", "embedding"),))]
  for i in range(cfg.num_layers):
    hf, fx = f"model.layers.{i}", (f"layers_{i}",)
    rules += norm(f"{hf}.input_layernorm", fx + ("attn_norm",), False)
    rules += norm(f"{hf}.post_attention_layernorm", fx + ("mlp_norm",), False)
    if q.fused_projections:  # q, k and v rows in one matrix
      rules.append(Rule(f"{hf}.self_attn.qkv_proj.weight", tuple(fx + ("attn", n, "kernel") for n in "qkv"),
                        transpose=True))
      rules += linear(f"{hf}.self_attn.o_proj", fx + ("attn", "o"), cfg.o_bias)
    else:
      rules += attention_rules(hf, fx, cfg)
    if cfg.is_sparse_layer(i):
      rules += _expert_rules(q, cfg, hf, fx + ("mlp",), fused_experts)
    elif q.fused_projections:  # gate rows first, then up
      rules.append(Rule(f"{hf}.mlp.gate_up_proj.weight", (fx + ("mlp", "gate", "kernel"), fx + ("mlp", "up", "kernel")),
                        transpose=True))
      rules += linear(f"{hf}.mlp.down_proj", fx + ("mlp", "down"), False)
    else:
      for name in ("gate", "up", "down"):
        rules += linear(f"{hf}.mlp.{name}_proj", fx + ("mlp", name), cfg.mlp_bias)
  rules += norm("model.norm", ("final_norm",), False)
  if not cfg.tie_word_embeddings:
    rules += linear("lm_head", ("lm_head",), False)
  return rules
