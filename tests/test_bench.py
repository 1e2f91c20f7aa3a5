"""The forward benchmark's arithmetic (not its speed: timings belong in bench/RESULTS.md)."""

import jax

from bench.forward import time_forward
from jaxdistill import models
from jaxdistill.models.hf_io import Pretrained


def test_time_forward_reports_consistent_figures():
  cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
  model = Pretrained(config=cfg, params=models.init_params(cfg, jax.random.key(0)), hf_config={}, path="")
  figures = time_forward(model, batch_size=2, seq_len=16, repeats=3)
  assert figures["compile_s"] > 0 and figures["step_ms"] > 0
  assert abs(figures["tokens_per_s"] - 2 * 16 / (figures["step_ms"] / 1e3)) < 1e-6 * figures["tokens_per_s"]
