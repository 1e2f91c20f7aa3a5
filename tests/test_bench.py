"""The forward benchmark's arithmetic (not its speed: timings belong in bench/RESULTS.md)."""

import chex
import jax
import pytest

from bench.forward import time_forward
from bench.loss_memory import loss_memory
from jaxdistill import models
from jaxdistill.models.hf_io import Pretrained


def test_time_forward_reports_consistent_figures():
  cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
  model = Pretrained(config=cfg, params=models.init_params(cfg, jax.random.key(0)), hf_config={}, path="")
  figures = time_forward(model, batch_size=2, seq_len=16, repeats=3)
  assert figures["compile_s"] > 0 and figures["step_ms"] > 0
  assert abs(figures["tokens_per_s"] - 2 * 16 / (figures["step_ms"] / 1e3)) < 1e-6 * figures["tokens_per_s"]


def test_chunking_shrinks_the_loss_temporaries():
  for loss in ("kd", "lm"):
    whole = loss_memory(loss, batch=2, seq_len=64, vocab=1000, chunk_size=0)["temp_bytes"]
    chunked = loss_memory(loss, batch=2, seq_len=64, vocab=1000, chunk_size=16)["temp_bytes"]
    one_logits_tensor = 2 * 64 * 1000 * 4
    assert whole >= 2 * one_logits_tensor and whole >= 5 * chunked, (loss, whole, chunked)


def _llama(**kw):
  sizes = dict(family="llama", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
               intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
  return models.ModelConfig(**{**sizes, **kw})


def test_model_flops_follow_the_stated_convention():
  from bench.step import matmul_params, peak_flops, step_flops_per_token

  # Per block: q 32x32, k and v 32x16, o 32x32, gate/up/down 3 x 32x64, two norms of 32; final norm 32;
  # the tied head 100x32 counts once, the input embedding not at all.
  per_block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
  student = _llama()
  assert matmul_params(student) == 2 * per_block + 32 + 100 * 32
  untied = _llama(tie_word_embeddings=False)
  assert matmul_params(untied) == matmul_params(student)  # the separate head is the same matmul
  # MoE: each block's 4 experts of width 16 count at 2 of 4; the router 32x4 counts whole.
  moe = _llama(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
  moe_block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 32 * 4 + 3 * 4 * 32 * 16 * 2 / 4 + 2 * 32
  assert matmul_params(moe) == 2 * moe_block + 32 + 100 * 32
  teacher = _llama(num_layers=3)
  expected = (6 * matmul_params(student) + 12 * 128 * 2 * 32) + (2 * matmul_params(teacher) + 4 * 128 * 3 * 32)
  assert step_flops_per_token(student, teacher, 128) == expected
  assert step_flops_per_token(student, None, 128) == 6 * matmul_params(student) + 12 * 128 * 2 * 32
  assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert peak_flops("Tesla P100-PCIE-16GB", "float16") == 18.7e12
  assert peak_flops("cpu", "float32") is None


def test_the_step_benchmark_times_whole_optimizer_steps():
  from bench.step import build, time_train_step
  from jaxdistill import config as config_lib

  cfg = config_lib.parse(config_lib.load("configs/bench_smollm.py:smoke"))  # the benchmark config's smoke form
  bench = build(cfg, batch_size=2, seq_len=16)
  # The trainer's set-up (build.build_run): the same seed gives the trainer's weights.
  from jaxdistill.data.alignment import vocab_size
  from jaxdistill.training.build import build_model, build_tokenizer, init_keys
  student = build_model(cfg.student, vocab_size(build_tokenizer(cfg)), init_keys(cfg.seed)[1], "student")
  chex.assert_trees_all_equal(jax.device_get(bench.state.params["student"]), student.params)
  assert len(bench.batches) == cfg.optim.accumulation_steps and bench.tokens_per_step == 2 * 16 * len(bench.batches)
  before = int(bench.state.step)
  r = time_train_step(bench, repeats=2)
  assert int(bench.state.step) == before + 3 * len(bench.batches)  # warm-up + 2 timed optimizer steps
  assert r["tokens_per_s"] == pytest.approx(bench.tokens_per_step / (r["step_ms"] / 1e3))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bench.state.params))
  assert r["xla_peak_bytes"] > 3 * param_bytes  # params, gradients and two Adam moments at least
  assert r["mfu"] is None  # no peak FLOP/s for a CPU
