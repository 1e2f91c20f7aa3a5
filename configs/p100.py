"""SmolLM-360M -> SmolLM-135M on one 16 GB P100 (same tokenizer), three epochs.

Command:
    python -m jaxdistill.train --config configs/p100.py --workdir runs/p100
Hardware: one P100 (16 GB, compute capability 6.0, no bf16): fp32 master weights with fp16 compute
and dynamic loss scaling for the student, an fp16 teacher. Micro-batch 4 x 512 tokens, 16
micro-batches per optimizer step (the seed run's accumulation). Both checkpoints come from the
Hugging Face hub; offline, set `--config.teacher.name_or_path=DIR` and
`--config.student.name_or_path=DIR` to local copies, and `--config.data.source` to local files.
`:smoke` swaps in tiny random models and the built-in corpus and runs offline on CPU in seconds.
"""

from jaxdistill import config as config_lib


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = config_lib.base_config()
  cfg.tokenizer = ""                           # '': the student's own tokenizer (shared with the teacher)
  cfg.teacher = config_lib.model_group("HuggingFaceTB/SmolLM-360M", param_dtype="float16", dtype="float16")
  cfg.student = config_lib.model_group("HuggingFaceTB/SmolLM-135M", param_dtype="float32", dtype="float16")
  cfg.data.source = "HuggingFaceTB/smollm-corpus"  # hub dataset (text field 'text')
  cfg.data.subset = "cosmopedia-v2"
  cfg.data.max_documents = 200_000
  cfg.data.seq_len = 512                       # tokens per sequence
  cfg.data.batch_size = 4                      # sequences per micro-batch
  cfg.data.max_eval_batches = 200
  cfg.optim.accumulation_steps = 16            # micro-batches per optimizer step (seed run)
  cfg.optim.learning_rate = 5e-5
  cfg.optim.warmup_steps = 500
  cfg.train.epochs = 3
  cfg.train.eval_every_steps = 500
  cfg.checkpoint.every_steps = 500
  cfg.checkpoint.keep = 3
  if arg == "smoke":
    cfg.tokenizer = "byte"
    tiny = dict(family="llama", num_kv_heads=1, max_position_embeddings=256)
    cfg.teacher = config_lib.model_group(arch=dict(hidden_size=64, num_layers=3, num_heads=4,
                                                   intermediate_size=128, **tiny))
    cfg.student = config_lib.model_group(arch=dict(hidden_size=32, num_layers=2, num_heads=2,
                                                   intermediate_size=64, **tiny))
    cfg.data.source = "builtin:stdlib_docs"
    cfg.data.subset = ""
    cfg.data.max_documents = 200
    cfg.data.seq_len = 32
    cfg.data.batch_size = 2
    cfg.data.max_eval_batches = 2
    cfg.optim.accumulation_steps = 4
    cfg.optim.warmup_steps = 2
    cfg.train.epochs = 1
    cfg.train.max_steps = 6
    cfg.train.eval_every_steps = 3
    cfg.checkpoint.every_steps = 3
    cfg.log.every_steps = 1
    cfg.log.debug_every_steps = 3
    cfg.log.curriculum_every_steps = 3
  return cfg
