"""Turns a validated config into its parts: tokenizers, teacher and student, and a run's step set-up and state."""

import contextlib
import dataclasses
import os

import jax

from jaxdistill.config import Config, ModelSpec
from jaxdistill.data import alignment
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.errors import ConfigError, ModelLoadError
from jaxdistill.models import hf_io, transformer
from jaxdistill.models.config import ModelConfig, to_hf_config
from jaxdistill.objective import cross_vocab, init_heads
from jaxdistill.paths import is_gguf
from jaxdistill.training import state as state_lib
from jaxdistill.training import steps
from jaxdistill.training.optim import check_warmup, make_optimizer


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


def build_teacher_tokenizer(cfg: Config, tokenizer):
  """The teacher's tokenizer where it differs from the run's `tokenizer`; None where both are one tokenizer.

  `teacher_tokenizer` names it. Empty, it is the teacher checkpoint's own tokenizer, or the run's for a
  random-architecture teacher and for a checkpoint without tokenizer files. Two different tokenizers make
  the run distil across vocabularies on text-aligned positions (`data/alignment.py`, `cross_vocab.py`).
  """
  if cfg.teacher_tokenizer:
    with _blame("teacher_tokenizer"):
      teacher_tokenizer = load_tokenizer(cfg.teacher_tokenizer, cfg.teacher.revision)
  elif cfg.teacher.name_or_path:
    teacher_vocab = _vocabulary(cfg.teacher.name_or_path, cfg.teacher.revision)
    if teacher_vocab is None or teacher_vocab == tokenizer.get_vocab():
      return None  # no tokenizer files to go by, or the same vocabulary
    with _blame("teacher.name_or_path"):
      teacher_tokenizer = load_tokenizer(cfg.teacher.name_or_path, cfg.teacher.revision)
  else:
    return None
  return None if alignment.same_tokenizer(tokenizer, teacher_tokenizer) else teacher_tokenizer


def has_tokenizer(spec: ModelSpec) -> bool:
  """Whether the checkpoint `spec` names has tokenizer files (False for a random architecture)."""
  return bool(spec.name_or_path) and _vocabulary(spec.name_or_path, spec.revision) is not None


def check_cross_vocab_objective(cfg: Config) -> None:
  """Refuses, before the data is built, what two tokenizers cannot serve: the objective aligned across them
  checks every enabled component (kd is the cross-vocabulary forward KL, `cross_vocab.py`; no records)."""
  dataclasses.replace(cfg.objective, aligned=True)


def vocab_map(tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int) -> cross_vocab.VocabMap:
  """How the two tokenizers' ids correspond, for models with `student_vocab` and `teacher_vocab` output ids."""
  return cross_vocab.VocabMap.from_pairs(*alignment.vocab_mapping(tokenizer, teacher_tokenizer), student_vocab,
                                         alignment.prefix_mapping(tokenizer, teacher_tokenizer), teacher_vocab)


def _vocabulary(name_or_path: str, revision: str) -> dict[str, int] | None:
  """A checkpoint's token -> id map, or None without tokenizer files.

  A `tokenizer.json` is read with the `tokenizers` library alone (importing transformers' tokenizer
  classes costs seconds); other formats, and a GGUF file's metadata, go through `load_tokenizer`.
  """
  from tokenizers import Tokenizer

  try:
    if is_gguf(name_or_path):
      return load_tokenizer(name_or_path, revision).get_vocab()
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
      model = hf_io.load_pretrained(spec.name_or_path, spec.revision, spec.param_dtype, spec.dtype)
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **spec.runtime()))
  cfg = spec.model_config(vocab_size)
  params = transformer.init_params(cfg, rng)
  return hf_io.Pretrained(config=cfg, params=params, hf_config=to_hf_config(cfg), path="")


