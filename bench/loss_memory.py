"""Peak temporary memory of the KD and LM losses (value and gradient), with and without chunking.

    python -m bench.loss_memory [--batch 4 --seq_len 512 --vocab 49152 --chunk_sizes 0,1024,512,256]

Figures come from XLA's compiled memory analysis of `value_and_grad` w.r.t. the student logits
(inputs: student and teacher logits in float32, or --dtype bfloat16), so they are exact for the
compiled program and need no accelerator. Chunk size 0 means unchunked.
"""

from jaxdistill import cli

cli.quiet_environment()

import functools  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdistill.objective import losses  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 4, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab", 49152, "Vocabulary size.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["0", "1024", "512", "256"], "Chunk sizes to compare; 0 = unchunked.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the logits fed to the losses.")


def loss_memory(loss: str, batch: int, seq_len: int, vocab: int, chunk_size: int, dtype=jnp.float32) -> dict:
  """Bytes XLA allocates for `value_and_grad` of one loss: its temporaries and its arguments."""
  logits = jax.ShapeDtypeStruct((batch, seq_len, vocab), dtype)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  if loss == "kd":
    fn = functools.partial(losses.kd_loss, temperature=2.0, chunk_size=chunk_size)
    args = (logits, logits, tokens)
  else:
    fn = lambda s, labels, mask: losses.lm_loss(s, labels, mask, chunk_size=chunk_size)  # noqa: E731
    args = (logits, tokens, tokens)
  analysis = jax.jit(jax.value_and_grad(fn)).lower(*args).compile().memory_analysis()
  return {"temp_bytes": analysis.temp_size_in_bytes, "argument_bytes": analysis.argument_size_in_bytes,
          "output_bytes": analysis.output_size_in_bytes}


def main(argv) -> None:
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  print(f"B={_BATCH.value} L={_SEQ_LEN.value} V={_VOCAB.value} logits {_DTYPE.value}; "
        f"one [B, L, V] float32 tensor = {_BATCH.value * _SEQ_LEN.value * _VOCAB.value * 4 / 2**20:,.0f} MiB")
  print(f"{'loss':4s} {'chunk':>6s} {'temporaries MiB':>16s} {'arguments MiB':>14s} {'gradient MiB':>13s}")
  for loss in ("kd", "lm"):
    for chunk in (int(c) for c in _CHUNKS.value):
      m = loss_memory(loss, _BATCH.value, _SEQ_LEN.value, _VOCAB.value, chunk, dtype)
      print(f"{loss:4s} {chunk or 'none':>6} {m['temp_bytes'] / 2**20:16,.0f} {m['argument_bytes'] / 2**20:14,.0f} "
            f"{m['output_bytes'] / 2**20:13,.0f}")


if __name__ == "__main__":
  cli.run(main)
