"""Llama (`LlamaForCausalLM`): the Llama-like block as it is; `attention_bias` and `mlp_bias` are options."""

from jaxdistill.models.families import llama_like

FAMILY = llama_like.family(
    "llama", "LlamaForCausalLM",
    hf_keys=lambda cfg: {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias})
