"""Times `sampling.generate` with and without the KV cache on the same model and prompts.

    python -m bench.generate [--batch_size 8] [--prompt_len 32] [--max_new_tokens 256] [--repeats 3]
        [--hidden_size 64 --num_layers 2 --num_heads 4 --num_kv_heads 2 --intermediate_size 192
         --vocab_size 257 --max_position_embeddings 512]

The default model is the demo student of `configs/cpu_demo.py` (Llama, random weights), the prompts
random tokens left-padded to `--prompt_len` (row lengths spread from half of it to all of it). Each
mode is compiled and run once first, then timed over `--repeats` calls (median, `block_until_ready`);
tokens/s counts the generated tokens, batch_size x max_new_tokens per call. Greedy, so both modes
must produce the same tokens, which is checked. Prints a Markdown row for bench/RESULTS.md.
"""

from jaxdistill import cli

cli.quiet_environment()

import statistics  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import sampling  # noqa: E402
from jaxdistill.models import ModelConfig, init_params  # noqa: E402


def _define_flags() -> None:
  """The command line (defined only when run as a program, so tests can import this module)."""
  flags.DEFINE_integer("batch_size", 8, "Prompts per call.")
  flags.DEFINE_integer("prompt_len", 32, "Columns of the left-padded prompts.")
  flags.DEFINE_integer("max_new_tokens", 256, "Tokens generated per prompt.")
  flags.DEFINE_integer("repeats", 3, "Timed calls per mode after the compiling one.")
  flags.DEFINE_integer("hidden_size", 64, "Model width.")
  flags.DEFINE_integer("num_layers", 2, "Blocks.")
  flags.DEFINE_integer("num_heads", 4, "Query heads.")
  flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads.")
  flags.DEFINE_integer("intermediate_size", 192, "MLP width.")
  flags.DEFINE_integer("vocab_size", 257, "Vocabulary (257: the demo's byte-level tokenizer).")
  flags.DEFINE_integer("max_position_embeddings", 512, "Positions; must hold prompt_len + max_new_tokens.")


def time_generate(params, cfg: ModelConfig, ids_BxP, mask_BxP, max_new_tokens: int, kv_cache: bool,
                  repeats: int) -> dict:
  """Compile-and-run seconds, median seconds per greedy `generate` call, generated tokens/s, and the tokens."""
  def call():
    return jax.block_until_ready(sampling.generate(params, cfg, ids_BxP, mask_BxP, jax.random.key(0),
                                                   max_new_tokens=max_new_tokens, temperature=0.0,
                                                   kv_cache=kv_cache))
  start = time.perf_counter()
  new_ids_BxN, _ = call()
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {"first_s": first_s, "call_s": median, "tokens_per_s": ids_BxP.shape[0] * max_new_tokens / median,
          "new_ids_BxN": np.asarray(new_ids_BxN)}


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  cfg = ModelConfig(family="llama", vocab_size=f.vocab_size, hidden_size=f.hidden_size, num_layers=f.num_layers,
                    num_heads=f.num_heads, num_kv_heads=f.num_kv_heads, head_dim=f.hidden_size // f.num_heads,
                    intermediate_size=f.intermediate_size, max_position_embeddings=f.max_position_embeddings)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  lengths = np.linspace(max(f.prompt_len // 2, 1), f.prompt_len, f.batch_size).astype(int)
  ids_BxP, mask_BxP = sampling.left_pad([rng.randint(0, f.vocab_size, n).tolist() for n in lengths], pad_id=0)
  uncached = time_generate(params, cfg, ids_BxP, mask_BxP, f.max_new_tokens, False, f.repeats)
  cached = time_generate(params, cfg, ids_BxP, mask_BxP, f.max_new_tokens, True, f.repeats)
  same = np.array_equal(uncached["new_ids_BxN"], cached["new_ids_BxN"])
  print(f"device: {jax.devices()[0].device_kind}; llama d={cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads, V={cfg.vocab_size}; first calls (compile + run): "
        f"uncached {uncached['first_s']:.1f} s, cached {cached['first_s']:.1f} s")
  print("| batch x prompt + new | uncached s/call | tokens/s | cached s/call | tokens/s | ratio | same tokens |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
  print(f"| {f.batch_size} x {f.prompt_len} + {f.max_new_tokens} | {uncached['call_s']:.3f} | "
        f"{uncached['tokens_per_s']:,.0f} | {cached['call_s']:.3f} | {cached['tokens_per_s']:,.0f} | "
        f"{cached['tokens_per_s'] / uncached['tokens_per_s']:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
