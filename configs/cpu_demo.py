"""Offline CPU run: a tiny random Llama teacher and a smaller student with a byte-level tokenizer.

Command (no download, any laptop CPU):
    python -m jaxdistill.smoke --config configs/cpu_demo.py --workdir runs/cpu_demo
Sized for 2 CPU cores: the whole run takes about 17 s, mostly imports and compilation; `:smoke`
is smaller still. It checks the model stack end to end: both forwards, the Hugging Face export of
the student and its reload in transformers (max |logit diff| about 1e-6 in fp32).
"""

from jaxdistill import config as config_lib


def get_config(arg=None):
  smoke = arg == "smoke"
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = config_lib.base_config()
  cfg.tokenizer = "byte"  # built-in UTF-8 byte tokenizer: 257 tokens, nothing to download
  cfg.teacher = config_lib.model_group(arch=dict(
      family="llama", hidden_size=64 if smoke else 128, num_layers=2 if smoke else 4, num_heads=4,
      num_kv_heads=2, intermediate_size=128 if smoke else 256, max_position_embeddings=512))
  cfg.student = config_lib.model_group(arch=dict(
      family="llama", hidden_size=32 if smoke else 64, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=64 if smoke else 128, max_position_embeddings=512))
  cfg.data.seq_len = 32 if smoke else 128      # tokens per sequence
  cfg.data.batch_size = 2 if smoke else 4      # sequences per batch
  return cfg
