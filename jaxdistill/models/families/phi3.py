"""Phi-3 (`Phi3ForCausalLM`): fused qkv_proj and gate_up_proj tensors, a sliding window, rms_norm_eps 1e-5."""

from jaxdistill.models.families import llama_like

FAMILY = llama_like.family("phi3", "Phi3ForCausalLM", windowed=True, fused_projections=True, norm_eps=1e-5)