def check_positions(model_config: ModelConfig, seq_len: int, field: str, model: str = "the model") -> None:
  """ConfigError when a model has fewer positions than the `seq_len` tokens it reads per sequence.

  `field` names the data field that set `seq_len`: 'data.seq_len' for the student, 'data.teacher_seq_len'
  (or 'data.seq_len' where that is 0) for the teacher; `model` says which one in the message. Past its
  `max_position_embeddings` a model is undefined (GPT-2's learned positions give NaN). Random architectures
  are checked at parse time (`schema.parse`); this covers checkpoints, whose limit is known once loaded.
  """
  limit = model_config.max_position_embeddings
  if seq_len > limit:
    raise ConfigError(field, seq_len, f"an integer <= {limit}, the max_position_embeddings of {model} "
                      f"({model_config.family})")


FP16_INITIAL_LOSS_SCALE = 2.0 ** 15


@dataclasses.dataclass
class Run:
  """What a compiled step needs, built one way for training and for the benchmarks.

  `state` holds the student's params (the `student` model keeps its config and export metadata,
  `params=None`); the teacher's params and `vocab_map` are placed on the mesh.
  """
  setup: steps.StepSetup
  state: state_lib.TrainState
  teacher: hf_io.Pretrained | None   # None: plain LM training
  student: hf_io.Pretrained
  vocab_map: cross_vocab.VocabMap | None  # two tokenizers: how their ids correspond


def init_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(teacher, student, heads) initialisation keys of `seed`: one split, so a seed means the same weights
  in training and in `bench/`."""
  teacher_key, student_key, heads_key = jax.random.split(jax.random.key(seed), 3)
  return teacher_key, student_key, heads_key


def build_run(cfg: Config, plan, total_steps: int, tokenizer, teacher_tokenizer=None,
              seq_len: int | None = None) -> Run:
  """Models, resolved objective, optimizer and a fresh placed state for `total_steps` optimizer steps.

  `teacher_tokenizer`: the teacher's own tokenizer where it differs (`build_teacher_tokenizer`), else None.
  `seq_len`: the student tokens per row (default `data.seq_len`; a benchmark sweeps it).
  """
  distill = cfg.mode == "distill"
  teacher_key, student_key, heads_key = init_keys(cfg.seed)
  teacher = build_model(cfg.teacher, alignment.vocab_size(teacher_tokenizer or tokenizer), teacher_key, "teacher") \
      if distill else None
  student = build_model(cfg.student, alignment.vocab_size(tokenizer), student_key, "student")
  seq_field = "data.seq_len"
  check_positions(student.config, seq_len or cfg.data.seq_len, seq_field, "the student")
  if distill:
    teacher_field = "data.teacher_seq_len" if cfg.data.teacher_seq_len and seq_len is None else seq_field
    check_positions(teacher.config, cfg.data.teacher_len if seq_len is None else seq_len, teacher_field, "the teacher")
    sampled = cfg.objective.on_policy
    if sampled.enabled:  # prompt plus completion, read by both models
      for model, name in ((student, "the student"), (teacher, "the teacher")):
        check_positions(model.config, sampled.length, "on_policy.completion_length", name)
  teacher_config = teacher.config if distill else None
  check_warmup(cfg.optim, total_steps)
  optim = dataclasses.replace(cfg.optim, total_steps=total_steps)
  aligned = distill and teacher_tokenizer is not None  # two tokenizers: the batches carry aligned pairs
  objective = dataclasses.replace(cfg.objective, total_steps=total_steps, aligned=aligned)
  objective = objective.resolve_layers(student.config, teacher_config)
  fp16 = student.config.dtype == "float16"
  setup = steps.StepSetup(objective, student.config, teacher_config, optim, dynamic_loss_scale=fp16,
                          eos_id=-1 if tokenizer.eos_token_id is None else tokenizer.eos_token_id)
  tx, _ = make_optimizer(optim)
  heads = init_heads(objective, student.config, teacher_config, heads_key)
  state = state_lib.create_placed_train_state(plan, student.params, heads, tx,
                                              FP16_INITIAL_LOSS_SCALE if fp16 else 1.0, cfg.seed)
  if distill:
    teacher = dataclasses.replace(teacher, params=plan.put(teacher.params, plan.teacher_shardings(teacher.params)))
  shared = None
  if aligned:
    shared = plan.replicate(vocab_map(tokenizer, teacher_tokenizer, student.config.vocab_size,
                                      teacher.config.vocab_size))
  return Run(setup, state, teacher, dataclasses.replace(student, params=None), shared)
