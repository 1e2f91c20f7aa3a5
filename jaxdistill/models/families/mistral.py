"""Mistral (`MistralForCausalLM`): the Llama block with a sliding window on every layer."""

from jaxdistill.models.families import llama_like

FAMILY = llama_like.family("mistral", "MistralForCausalLM", windowed=True)
