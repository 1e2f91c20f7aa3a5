"""SmolLM-360M -> SmolLM-135M on one 16 GB P100 (one shared tokenizer), three epochs.

Command:
    python -m jaxdistill.train --config configs/p100_same_tokenizer.py --workdir runs/p100_same_tokenizer
The P100 settings of configs/p100.py (fp32 master weights, fp16 compute with dynamic loss scaling,
an fp16 teacher, 4 x 512 tokens, 16 micro-batches per step), with a teacher from the student's own
family, so both read the same tokens and kd compares the full vocabularies position by position.
Both checkpoints come from the Hugging Face hub; offline, set `--config.teacher.name_or_path=DIR` and
`--config.student.name_or_path=DIR` to local copies, and `--config.data.source` to local files.
`:smoke` swaps in tiny random models, the byte tokenizer and the built-in corpus (offline, seconds).
"""

import os

from jaxdistill import config as config_lib

P100 = config_lib.config_module(os.path.join(os.path.dirname(__file__), "p100.py"))


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = P100.get_config()
  cfg.teacher = config_lib.model_group("HuggingFaceTB/SmolLM-360M", param_dtype="float16", dtype="float16")
  cfg.router.experts = "blocks"                # a dense teacher: E evenly spaced blocks
  cfg.data.teacher_seq_len = 0                 # one tokenizer: the teacher reads the student's 512 tokens
  if arg == "smoke":
    P100.smoke(cfg)
    cfg.tokenizer = "byte"
  return cfg
