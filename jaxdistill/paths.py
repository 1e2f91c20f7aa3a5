"""Local paths versus Hugging Face hub ids, for every name that may be either (checkpoints, tokenizers, data).

Imports nothing heavy, so the data package can use it as well as the models.
"""

import os

GGUF_SUFFIX = ".gguf"  # a single-file checkpoint: always a local file, never a hub id


def is_gguf(name: str) -> bool:
  """Whether `name` names a GGUF file (by its suffix, whether or not it exists)."""
  return name.lower().endswith(GGUF_SUFFIX)


def looks_like_local_path(name: str) -> bool:
  """Whether `name`, when nothing exists there, was meant as a local path rather than a hub id.

  Hub ids are 'name' or 'owner/name'. A name that starts with '.', '/' or '~', holds more than one '/', or
  holds a backslash can only be a path ('./x', '/data/x', '~/x', 'runs/a/student_hf'), and so is a name
  ending in '.gguf' (a model file): a missing one is reported as missing instead of being looked up on the
  hub. Callers check existence first (`os.path.exists(os.path.expanduser(name))`); 'owner/name' stays a hub
  id when no such directory exists.
  """
  return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or is_gguf(name)


def exists_locally(name: str) -> bool:
  """Whether something (a file or a directory) exists at `name`, '~' expanded."""
  return os.path.exists(os.path.expanduser(name))


def missing_local_path(name: str) -> str:
  """What is wrong with `name`, a local path (`looks_like_local_path`) where nothing exists."""
  if is_gguf(name):
    return f"file '{name}' does not exist (a .gguf name is a local file)"
  return f"directory '{name}' does not exist (a local path: hub ids are 'name' or 'owner/name')"
