"""SmolLM-360M -> SmolLM-135M on one 16 GB P100 (same tokenizer).

Command:
    python -m jaxdistill.smoke --config configs/p100.py --workdir runs/p100
Hardware: one P100 (16 GB, compute capability 6.0, no bf16): parameters and compute in fp32.
Both checkpoints come from the Hugging Face hub (or set `--config.teacher.name_or_path=DIR` and
`--config.student.name_or_path=DIR` to local copies). `:smoke` swaps in tiny random models of the
same family and runs offline on CPU in seconds.
"""

from jaxdistill import config as config_lib


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = config_lib.base_config()
  cfg.tokenizer = ""  # '' : the student's own tokenizer
  cfg.teacher = config_lib.model_group("HuggingFaceTB/SmolLM-360M")  # P100 has no bf16: fp32 throughout
  cfg.student = config_lib.model_group("HuggingFaceTB/SmolLM-135M")
  cfg.data.seq_len = 512       # tokens per sequence
  cfg.data.batch_size = 16     # sequences per micro-batch
  if arg == "smoke":
    cfg.tokenizer = "byte"
    tiny = dict(family="llama", num_kv_heads=1, max_position_embeddings=256)
    cfg.teacher = config_lib.model_group(arch=dict(hidden_size=64, num_layers=3, num_heads=4,
                                                   intermediate_size=128, **tiny))
    cfg.student = config_lib.model_group(arch=dict(hidden_size=32, num_layers=2, num_heads=2,
                                                   intermediate_size=64, **tiny))
    cfg.data.seq_len = 32
    cfg.data.batch_size = 2
  return cfg
