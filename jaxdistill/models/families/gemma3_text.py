"""Gemma 3's text model (`Gemma3ForCausalLM`, model_type gemma3_text): the Gemma 2 block (families/gemma2.py)
with q/k norms, every sixth layer global (`sliding_window_pattern`), and a RoPE base of its own for the
windowed layers (`rope_local_base_freq`, 10k, against 1M with the checkpoint's scaling on the global ones).

No attention soft-cap: transformers ignores attn_logit_softcapping for Gemma 3, and so does this mapping;
the final logits are capped only where config.json says so. The multimodal `gemma3` checkpoints (a vision
tower around this model) are not a supported model_type.
"""

from jaxdistill.models.families import gemma2

FAMILY = gemma2.family("gemma3_text", "Gemma3ForCausalLM", global_every=6, pattern_key="sliding_window_pattern",
                       attn_logit_softcap=None, final_logit_softcap=0.0, max_position_embeddings=131072,
                       rope_theta=1e6, local_rope_theta=10000.0, qk_norm=True)
