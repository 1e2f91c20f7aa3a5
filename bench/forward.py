"""Times the compiled forward pass of a config's teacher and student.

    python -m bench.forward --config configs/cpu_demo.py [--repeats 10]

Reports compile time and the median over repeats of the step time (with device synchronisation)
as tokens/s, for the config's `data.batch_size` x `data.seq_len`.
"""

from jaxdistill import cli

cli.quiet_environment()

import statistics  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill.models import forward  # noqa: E402
from jaxdistill.training.build import build_model, build_tokenizer  # noqa: E402

_CONFIG = config_lib.define_config_flag()
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after the compiling one.")


def time_forward(model, batch_size: int, seq_len: int, repeats: int) -> dict:
  """Compile time and median seconds per forward of `model` on a full [batch_size, seq_len] batch."""
  ids_BxL = jax.random.randint(jax.random.key(0), (batch_size, seq_len), 0, model.config.vocab_size)
  mask_BxL = jnp.ones_like(ids_BxL)
  start = time.perf_counter()
  jax.block_until_ready(forward(model.params, model.config, ids_BxL, mask_BxL))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(forward(model.params, model.config, ids_BxL, mask_BxL))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {"compile_s": compile_s, "step_ms": median * 1e3, "tokens_per_s": batch_size * seq_len / median}


def main(argv) -> None:
  del argv
  cfg = config_lib.parse(config_lib.loaded_config(_CONFIG))
  tokenizer = build_tokenizer(cfg)
  teacher_rng, student_rng = jax.random.split(jax.random.key(cfg.seed))
  print(f"device: {jax.devices()[0].device_kind}  batch {cfg.data.batch_size} x seq {cfg.data.seq_len}")
  for name, spec, rng in (("teacher", cfg.teacher, teacher_rng), ("student", cfg.student, student_rng)):
    model = build_model(spec, len(tokenizer), rng, name)
    r = time_forward(model, cfg.data.batch_size, cfg.data.seq_len, _REPEATS.value)
    print(f"{name:8s} forward: compile {r['compile_s']:.2f} s, {r['step_ms']:.2f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
  cli.run(main)
