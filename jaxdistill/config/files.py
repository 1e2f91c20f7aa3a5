"""Config files and command-line overrides.

Config files (`configs/*.py`) define `get_config(arg=None)` returning an `ml_collections.ConfigDict`
built from `base_config()`; `--config configs/NAME.py:smoke` passes `arg='smoke'`, and
`--config.student.dtype=bfloat16` overrides one field (absl `config_flags`; the dict is locked, so
a misspelt field is an error). `parse` (from `schema.py`) checks every field once and returns
frozen dataclasses; nothing past it sees a ConfigDict.
"""

import dataclasses
import importlib.util
import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from jaxdistill.cli import one_line
from jaxdistill.config.schema import CheckpointSpec, DebugSpec, DistillSpec, LogSpec, StagesSpec, TrainSpec
from jaxdistill.data.pipeline import DataConfig
from jaxdistill.errors import CommandLineError, ConfigError
from jaxdistill.objective import curriculum_config
from jaxdistill.objective.offline_teacher import OfflineTeacherSpec
from jaxdistill.objective.on_policy import OnPolicySpec
from jaxdistill.objective.router import RouterConfig
from jaxdistill.parallel import MeshSpec
from jaxdistill.training.monitor import MonitorConfig
from jaxdistill.training.optim import OptimConfig

# ---------------------------------------------------------------------------------------------
# Building blocks for config files.

def model_group(name_or_path: str = "", *, arch: dict | None = None, param_dtype: str = "float32",
                dtype: str = "float32", revision: str = "main", remat: str = "none", attention: str = "auto",
                attention_block: int = 512, scan_layers: bool = True) -> ml_collections.ConfigDict:
  """The `teacher`/`student` group. Either a checkpoint (`name_or_path`) or a random `arch`."""
  return ml_collections.ConfigDict({
      "name_or_path": name_or_path,  # HF hub id or local checkpoint dir; '' builds `arch` with random weights
      "revision": revision,          # hub branch, tag or commit
      "arch": arch_group(**(arch or {})),
      "param_dtype": param_dtype,    # storage dtype: float32 | bfloat16 | float16
      "dtype": dtype,                # compute dtype: float32 | bfloat16 | float16
      "remat": remat,                # what each block keeps for the backward pass: none | full | dots |
                                     # dots_no_batch (models/config.py REMAT_POLICIES); trained models only
      "attention": attention,        # auto (cuDNN flash attention on GPUs >= sm_80 in fp16/bf16, else blockwise) |
                                     # cudnn | blockwise (query blocks, no L x L kept) | xla (materialised)
      "attention_block": attention_block,  # query rows per block: blockwise attention and the attention losses
      "scan_layers": scan_layers,    # each stack of identical blocks as one lax.scan (compile time flat in depth)
  })


# The recommended recipe (docs/demo.md, "The recipe"): kd 0.7 and lm 0.3 at T = 1 in every phase, no auxiliary losses.
# On the demo it beat the original curriculum (below) and every other mix measured; base_config starts from it.
RECOMMENDED_CURRICULUM = dict(temperature=(1.0, 1.0, 1.0), attention=(0.0,), feature=(0.0,), layerwise=(0.0,),
                              contrastive=(0.0,))


