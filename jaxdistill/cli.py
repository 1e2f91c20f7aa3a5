"""Shared entry-point plumbing: a quiet environment and one-line errors instead of tracebacks."""

import errno
import os
import sys
from typing import Callable, Sequence

from absl import flags

from jaxdistill.errors import CommandLineError, JaxDistillError


def quiet_environment() -> None:
  """Silences TensorFlow/XLA/transformers start-up chatter; call before jax or transformers is imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def one_line(e: Exception) -> str:
  """absl and config_flags errors can embed a traceback; keep the first and the last line."""
  message = e
  while isinstance(message, BaseException) and message.args:  # config_flags nests KeyError in AttributeError
    message = message.args[0]
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if isinstance(e, (AttributeError, KeyError)):
    return f"no such config field {lines[0]}. {' '.join(lines[1:])}".strip()
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def parse_command_line(argv: Sequence[str]) -> list[str]:
  """Parses the global absl flags (config file and overrides included), errors as CommandLineError."""
  try:
    return flags.FLAGS(argv)
  except JaxDistillError:  # already one clear line (a missing config file)
    raise
  except Exception as e:  # absl raises flags.Error; config_flags lets AttributeError/KeyError through
    raise CommandLineError(one_line(e)) from None


def disk_full_message(e: BaseException) -> str | None:
  """One line for a write that failed for want of space (an OSError, or a library's error quoting one)."""
  if isinstance(e, OSError) and e.errno == errno.ENOSPC:
    where = f" writing {e.filename}" if e.filename else ""
  elif "No space left on device" in str(e):
    where = ""
  else:
    return None
  return (f"no space left on device{where}; free space there or choose a --workdir on a larger disk (the "
          "checkpoints written so far are kept)")


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """`absl.app.run(main)`, printing a `JaxDistillError` as one `error:` line with exit code 2."""
  from absl import app

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
    except Exception as e:  # a full disk anywhere (metrics, export, data cache) is one line too
      message = disk_full_message(e)
      if message is None:
        raise
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  def parse_flags(argv):
    try:
      return parse_command_line(argv)
    except JaxDistillError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)
