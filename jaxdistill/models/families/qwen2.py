"""Qwen2 (`Qwen2ForCausalLM`): biases on q, k and v (never on o); its sliding window is off unless used."""

from jaxdistill.models.families import llama_like

FAMILY = llama_like.family(
    "qwen2", "Qwen2ForCausalLM", qkv_bias=True,
    hf_keys=lambda cfg: {"use_sliding_window": False})
