"""Offline CPU demo: does distillation beat training the same student alone? Teacher, scratch and distilled.

Command (no download, any laptop CPU):
    python -m jaxdistill.train --config configs/cpu_demo.py --workdir runs/cpu_demo
Corpus: the docstrings of the Python standard library (`builtin:stdlib_docs`), byte-level
tokenizer. Three runs of the same training program, on the same train split (the eval split is
held out from all three):
  1. the teacher (a 4-layer Llama) trained by plain LM, kept in ~/.cache/jaxdistill/teachers under a
     hash of its config (`stages.teacher_steps`; a second run reuses it);
  2. the student (a 2-layer Llama) distilled from it with the recommended recipe (kd 0.7 + lm 0.3 at
     T = 1, `base_config`'s) -> WORKDIR;
  3. the same student, same initial weights, data order, steps and tokens, trained alone by plain LM
     -> WORKDIR/scratch (`stages.scratch_baseline`).
It ends with a table of held-out perplexity (WORKDIR/comparison.md) and the training curves
(WORKDIR/curves.png), and evaluation also samples 100 tokens after 16-token prompts from the student
and reports the teacher's NLL of them. On 2 CPU cores: about 10 min with the teacher to train (6 min
of it the teacher), 3 min 41 s with it cached; held-out perplexity teacher 4.29, scratch 6.28,
distilled 5.54: 37.4% of the gap (docs/demo.md). `:smoke` runs the same three stages on tiny
models in about a minute, through the original curriculum (at T = 1), so that every loss
component runs end to end. On-policy distillation is an override away (docs/on_policy.md;
this random-init student wants an off-policy warm-up first):
    --config.on_policy.fraction=0.5 --config.on_policy.start=0.3
`:cross` (and `:cross_smoke`) is the same demo across two tokenizers with a mixture-of-experts
teacher, the original P100 run's kind of pairing (`across_tokenizers` below).
"""

from jaxdistill import config as config_lib

ARGS = ("smoke", "cross", "cross_smoke")


def get_config(arg=None):
  if arg not in (None, "") + ARGS:
    raise ValueError(f"unknown config argument {arg!r}; allowed: {', '.join(ARGS)}")
  smoke = arg in ("smoke", "cross_smoke")
  cfg = config_lib.base_config()               # the recommended recipe: kd 0.7 + lm 0.3 at T = 1, no auxiliaries
  if smoke:  # the original curriculum at T = 1: every component runs end to end in the test suite
    config_lib.seed_recipe(cfg)
    cfg.curriculum.temperature = (1.0, 1.0, 1.0)
  cfg.tokenizer = "byte"                       # built-in UTF-8 byte tokenizer: 257 tokens, nothing to download
  cfg.teacher = config_lib.model_group(arch=dict(
      family="llama", hidden_size=64 if smoke else 128, num_layers=2 if smoke else 4, num_heads=4,
      num_kv_heads=2, intermediate_size=128 if smoke else 384, max_position_embeddings=512))
  cfg.student = config_lib.model_group(arch=dict(
      family="llama", hidden_size=32 if smoke else 64, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=64 if smoke else 192, max_position_embeddings=512))
  cfg.stages.teacher_steps = 8 if smoke else 1000   # plain-LM steps that train the teacher first (cached)
  cfg.stages.teacher_learning_rate = 3e-3
  cfg.stages.scratch_baseline = True           # the same student trained alone, for the comparison table
  # Sampled sequences (on-policy batches with on_policy.fraction > 0, and evaluation's samples): 16 tokens of a
  # row, 100 sampled. 116 tokens a sampled micro-batch cost the teacher's and the student's forwards (and the
  # sampler's) what the 128 of a data micro-batch do: on-policy and off-policy runs compare at equal FLOPs.
  cfg.on_policy.prompt_length = 16
  cfg.on_policy.completion_length = 100
  # A 257-token vocabulary: a whole batch's float32 logits are 1 MiB, so chunking the kd/lm
  # vocabulary work saves nothing and its loop costs 19% of the step (bench/RESULTS.md).
  cfg.distill.chunk_size = 0
  cfg.data.source = "builtin:stdlib_docs"      # offline corpus
  cfg.data.seq_len = 32 if smoke else 128      # tokens per sequence
  cfg.data.batch_size = 4 if smoke else 8      # sequences per micro-batch
  cfg.data.max_documents = 300 if smoke else 4000
  cfg.data.max_eval_batches = 2 if smoke else 20
  cfg.optim.accumulation_steps = 2             # micro-batches per optimizer step
  cfg.optim.learning_rate = 3e-3
  cfg.optim.warmup_steps = 5 if smoke else 50
  cfg.train.epochs = 1
  cfg.train.max_steps = 12 if smoke else 600   # optimizer steps of the student (distilled and scratch alike)
  cfg.train.eval_every_steps = 5 if smoke else 100
  cfg.checkpoint.every_steps = 5 if smoke else 200
  cfg.log.every_steps = 1 if smoke else 10
  cfg.log.debug_every_steps = 5 if smoke else 100
  cfg.log.curriculum_every_steps = 5 if smoke else 100
  if arg in ("cross", "cross_smoke"):
    across_tokenizers(cfg, smoke)
  return cfg


def across_tokenizers(cfg, smoke: bool) -> None:
  """`:cross`: the original P100 run's kind of pairing, offline: a Qwen3-MoE teacher reading its own tokens.

  The teacher is a 4-expert top-2 Qwen3-MoE (the same active width as the dense demo teacher) trained
  in a SentencePiece-style BPE ('sp:600'); the student reads a byte-level BPE ('bpe:400'), both trained
  locally on the built-in corpus. kd compares the vocabularies on text-aligned positions (the router,
  which mixes the teacher's real experts of its last sparse block, runs in `:cross_smoke` and with
  `config.seed_recipe`; here it cost more than it gave). The comparison table gives the teacher's loss
  per student token, so all three perplexities are over the same units. On 2 CPU cores: 8 min 40 s
  with the teacher to train, 2 min 32 s with it cached; held-out perplexity teacher 10.06, scratch
  16.84, distilled 15.03: 26.7% of the gap (docs/two_tokenizers.md).
  """
  cfg.tokenizer = "bpe:400"
  cfg.teacher_tokenizer = "sp:600"
  arch = cfg.teacher.arch
  arch.family = "qwen3_moe"
  arch.num_experts = 4
  arch.num_experts_per_tok = 2
  arch.moe_intermediate_size = arch.intermediate_size // 2
  cfg.data.seq_len = 32 if smoke else 64       # student tokens (about 1.7 characters each)
  cfg.data.teacher_seq_len = 40 if smoke else 72  # teacher tokens for the same text (about 0.88 per student token)
