"""Config files, command-line overrides and validation into typed, frozen dataclasses.

Config files (`configs/*.py`) define `get_config(arg=None)` returning an `ml_collections.ConfigDict`;
`--config configs/NAME.py:smoke` passes `arg='smoke'`, and `--config.student.dtype=bfloat16`
overrides one field (absl `config_flags`; the dict is locked, so a misspelt field is an error).
`parse` checks every field once and returns dataclasses; nothing past it sees a ConfigDict.
"""

import dataclasses
import importlib.util
import os
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxdistill.errors import CommandLineError, ConfigError
from jaxdistill.models.config import DTYPES, SUPPORTED_FAMILIES, ModelConfig, from_hf_config
from jaxdistill.tokenizer import BYTE_TOKENIZER


# ---------------------------------------------------------------------------------------------
# Building blocks for config files.

def model_group(name_or_path: str = "", *, arch: dict | None = None, param_dtype: str = "float32",
                dtype: str = "float32", revision: str = "main") -> ml_collections.ConfigDict:
  """The `teacher`/`student` group. Either a checkpoint (`name_or_path`) or a random `arch`."""
  return ml_collections.ConfigDict({
      "name_or_path": name_or_path,  # HF hub id or local checkpoint dir; '' builds `arch` with random weights
      "revision": revision,          # hub branch, tag or commit
      "arch": arch_group(**(arch or {})),
      "param_dtype": param_dtype,    # storage dtype: float32 | bfloat16 | float16
      "dtype": dtype,                # compute dtype: float32 | bfloat16 | float16
  })


def base_config() -> ml_collections.ConfigDict:
  """Every field a run has, with defaults; config files fill in the models and sizes."""
  return ml_collections.ConfigDict({
      "seed": 0,                  # seeds initialisation (and, later, data order)
      "teacher": model_group(),
      "student": model_group(),
      "tokenizer": "",            # HF id or dir, or 'byte'; '' uses the student's checkpoint
      "data": {
          "seq_len": 512,         # tokens per sequence
          "batch_size": 8,        # sequences per batch
      },
  })


def arch_group(family: str = "llama", vocab_size: int = 0, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               max_position_embeddings: int = 512, tie_word_embeddings: bool = True) -> ml_collections.ConfigDict:
  """Architecture of a randomly initialised model (used when `name_or_path` is empty)."""
  return ml_collections.ConfigDict({
      "family": family,                        # llama | qwen2 | qwen3 | gpt2
      "vocab_size": vocab_size,                # 0: the tokenizer's vocabulary size
      "hidden_size": hidden_size,
      "num_layers": num_layers,
      "num_heads": num_heads,
      "num_kv_heads": num_kv_heads,            # < num_heads: grouped-query attention (not GPT-2)
      "intermediate_size": intermediate_size,  # MLP width
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": tie_word_embeddings,
  })


# ---------------------------------------------------------------------------------------------
# Typed view.

