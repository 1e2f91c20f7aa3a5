"""Qwen3 (`Qwen3ForCausalLM`): RMSNorm over head_dim on queries and keys."""

from typing import Any

from jaxdistill.models.config import ModelConfig
from jaxdistill.models.families import llama_like


def qwen3_keys(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json keys Qwen3 and Qwen3-MoE write beyond the Llama-like ones (their window is off)."""
  return {"attention_bias": cfg.qkv_bias, "use_sliding_window": False}


FAMILY = llama_like.family("qwen3", "Qwen3ForCausalLM", qk_norm=True, hf_keys=qwen3_keys)
