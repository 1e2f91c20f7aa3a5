"""Shared entry-point plumbing: a quiet environment and one-line errors instead of tracebacks."""

import os
import sys
from typing import Callable, Sequence


def quiet_environment() -> None:
  """Silences TensorFlow/XLA/transformers start-up chatter; call before jax or transformers is imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """`absl.app.run(main)`, printing a `JaxDistillError` as one `error:` line with exit code 2."""
  from absl import app

  from jaxdistill.errors import JaxDistillError

  def guarded(argv):
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # jax logs backend probing at INFO through absl
    try:
      return main(argv)
    except JaxDistillError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      sys.exit(130)

  def parse_flags(argv):
    from jaxdistill.config import parse_command_line
    try:
      return parse_command_line(argv)
    except JaxDistillError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)
