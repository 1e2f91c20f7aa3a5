"""The forward benchmark's arithmetic (not its speed: timings belong in bench/RESULTS.md)."""

import jax

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
