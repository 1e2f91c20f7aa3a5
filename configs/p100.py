"""The original P100 pairing: a ~1B Qwen3-MoE teacher -> SmolLM-135M on one 16 GB P100, two tokenizers.

Command:
    python -m jaxdistill.train --config configs/p100.py --workdir runs/p100 \
        --config.teacher.name_or_path=DIR_OR_HUB_ID_OF_THE_MOE_TEACHER
The original P100 run distilled a ~1B mixture-of-experts teacher (Qwen3-MoE architecture,
Qwen's tokenizer) into SmolLM-135M (SmolLM's tokenizer). That teacher was a private checkpoint,
not a hub release: `TEACHER` below is where this config expects it; point
`teacher.name_or_path` at yours (any `qwen3_moe` or `mixtral` checkpoint that fits next to the
student, or a dense one). Each model reads the text in its own tokens: the data pipeline aligns
them on the character boundaries both share, kd compares the two vocabularies on those positions
(exact KL over the tokens with the same bytes, ULD over the rest; docs/two_tokenizers.md), and
the router mixes the teacher's real experts from its last sparse block.
Hardware: one P100 (16 GB, compute capability 6.0, no bf16): fp32 master weights with fp16 compute
and dynamic loss scaling for the student, an fp16 teacher. Micro-batch 4 x 512 student tokens (up to
576 teacher tokens for the same text), 16 micro-batches per optimizer step (the original P100 run's).
Same-tokenizer pair (SmolLM-360M -> SmolLM-135M): configs/p100_same_tokenizer.py.
`:smoke` swaps in a tiny random Qwen3-MoE teacher and a tiny Llama student with two tokenizers
trained locally on the built-in corpus ('sp:600' SentencePiece-style for the teacher, 'bpe:400'
byte-level BPE for the student), and runs offline on CPU in seconds.
"""

from jaxdistill import config as config_lib

TEACHER = "./checkpoints/qwen3-moe-1b"  # the original P100 run's MoE teacher: a local directory (./: never a hub id)


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}; allowed: smoke")
  cfg = config_lib.seed_recipe(config_lib.base_config())  # the original curriculum, reproduced
  cfg.tokenizer = ""                           # '': the student's own (SmolLM's)
  cfg.teacher_tokenizer = ""                   # '': the teacher checkpoint's own (Qwen's)
  cfg.teacher = config_lib.model_group(TEACHER, param_dtype="float16", dtype="float16")
  cfg.student = config_lib.model_group("HuggingFaceTB/SmolLM-135M", param_dtype="float32", dtype="float16",
                                       remat="full")  # recompute each block in the backward pass
  cfg.router.experts = "auto"                  # the MoE teacher's routed experts (its last sparse block)
  cfg.data.source = "HuggingFaceTB/smollm-corpus"  # hub dataset (text field 'text')
  cfg.data.subset = "cosmopedia-v2"
  cfg.data.max_documents = 200_000
  cfg.data.seq_len = 512                       # student tokens per sequence
  cfg.data.teacher_seq_len = 576               # teacher tokens for the same text (rows end at a shared boundary)
  cfg.data.batch_size = 4                      # sequences per micro-batch
  cfg.data.max_eval_batches = 200
  cfg.optim.accumulation_steps = 16            # micro-batches per optimizer step (the original P100 run)
  cfg.optim.learning_rate = 5e-5
  cfg.optim.warmup_steps = 500
  cfg.train.epochs = 3
  cfg.train.eval_every_steps = 500
  cfg.checkpoint.every_steps = 500
  cfg.checkpoint.keep = 3
  if arg == "smoke":
    smoke(cfg)
    cfg.tokenizer = "bpe:400"                  # two tokenizers trained locally on the built-in corpus
    cfg.teacher_tokenizer = "sp:600"
    cfg.teacher = config_lib.model_group(arch=dict(
        family="qwen3_moe", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=256))
    cfg.data.teacher_seq_len = 40
  return cfg


def smoke(cfg) -> None:
  """The P100 run's offline form: tiny Llama models, the built-in corpus, 6 steps of 4 micro-batches."""
  tiny = dict(family="llama", num_kv_heads=1, max_position_embeddings=256)
  cfg.teacher = config_lib.model_group(arch=dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                                                 **tiny))
  cfg.student = config_lib.model_group(arch=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                                 **tiny))
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
