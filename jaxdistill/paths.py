"""Local paths versus Hugging Face hub ids, for every name that may be either (checkpoints, tokenizers, data).

Imports nothing heavy, so the data package can use it as well as the models.
"""


def looks_like_local_path(name: str) -> bool:
  """Whether `name`, when nothing exists there, was meant as a local path rather than a hub id.

  Hub ids are 'name' or 'owner/name'. A name that starts with '.', '/' or '~', holds more than one '/', or
  holds a backslash can only be a path ('./x', '/data/x', '~/x', 'runs/a/student_hf'): a missing one is
  reported as missing instead of being looked up on the hub. Callers check existence first
  (`os.path.exists(os.path.expanduser(name))`); 'owner/name' stays a hub id when no such directory exists.
  """
  return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
