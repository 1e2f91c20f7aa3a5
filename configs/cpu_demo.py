"""Offline CPU run: distil a small random Llama teacher into a smaller student on the built-in corpus.

Command (no download, any laptop CPU):
    python -m jaxdistill.train --config configs/cpu_demo.py --workdir runs/cpu_demo
Corpus: the docstrings of the Python standard library (`builtin:stdlib_docs`), byte-level
tokenizer. Sized for 2 CPU cores: a few minutes. `:smoke` finishes in well under a minute and is
what the test suite runs. (The teacher here is untrained; a trained-teacher demo comes with the
plain-LM mode.)
"""

from jaxdistill import config as config_lib


def get_config(arg=None):
  smoke = arg == "smoke"
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = config_lib.base_config()
  cfg.tokenizer = "byte"                       # built-in UTF-8 byte tokenizer: 257 tokens, nothing to download
  cfg.teacher = config_lib.model_group(arch=dict(
      family="llama", hidden_size=64 if smoke else 128, num_layers=2 if smoke else 4, num_heads=4,
      num_kv_heads=2, intermediate_size=128 if smoke else 256, max_position_embeddings=512))
  cfg.student = config_lib.model_group(arch=dict(
      family="llama", hidden_size=32 if smoke else 64, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=64 if smoke else 128, max_position_embeddings=512))
  cfg.data.source = "builtin:stdlib_docs"      # offline corpus
  cfg.data.seq_len = 32 if smoke else 128      # tokens per sequence
  cfg.data.batch_size = 4 if smoke else 8      # sequences per micro-batch
  cfg.data.max_documents = 300 if smoke else 4000
  cfg.data.max_eval_batches = 2 if smoke else 20
  cfg.optim.accumulation_steps = 2             # micro-batches per optimizer step
  cfg.optim.learning_rate = 3e-3
  cfg.optim.warmup_steps = 5 if smoke else 50
  cfg.train.epochs = 1
  cfg.train.max_steps = 12 if smoke else 600   # optimizer steps
  cfg.train.eval_every_steps = 5 if smoke else 100
  cfg.checkpoint.every_steps = 5 if smoke else 200
  cfg.log.every_steps = 1 if smoke else 10
  cfg.log.debug_every_steps = 5 if smoke else 100
  cfg.log.curriculum_every_steps = 5 if smoke else 100
  return cfg
