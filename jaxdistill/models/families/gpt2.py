"""GPT-2 (`GPT2LMHeadModel`): LayerNorm, learned absolute positions, a gelu MLP, biases everywhere.

Its `Conv1D` layers store [in, out] (no transpose) and its fused `c_attn` is split into q, k and v.
It has no grouped-query attention: the arch group's num_kv_heads is not read.
"""

from typing import Any, Mapping

from jaxdistill.errors import ModelLoadError
from jaxdistill.models.config import ModelConfig, check_activation, require_hf
from jaxdistill.models.families.base import Family, Rule, linear, norm


def _from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
  if hf.get("reorder_and_upcast_attn"):
    raise ModelLoadError(f"{where}: reorder_and_upcast_attn=true is not supported")
  if not hf.get("scale_attn_weights", True):
    raise ModelLoadError(f"{where}: scale_attn_weights=false is not supported")
  hidden = int(require_hf(hf, "n_embd", where))
  return _model(
      vocab_size=int(require_hf(hf, "vocab_size", where)), hidden_size=hidden,
      num_layers=int(require_hf(hf, "n_layer", where)), num_heads=int(require_hf(hf, "n_head", where)),
      intermediate_size=int(hf.get("n_inner") or 4 * hidden),
      max_position_embeddings=int(require_hf(hf, "n_positions", where)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      activation=check_activation(hf.get("activation_function", "gelu_new"), where),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)))


def _from_arch(arch: Mapping[str, Any]) -> ModelConfig:
  return _model(**{k: arch[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                                        "max_position_embeddings", "tie_word_embeddings")})


def _model(hidden_size: int, num_heads: int, **fields) -> ModelConfig:
  """GPT-2's fixed choices; `fields` defaults are GPT2Config's."""
  fields = {"norm_eps": 1e-5, "activation": "gelu_new", **fields}
  return ModelConfig(family="gpt2", hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_heads,
                     head_dim=hidden_size // num_heads, norm="layer", gated_mlp=False, rope=None, qkv_bias=True,
                     o_bias=True, mlp_bias=True, **fields)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {
      "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size,
      "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_eps,
      "activation_function": cfg.activation, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
      "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_word_embeddings,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
  }


def _rules(cfg: ModelConfig, fused_experts: bool) -> list[Rule]:
  del fused_experts  # no experts
  rules = [Rule("transformer.wte.weight", (("embed", "embedding"),)),
           Rule("transformer.wpe.weight", (("pos_embed", "embedding"),))]
  for i in range(cfg.num_layers):
    hf, fx = f"transformer.h.{i}", (f"layers_{i}",)
    qkv = tuple(fx + ("attn", name) for name in ("q", "k", "v"))
    rules += [Rule(f"{hf}.attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), split_axis=1),
              Rule(f"{hf}.attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), split_axis=0)]
    for hf_name, flax_path in (("attn.c_proj", ("attn", "o")), ("mlp.c_fc", ("mlp", "fc")),
                               ("mlp.c_proj", ("mlp", "proj"))):
      rules += [Rule(f"{hf}.{hf_name}.weight", (fx + flax_path + ("kernel",),)),
                Rule(f"{hf}.{hf_name}.bias", (fx + flax_path + ("bias",),))]
    rules += norm(f"{hf}.ln_1", fx + ("attn_norm",), True)
    rules += norm(f"{hf}.ln_2", fx + ("mlp_norm",), True)
  rules += norm("transformer.ln_f", ("final_norm",), True)
  if not cfg.tie_word_embeddings:
    rules += linear("lm_head", ("lm_head",), False)
  return rules


FAMILY = Family(name="gpt2", architecture="GPT2LMHeadModel", from_hf=_from_hf, to_hf=_to_hf, from_arch=_from_arch,
                check_arch=lambda arch, where: None, weight_rules=_rules)