@dataclasses.dataclass(frozen=True)
class ArchSpec:
  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  max_position_embeddings: int
  tie_word_embeddings: bool

  def model_config(self, vocab_size: int, param_dtype: str, dtype: str) -> ModelConfig:
    """The architecture as transformers would build it from these sizes (its defaults elsewhere)."""
    import transformers  # heavy import, only needed here

    kwargs = dict(vocab_size=self.vocab_size or vocab_size, hidden_size=self.hidden_size,
                  num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                  max_position_embeddings=self.max_position_embeddings,
                  tie_word_embeddings=self.tie_word_embeddings, bos_token_id=None, eos_token_id=None)
    if self.family == "gpt2":
      kwargs["n_inner"] = self.intermediate_size
    else:
      kwargs.update(intermediate_size=self.intermediate_size, num_key_value_heads=self.num_kv_heads,
                    head_dim=self.hidden_size // self.num_heads)  # Qwen3's default would be 128
    hf = transformers.AutoConfig.for_model(self.family, **kwargs).to_dict()
    return from_hf_config(hf, where=f"arch {self.family}").with_dtypes(param_dtype, dtype)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name_or_path: str
  revision: str
  arch: ArchSpec | None   # set when name_or_path is empty
  param_dtype: str
  dtype: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
  seq_len: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  teacher: ModelSpec
  student: ModelSpec
  tokenizer: str      # HF id/dir, or 'byte'; '' uses the student's checkpoint
  data: DataSpec


def _name(where: str, field: str) -> str:
  return f"{where}.{field}" if where else field


def _get(node: ml_collections.ConfigDict, field: str, where: str):
  if field not in node:
    raise ConfigError(_name(where, field), None, "the field is required")
  return node[field]


def _choice(node, field: str, where: str, allowed: Sequence[str]) -> str:
  value = _get(node, field, where)
  if value not in allowed:
    raise ConfigError(_name(where, field), value, f"one of {', '.join(allowed)}")
  return value


def _positive_int(node, field: str, where: str, minimum: int = 1) -> int:
  value = _get(node, field, where)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(_name(where, field), value, f"an integer >= {minimum}")
  return value


def _arch(node, where: str) -> ArchSpec:
  family = _choice(node, "family", where, SUPPORTED_FAMILIES)
  spec = ArchSpec(
      family=family,
      vocab_size=_positive_int(node, "vocab_size", where, minimum=0),
      hidden_size=_positive_int(node, "hidden_size", where),
      num_layers=_positive_int(node, "num_layers", where),
      num_heads=_positive_int(node, "num_heads", where),
      num_kv_heads=_positive_int(node, "num_kv_heads", where),
      intermediate_size=_positive_int(node, "intermediate_size", where),
      max_position_embeddings=_positive_int(node, "max_position_embeddings", where),
      tie_word_embeddings=bool(_get(node, "tie_word_embeddings", where)))
  if spec.hidden_size % spec.num_heads:
    raise ConfigError(f"{where}.num_heads", spec.num_heads, f"a divisor of hidden_size={spec.hidden_size}")
  if family != "gpt2" and spec.num_heads % spec.num_kv_heads:
    raise ConfigError(f"{where}.num_kv_heads", spec.num_kv_heads, f"a divisor of num_heads={spec.num_heads}")
  if family != "gpt2" and (spec.hidden_size // spec.num_heads) % 2:
    raise ConfigError(f"{where}.num_heads", spec.num_heads, "a value giving an even head_dim (rotary embeddings)")
  return spec


def _model(node, where: str) -> ModelSpec:
  name_or_path = _get(node, "name_or_path", where)
  if not isinstance(name_or_path, str):
    raise ConfigError(f"{where}.name_or_path", name_or_path, "a hub id, a local directory, or '' with an arch")
  return ModelSpec(
      name_or_path=name_or_path,
      revision=str(_get(node, "revision", where)),
      arch=None if name_or_path else _arch(_get(node, "arch", where), f"{where}.arch"),
      param_dtype=_choice(node, "param_dtype", where, DTYPES),
      dtype=_choice(node, "dtype", where, DTYPES))


def parse(cfg: ml_collections.ConfigDict) -> Config:
  """Validates a loaded config; the first bad field raises ConfigError naming field, value, allowed."""
  student = _model(_get(cfg, "student", ""), "student")
  tokenizer = _get(cfg, "tokenizer", "")
  if not tokenizer and not student.name_or_path:
    raise ConfigError("tokenizer", tokenizer,
                      f"a tokenizer id or directory, or '{BYTE_TOKENIZER}', when the student has no checkpoint")
  data = _get(cfg, "data", "")
  return Config(
      seed=_positive_int(cfg, "seed", "", minimum=0),
      teacher=_model(_get(cfg, "teacher", ""), "teacher"),
      student=student,
      tokenizer=tokenizer,
      data=DataSpec(seq_len=_positive_int(data, "seq_len", "data", minimum=2),
                    batch_size=_positive_int(data, "batch_size", "data")))


# ---------------------------------------------------------------------------------------------
# Loading.

def define_config_flag() -> flags.FlagHolder:
  """`--config configs/NAME.py[:arg]` plus `--config.a.b=v` overrides; the loaded dict is locked."""
  return config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cpu_demo.py:smoke.",
                                         lock_config=True)


def _one_line(e: Exception) -> str:
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
  except Exception as e:  # absl raises flags.Error; config_flags lets AttributeError/KeyError through
    raise CommandLineError(_one_line(e)) from None


def loaded_config(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The value of the `--config` flag; a config file that failed to load becomes CommandLineError."""
  try:
    cfg = holder.value
    if cfg is not None:
      cfg.keys()  # a failed load yields a placeholder that raises on first use
  except Exception as e:  # config_flags defers a load failure to the first access
    raise CommandLineError(f"--config: {_one_line(e)}") from None
  if cfg is None:
    raise CommandLineError("--config is required, e.g. --config configs/cpu_demo.py:smoke")
  return cfg


def load(config_arg: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:arg]` in-process, locked, with `{'a.b': value}` overrides applied."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location(f"jaxdistill_config_{abs(hash(path))}", path)
  if spec is None or not os.path.isfile(path):
    raise CommandLineError(f"--config: no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg.lock()
  for key, value in (overrides or {}).items():
    node, *rest = key.rsplit(".", 1)
    target = cfg
    if rest:
      for part in node.split("."):
        target = target[part]
    field = rest[0] if rest else node
    if field not in target:
      raise ConfigError(key, value, "an existing field (the config is locked)")
    target[field] = value
  return cfg
