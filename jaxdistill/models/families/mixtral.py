"""Mixtral (`MixtralForCausalLM`): routed experts on every layer, always renormalised, a sliding window.

Its experts are `intermediate_size` wide and stored per expert as `block_sparse_moe.experts.{e}.w1/w3/w2`;
transformers' MixtralConfig defaults to rms_norm_eps 1e-5 and rope_theta 1e6 and has no attention biases.
"""

from typing import Any, Mapping

from jaxdistill.models.config import ModelConfig, require_hf
from jaxdistill.models.families import llama_like
from jaxdistill.models.families.base import check


def _experts_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
  return dict(llama_like.routed_experts(hf, where),
              moe_intermediate_size=int(require_hf(hf, "intermediate_size", where)), norm_topk_prob=True)


def _experts_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
          "intermediate_size": cfg.moe_intermediate_size}


def _check_arch(arch: Mapping[str, Any], where: str) -> None:
  """Only what transformers' Mixtral builds: every block sparse, renormalised, experts intermediate_size wide."""
  check(arch["norm_topk_prob"], where, "norm_topk_prob", arch["norm_topk_prob"],
        "True for mixtral (it always renormalises its top-k router weights)")
  check(arch["decoder_sparse_step"] == 1, where, "decoder_sparse_step", arch["decoder_sparse_step"],
        "1 for mixtral (every block is sparse)")
  width = arch["intermediate_size"]
  check(arch["moe_intermediate_size"] in (0, width), where, "moe_intermediate_size", arch["moe_intermediate_size"],
        f"0 or intermediate_size={width} for mixtral (its experts are intermediate_size wide)")


FAMILY = llama_like.family(
    "mixtral", "MixtralForCausalLM", qkv_bias=False, windowed=True, rope_theta=1e6, norm_eps=1e-5,
    check_arch=_check_arch,
    experts=llama_like.Experts(_experts_from_hf, _experts_to_hf, module="block_sparse_moe",
                               names=(("gate", "w1"), ("up", "w3"), ("down", "w2"))))