def seed_recipe(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Puts back the original curriculum: KD at T = 2.0 / 1.75 / 1.5, then attention and routing from 30%,
  layerwise and contrastive from 60% (the registry's per-component defaults). The P100 configs and the
  benchmark config keep it, so that the original P100 run stays reproducible."""
  cfg.curriculum = curriculum_config().as_group()
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every field a run has, with defaults (the recommended recipe); config files fill in the models and sizes."""
  return ml_collections.ConfigDict({
      "seed": 0,                  # seeds initialisation and data order
      "mode": "distill",          # distill: teacher -> student; lm: plain LM training of `student` (no teacher)
      "teacher": model_group(),
      "student": model_group(),
      "tokenizer": "",            # HF id or dir, 'byte', or 'bpe:N'/'sp:N' (trained here); '': the student checkpoint's
      "teacher_tokenizer": "",    # the teacher's, where it differs (same forms); '': the teacher checkpoint's own,
                                  # or `tokenizer` for a random teacher. Two tokenizers: kd on text-aligned positions
      # The groups below take their fields and defaults from the dataclasses that document them:
      # DataConfig (jaxdistill/data/pipeline.py), DistillSpec (objective/spec.py), TrainSpec, CheckpointSpec,
      # LogSpec, StagesSpec (schema.py), OfflineTeacherSpec (offline_teacher.py), OnPolicySpec (on_policy.py),
      # CurriculumConfig (curriculum.py; its per-phase entries and their defaults from the loss components,
      # objective/registry.py), RouterConfig (router.py), OptimConfig (optim.py), MonitorConfig (monitor.py),
      # MeshSpec (parallel.py).
      "data": dataclasses.asdict(DataConfig()),
      "distill": dataclasses.asdict(DistillSpec()),
      "curriculum": curriculum_config(**RECOMMENDED_CURRICULUM).as_group(),
      "router": dataclasses.asdict(RouterConfig()),
      "optim": {k: v for k, v in dataclasses.asdict(OptimConfig()).items() if k != "total_steps"},
      "train": dataclasses.asdict(TrainSpec()),
      "checkpoint": dataclasses.asdict(CheckpointSpec()),
      "log": dataclasses.asdict(LogSpec()),
      "monitor": dataclasses.asdict(MonitorConfig()),
      "debug": dataclasses.asdict(DebugSpec()),
      "stages": dataclasses.asdict(StagesSpec()),   # teacher training before, scratch baseline after
      "offline_teacher": dataclasses.asdict(OfflineTeacherSpec()),  # teacher top-k records reused after epoch 1
      "on_policy": dataclasses.asdict(OnPolicySpec()),  # micro-batches sampled from the student (or the teacher)
      "mesh": dataclasses.asdict(MeshSpec()),       # devices: data / fsdp / tensor parallel ways, multi-host
  })


def arch_group(family: str = "llama", vocab_size: int = 0, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
               max_position_embeddings: int = 512, tie_word_embeddings: bool = True, num_experts: int = 0,
               num_experts_per_tok: int = 2, moe_intermediate_size: int = 0, norm_topk_prob: bool = True,
               decoder_sparse_step: int = 1, sliding_window: int = 0) -> ml_collections.ConfigDict:
  """Architecture of a randomly initialised model (used when `name_or_path` is empty).

  The keys are ModelConfig field names; the family (models/families/) gives every other field transformers'
  default for it and refuses values it cannot take.
  """
  return ml_collections.ConfigDict({
      "family": family,                        # a transformers model_type of models/families (SUPPORTED_FAMILIES;
                                               # docs/models.md); MoE: qwen3_moe, mixtral
      "vocab_size": vocab_size,                # 0: the tokenizer's vocabulary size
      "hidden_size": hidden_size,
      "num_layers": num_layers,
      "num_heads": num_heads,
      "num_kv_heads": num_kv_heads,            # < num_heads: grouped-query attention (not GPT-2)
      "intermediate_size": intermediate_size,  # MLP width (qwen3_moe: its dense blocks; mixtral: each expert)
      "max_position_embeddings": max_position_embeddings,
      "tie_word_embeddings": tie_word_embeddings,
      # Mixture of experts (qwen3_moe, mixtral only; transformers' Qwen3MoeConfig meaning).
      "num_experts": num_experts,              # routed experts per sparse layer; 0 for the dense families
      "num_experts_per_tok": num_experts_per_tok,      # top-k experts mixed per token, in 1..num_experts
      "moe_intermediate_size": moe_intermediate_size,  # width of each expert; 0: intermediate_size (always, mixtral)
      "norm_topk_prob": norm_topk_prob,        # renormalise the top-k router weights to sum to 1 (always, mixtral)
      "decoder_sparse_step": decoder_sparse_step,      # block i is sparse when (i + 1) % step == 0 (1, mixtral)
      "sliding_window": sliding_window,        # windowed families (Family.windowed): each query sees itself and
                                               # the N - 1 keys before it, on every layer or on the family's
                                               # windowed ones; 0: full causal attention
  })


# ---------------------------------------------------------------------------------------------
# Loading.

class _ExistingConfigFile:
  """config_flags' config-file parser, but a missing file is one CommandLineError at once.

  config_flags defers a load failure to the first access, and then reports the module name it made up
  ('config_config') and a nested error; overrides (`--config.a.b=v`) would touch the failed load first.
  """

  def __init__(self, parser):
    self._parser = parser

  def parse(self, argument: str):
    path = argument.split(":", 1)[0]
    if not os.path.isfile(path):
      raise CommandLineError(f"--config: no config file {path!r}")
    return self._parser.parse(argument)

  def __getattr__(self, name):  # flag_type() and the rest of the absl ArgumentParser interface
    if name.startswith("_"):  # copy/pickle look these up before __init__ has run
      raise AttributeError(name)
    return getattr(self._parser, name)


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """`--config configs/NAME.py[:arg]` plus `--config.a.b=v` overrides; the loaded dict is locked."""
  holder = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cpu_demo.py:smoke.",
                                           flag_values=flag_values, lock_config=True)
  flag = flag_values[holder.name]
  flag.parser = _ExistingConfigFile(flag.parser)
  return holder


def loaded_config(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The value of the `--config` flag; a config file that failed to load becomes CommandLineError."""
  try:
    cfg = holder.value
    if cfg is not None:
      cfg.keys()  # a failed load yields a placeholder that raises on first use
  except Exception as e:  # config_flags defers a load failure to the first access
    raise CommandLineError(f"--config: {one_line(e)}") from None
  if cfg is None:
    raise CommandLineError("--config is required, e.g. --config configs/cpu_demo.py:smoke")
  return cfg


def config_module(path: str):
  """The config file at `path` as a module (config files build on each other through this)."""
  spec = importlib.util.spec_from_file_location(f"jaxdistill_config_{abs(hash(path))}", path)
  if spec is None or not os.path.isfile(path):
    raise CommandLineError(f"--config: no config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(config_arg: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py[:arg]` in-process, locked, with `{'a.b': value}` overrides applied."""
  path, _, arg = config_arg.partition(":")
  module = config_module(path)
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
    try:
      target[field] = value
    except TypeError as e:  # ConfigDict keeps each field's type
      raise ConfigError(key, value, f"a value of the field's type ({e})") from None
  return cfg
