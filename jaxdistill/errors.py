"""User-facing errors: each one is printed as a single line by the entry points (`MissingInputsError`: a line
per missing input)."""


def first_line(e: BaseException) -> str:
  """The first non-blank line of an exception's message ('' if none): libraries' errors can run to pages."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else ""


class JaxDistillError(Exception):
  """Base class for errors the command-line programs report without a traceback."""


class ConfigError(JaxDistillError):
  """A config field holds a value that is not allowed."""

  def __init__(self, field: str, value, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config field '{field}' = {value!r} is not allowed: {allowed}")


class ModelLoadError(JaxDistillError):
  """A checkpoint could not be found, read or converted."""


class MissingInputsError(JaxDistillError):
  """Inputs a config names (models, tokenizers, data) that are not there: every one, each on its own line.

  `problems` are lines '<config field>: <what is wrong with its value>; <what to do>'. One problem is the
  whole message; several follow a line that counts them.
  """

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    lines = self.problems if len(self.problems) == 1 else (
        [f"{len(self.problems)} inputs of this config are missing (nothing was loaded):"] +
        [f"  {p}" for p in self.problems])
    super().__init__("\n".join(lines))


class CommandLineError(JaxDistillError):
  """The command line could not be parsed, or the config file could not be loaded."""
