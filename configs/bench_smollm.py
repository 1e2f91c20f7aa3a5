"""Benchmark pairing: random models of SmolLM-360M's and SmolLM-135M's sizes, no download.

Command (a GPU; on a CPU it runs, slowly):
    python -m bench.step --config configs/bench_smollm.py --seq_lens 512,2048 --batch_sizes 4,8,16 --reference
The teacher has SmolLM-360M's shape (Llama, 960 wide, 32 blocks, 15 heads / 5 KV heads, MLP 2560)
and the student SmolLM-135M's (576 wide, 30 blocks, 9 / 3 heads, MLP 1536), both with the 49,152-token
vocabulary and tied embeddings, random weights: speed and memory do not depend on the weights, and
the benchmark feeds random token ids. The original full curriculum (kd, lm, attention, router,
layerwise, contrastive; `config.seed_recipe`) is compiled in, as in a real run of it. The student
recomputes each block in the backward pass (`remat='full'`); attention is cuDNN flash attention on
sm_80+ GPUs, blockwise elsewhere.
  (no arg)  bf16 compute, fp32 master weights for the student, a bf16 teacher (H100/H200 class).
  :p100     the P100 run's numerics and batch (`configs/p100_same_tokenizer.py`): fp16 compute with
            dynamic loss scaling, an fp16 teacher, 4 x 512 tokens per micro-batch, 16 micro-batches.
  :smoke    the same objective on tiny Llama models (byte vocabulary), for a CPU in seconds.
"""

from jaxdistill import config as config_lib

ARGS = ("p100", "smoke")
VOCAB = 49152


def get_config(arg=None):
  if arg not in (None, "") + ARGS:
    raise ValueError(f"unknown config argument {arg!r}; allowed: {', '.join(ARGS)}")
  p100 = arg == "p100"
  compute = "float16" if p100 else "bfloat16"
  cfg = config_lib.seed_recipe(config_lib.base_config())
  cfg.tokenizer = "byte"          # only for a training run's data; the benchmark draws ids over VOCAB
  cfg.teacher = config_lib.model_group(arch=dict(
      family="llama", vocab_size=VOCAB, hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5,
      intermediate_size=2560, max_position_embeddings=2048), param_dtype=compute, dtype=compute)
  cfg.student = config_lib.model_group(arch=dict(
      family="llama", vocab_size=VOCAB, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
      intermediate_size=1536, max_position_embeddings=2048), param_dtype="float32", dtype=compute,
      remat="full")                 # long sequences: each scanned block keeps only its input for the backward
                                    # pass (8 x 2048, kd + lm: 16 GB of XLA peak against 44 GB without)
  cfg.data.source = "builtin:stdlib_docs"
  cfg.data.seq_len = 512
  cfg.data.batch_size = 4 if p100 else 8
  cfg.optim.accumulation_steps = 16 if p100 else 1
  cfg.train.max_steps = 1000
  if arg == "smoke":
    cfg.teacher.arch.update(vocab_size=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_position_embeddings=64)
    cfg.student.arch.update(vocab_size=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_position_embeddings=64)
    cfg.data.seq_len = 32
    cfg.data.batch_size = 2
    cfg.optim.accumulation_steps = 2
  return cfg
