"""Turns a validated config into its parts: the tokenizer and the teacher/student models."""

import contextlib
import os

import jax

from jaxdistill.config import Config, ModelSpec
from jaxdistill.errors import ModelLoadError
from jaxdistill.models import hf_io, transformer
from jaxdistill.models.config import to_hf_config
from jaxdistill.tokenizer import load_tokenizer


@contextlib.contextmanager
def _blame(field: str):
  """Prefixes a load error with the config field that named the missing or broken thing."""
  try:
    yield
  except ModelLoadError as e:
    raise ModelLoadError(f"{field}: {e}") from None


def build_tokenizer(cfg: Config):
  """The run's tokenizer: `cfg.tokenizer`, or the student checkpoint's when that is empty."""
  if cfg.tokenizer:
    with _blame("tokenizer"):
      return load_tokenizer(cfg.tokenizer, cfg.student.revision)
  with _blame("student.name_or_path"):
    return load_tokenizer(cfg.student.name_or_path, cfg.student.revision)


def check_teacher_tokenizer(cfg: Config, tokenizer) -> None:
  """Until cross-tokenizer distillation exists, a teacher checkpoint must share the run's vocabulary."""
  if not cfg.teacher.name_or_path:
    return
  teacher_vocab = _vocabulary(cfg.teacher.name_or_path, cfg.teacher.revision)
  if teacher_vocab is None:
    return  # a checkpoint without tokenizer files: nothing to compare against
  if teacher_vocab != tokenizer.get_vocab():
    raise ModelLoadError(
        f"teacher.name_or_path: the teacher's tokenizer ({len(teacher_vocab)} tokens) differs from the run's "
        f"({len(tokenizer)} tokens); token-level distillation needs one shared tokenizer: pick a teacher from the "
        f"student's family or set `tokenizer` to the teacher's")


def _vocabulary(name_or_path: str, revision: str) -> dict[str, int] | None:
  """A checkpoint's token -> id map, or None without tokenizer files.

  A `tokenizer.json` is read with the `tokenizers` library alone (importing transformers' tokenizer
  classes costs seconds); other formats go through `load_tokenizer`.
  """
  from tokenizers import Tokenizer

  try:
    path = hf_io.resolve(name_or_path, revision)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab(with_added_tokens=True)
    return load_tokenizer(name_or_path, revision).get_vocab()
  except ModelLoadError:
    return None


def build_model(spec: ModelSpec, vocab_size: int, rng: jax.Array, field: str) -> hf_io.Pretrained:
  """Loads `spec.name_or_path`, or initialises `spec.arch` (vocabulary from the tokenizer if unset).

  `field` names the config group ('teacher' or 'student') in error messages.
  """
  if spec.name_or_path:
    with _blame(f"{field}.name_or_path"):
      return hf_io.load_pretrained(spec.name_or_path, spec.revision, spec.param_dtype, spec.dtype)
  cfg = spec.arch.model_config(vocab_size, spec.param_dtype, spec.dtype)
  params = transformer.init_params(cfg, rng)
  return hf_io.Pretrained(config=cfg, params=params, hf_config=to_hf_config(cfg), path="")
