"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 with routed experts on every `decoder_sparse_step`-th layer.

The experts follow transformers' Qwen3MoeConfig: `moe_intermediate_size` wide, top-k optionally
renormalised (`norm_topk_prob`), layers listed in `mlp_only_layers` kept dense.
"""

from typing import Any

from jaxdistill.models.config import ModelConfig, require_hf
from jaxdistill.models.families import llama_like, qwen3


def _experts_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
  return dict(llama_like.routed_experts(hf, where),
              moe_intermediate_size=int(require_hf(hf, "moe_intermediate_size", where)),
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
              decoder_sparse_step=int(1 if hf.get("decoder_sparse_step") is None else hf["decoder_sparse_step"]),
              mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))


def _experts_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {"num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
          "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
          "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.decoder_sparse_step,
          "mlp_only_layers": list(cfg.mlp_only_layers)}


FAMILY = llama_like.family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, hf_keys=qwen3.qwen3_keys,
                           experts=llama_like.Experts(_experts_from_hf, _experts_to_hf))
