"""Typed, frozen views of a config, and the validation that builds them.

`parse(cfg)` reads a loaded `ml_collections.ConfigDict` once: the first value that is not allowed
raises `ConfigError` naming the field, the value and what is allowed. Past this boundary models,
losses and the trainer only see these dataclasses.
"""

import dataclasses
from typing import Sequence

import ml_collections

from jaxdistill.cross_vocab import CROSS_VOCAB_KD
from jaxdistill.curriculum import CurriculumConfig, lm_only
from jaxdistill.curriculum import problem as curriculum_problem
from jaxdistill.data.pipeline import DataConfig
from jaxdistill.errors import ConfigError
from jaxdistill.losses import HIDDEN_DISTANCES, KD_MODES, TOPK_TAILS
from jaxdistill.models.config import (ATTENTION_IMPLEMENTATIONS, DTYPES, MOE_FAMILIES, REMAT_POLICIES, SUPPORTED_FAMILIES,
                                      WINDOWED_FAMILIES, ModelConfig, RopeConfig)
from jaxdistill.monitor import MonitorConfig
from jaxdistill.offline_teacher import OfflineTeacherSpec
from jaxdistill.offline_teacher import check as check_offline
from jaxdistill.objective import COMPONENTS, ObjectiveConfig
from jaxdistill.optim import OptimConfig, check_warmup
from jaxdistill.parallel import MeshSpec, check_spec
from jaxdistill.router import EXPERT_SOURCES, RouterConfig
from jaxdistill.tokenizer import BYTE_TOKENIZER

EVAL_METRICS = ("student_lm_loss", "loss", "kl_t1", "raw/kd", "raw/lm")
LM_EVAL_METRICS = ("student_lm_loss", "loss", "raw/lm")   # those a run without a teacher has
MODES = ("distill", "lm")   # distill: teacher -> student; lm: plain LM training of `student`, no teacher


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
  # Mixture of experts, read by the MoE families only (see `config.arch_group`).
  num_experts: int = 0               # 0: dense
  num_experts_per_tok: int = 2
  moe_intermediate_size: int = 0     # 0: intermediate_size
  norm_topk_prob: bool = True
  decoder_sparse_step: int = 1
  sliding_window: int = 0            # WINDOWED_FAMILIES only; 0: full causal attention

  def model_config(self, vocab_size: int, param_dtype: str, dtype: str) -> ModelConfig:
    """The architecture with the family's transformers defaults for everything not sized here."""
    vocab = self.vocab_size or vocab_size
    if self.family == "gpt2":
      return ModelConfig(
          family="gpt2", vocab_size=vocab, hidden_size=self.hidden_size, num_layers=self.num_layers,
          num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
          intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
          norm="layer", norm_eps=1e-5, activation="gelu_new", gated_mlp=False, rope=None, qkv_bias=True,
          o_bias=True, mlp_bias=True, tie_word_embeddings=self.tie_word_embeddings,
          param_dtype=param_dtype, dtype=dtype)
    mixtral = self.family == "mixtral"  # transformers' MixtralConfig: rms_norm_eps 1e-5, rope_theta 1e6
    eps = 1e-5 if self.family in ("mixtral", "phi3") else 1e-6  # and Phi3Config's rms_norm_eps
    return ModelConfig(
        family=self.family, vocab_size=vocab, hidden_size=self.hidden_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.hidden_size // self.num_heads,
        intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
        norm="rms", norm_eps=eps, activation="silu", gated_mlp=True,
        rope=RopeConfig(theta=1e6 if mixtral else 10000.0), qkv_bias=self.family == "qwen2",
        qk_norm=self.family in ("qwen3", "qwen3_moe"), tie_word_embeddings=self.tie_word_embeddings,
        sliding_window=self.sliding_window,
        param_dtype=param_dtype, dtype=dtype, **self._expert_fields())

  def _expert_fields(self) -> dict:
    """ModelConfig's expert fields: none for the dense families (their MoE settings are ignored)."""
    if self.family not in MOE_FAMILIES:
      return {}
    return dict(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size or self.intermediate_size,
                norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name_or_path: str
  revision: str
  arch: ArchSpec | None   # set when name_or_path is empty
  param_dtype: str
  dtype: str
  remat: str = "none"     # REMAT_POLICIES
  attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS
  attention_block: int = 512  # query rows per block (blockwise attention, attention losses)
  scan_layers: bool = True    # stacks of identical blocks run as one lax.scan

  def runtime(self) -> dict:
    """The fields that change how the model runs, not its weights (models/config.py RUNTIME_FIELDS)."""
    return dict(remat=self.remat, attention=self.attention, attention_block=self.attention_block,
                scan_layers=self.scan_layers)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The `train` group: how long, how often to evaluate, when to stop early."""
  epochs: int = 3                       # passes over the training split
  max_steps: int = 0                    # optimizer steps; 0: epochs x steps per epoch
  eval_every_steps: int = 500           # evaluation interval (and at the end)
  best_metric: str = "student_lm_loss"  # eval metric (lower is better) for the best checkpoint and early stopping
  early_stopping_patience: int = 0      # evaluations without improvement before stopping; 0: never
  allow_config_change: str = ""         # a resume may change these fields or groups (comma-separated, '*': any),
                                        # besides train/log/checkpoint/monitor/..., learning rates (fingerprint.py)


@dataclasses.dataclass(frozen=True)
class DebugSpec:
  """The `debug` group: fault-injection drills for the non-finite guard and the run monitor."""
  inject_nonfinite: str = ""            # component to make NaN in some batches ('' = never), e.g. 'kd'
  inject_every: int = 0                 # ...in every N-th micro-batch


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """The `checkpoint` group (orbax; epoch ends, the best eval and emergencies are saved too)."""
  every_steps: int = 1000               # periodic checkpoint interval in optimizer steps
  keep: int = 3                         # newest checkpoints kept (the best one is kept apart)


@dataclasses.dataclass(frozen=True)
class LogSpec:
  """The `log` group: what the user sees and what goes to metrics.jsonl / TensorBoard."""
  every_steps: int = 10                 # training records in metrics.jsonl
  debug_every_steps: int = 100          # [TRAIN DEBUG] block: raw, weight, weighted per component
  curriculum_every_steps: int = 500     # [CURRICULUM] block: step, progress, every weight
  tensorboard: bool = True              # also write WORKDIR/tensorboard
  progress_bar: bool = True             # tqdm bar with loss, learning rate, tokens/s and ETA


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """The `distill` group: how each loss is computed (its weight comes from the curriculum)."""
  kd_mode: str = "forward_kl"           # forward_kl | reverse_kl | jsd
  jsd_beta: float = 0.5                 # beta of the generalised JSD in [0, 1] (TRL's): 0 forward KL(teacher ||
                                        # student), 1 reverse KL(student || teacher), between: the JSD mixture
  kd_top_k: int = 0                     # KD over the teacher's top-k tokens; 0: full vocabulary
  kd_topk_tail: str = "renormalize"     # renormalize | other_bucket
  chunk_size: int = 512                 # tokens per float32 chunk in kd/lm; 0: no chunking
  cross_vocab_kd: str = "prefix"        # two tokenizers: prefix (teacher mass to the student token starting the
                                        # same text) | uld (shared tokens exact + ULD on the rest); cross_vocab.py
  uld_top_k: int = 128                  # two tokenizers: ranks of the vocabulary-free part of kd (uld)
  fill_unaligned: bool = True           # two tokenizers: kd at student positions with no aligned teacher position is
                                        # KL to the data's next token, so they keep kd's weight
  label_smoothing: float = 0.0          # of the lm cross-entropy, in [0, 1)
  attention_pairs: tuple = ()           # ((student block, teacher block), ...); (): the last blocks
  layer_map: tuple = ()                 # ((student, teacher) hidden_states index, ...); (): uniform
  hidden_distance: str = "nmse"         # nmse | cosine
  contrastive_temperature: float = 0.07
  expert_layers: tuple = ()             # teacher hidden_states indices the router mixes; (): evenly spaced


@dataclasses.dataclass(frozen=True)
class StagesSpec:
  """The `stages` group: a teacher trained before the distillation and a baseline after it."""
  teacher_steps: int = 0                # > 0: first train the random-arch teacher by plain LM for this many
                                        # optimizer steps on the run's data (cached, see teacher_cache)
  teacher_learning_rate: float = 0.0    # its peak learning rate; 0: optim.learning_rate
  teacher_cache: str = ""               # trained teachers, one directory per config hash; '': the user cache
                                        # ($XDG_CACHE_HOME or ~/.cache)/jaxdistill/teachers
  scratch_baseline: bool = False        # then train the same student alone (plain LM, same steps and data) in
                                        # WORKDIR/scratch and print teacher / scratch / distilled perplexity


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  mode: str           # MODES
  teacher: ModelSpec
  student: ModelSpec
  tokenizer: str      # HF id/dir, or 'byte'; '' uses the student's checkpoint
  teacher_tokenizer: str  # the teacher's where it differs; '' uses the teacher checkpoint's (or `tokenizer`)
  data: DataConfig
  objective: ObjectiveConfig   # layer pairs unresolved and total_steps 0 until the data is known
  optim: OptimConfig
  train: TrainSpec
  checkpoint: CheckpointSpec
  log: LogSpec
  monitor: MonitorConfig
  debug: DebugSpec
  stages: StagesSpec
  offline_teacher: OfflineTeacherSpec
  mesh: MeshSpec


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
      tie_word_embeddings=bool(_get(node, "tie_word_embeddings", where)),
      num_experts=_positive_int(node, "num_experts", where, minimum=0),
      num_experts_per_tok=_positive_int(node, "num_experts_per_tok", where),
      moe_intermediate_size=_positive_int(node, "moe_intermediate_size", where, minimum=0),
      norm_topk_prob=bool(_get(node, "norm_topk_prob", where)),
      decoder_sparse_step=_positive_int(node, "decoder_sparse_step", where),
      sliding_window=_positive_int(node, "sliding_window", where, minimum=0))
  _check(spec.sliding_window == 0 or family in WINDOWED_FAMILIES, where, "sliding_window", spec.sliding_window,
         f"0 for family {family} (sliding windows: {', '.join(WINDOWED_FAMILIES)})")
  if spec.hidden_size % spec.num_heads:
    raise ConfigError(f"{where}.num_heads", spec.num_heads, f"a divisor of hidden_size={spec.hidden_size}")
  if family != "gpt2" and spec.num_heads % spec.num_kv_heads:
    raise ConfigError(f"{where}.num_kv_heads", spec.num_kv_heads, f"a divisor of num_heads={spec.num_heads}")
  if family != "gpt2" and (spec.hidden_size // spec.num_heads) % 2:
    raise ConfigError(f"{where}.num_heads", spec.num_heads, "a value giving an even head_dim (rotary embeddings)")
  _arch_experts(spec, where)
  return spec


def _arch_experts(spec: ArchSpec, where: str) -> None:
  """Experts for the MoE families only, in settings transformers builds (Mixtral: every block, renormalised)."""
  family = spec.family
  if family not in MOE_FAMILIES:
    _check(spec.num_experts == 0, where, "num_experts", spec.num_experts,
           f"0 for the dense family {family} (experts need family {' or '.join(MOE_FAMILIES)})")
    return
  _check(spec.num_experts >= 1, where, "num_experts", spec.num_experts, f"an integer >= 1 for the MoE family {family}")
  _check(spec.num_experts_per_tok <= spec.num_experts, where, "num_experts_per_tok", spec.num_experts_per_tok,
         f"an integer in 1..num_experts={spec.num_experts}")
  _check(spec.decoder_sparse_step <= spec.num_layers, where, "decoder_sparse_step", spec.decoder_sparse_step,
         f"an integer in 1..num_layers={spec.num_layers} (a larger step leaves no sparse block)")
  if family == "mixtral":
    _check(spec.norm_topk_prob, where, "norm_topk_prob", spec.norm_topk_prob,
           "True for mixtral (it always renormalises its top-k router weights)")
    _check(spec.decoder_sparse_step == 1, where, "decoder_sparse_step", spec.decoder_sparse_step,
           "1 for mixtral (every block is sparse)")
    _check(spec.moe_intermediate_size in (0, spec.intermediate_size), where, "moe_intermediate_size",
           spec.moe_intermediate_size,
           f"0 or intermediate_size={spec.intermediate_size} for mixtral (its experts are intermediate_size wide)")


def _model(node, where: str) -> ModelSpec:
  name_or_path = _get(node, "name_or_path", where)
  if not isinstance(name_or_path, str):
    raise ConfigError(f"{where}.name_or_path", name_or_path, "a hub id, a local directory, or '' with an arch")
  return ModelSpec(
      name_or_path=name_or_path,
      revision=str(_get(node, "revision", where)),
      arch=None if name_or_path else _arch(_get(node, "arch", where), f"{where}.arch"),
      param_dtype=_choice(node, "param_dtype", where, DTYPES),
      dtype=_choice(node, "dtype", where, DTYPES),
      remat=_choice(node, "remat", where, REMAT_POLICIES),
      attention=_choice(node, "attention", where, ATTENTION_IMPLEMENTATIONS),
      attention_block=_positive_int(node, "attention_block", where),
      scan_layers=_flag(node, "scan_layers", where))


def _flag(node, field: str, where: str) -> bool:
  value = _get(node, field, where)
  if not isinstance(value, bool):
    raise ConfigError(_name(where, field), value, "True or False")
  return value


def _tuplify(value):
  return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def _group(node, cls, where: str, derived: Sequence[str] = ()) -> dict:
  """The fields of dataclass `cls` (but `derived` ones) read from `node`, each of its default's type."""
  values = {}
  for field in dataclasses.fields(cls):
    if field.name in derived:
      continue
    value = _get(node, field.name, where)
    default = field.default
    if isinstance(default, tuple):
      if not isinstance(value, (list, tuple)):
        raise ConfigError(_name(where, field.name), value, "a tuple")
      value = _tuplify(value)
    elif isinstance(default, bool) or isinstance(value, bool):
      if not isinstance(value, bool) or not isinstance(default, bool):
        raise ConfigError(_name(where, field.name), value, f"a {type(default).__name__}")
    elif isinstance(default, float) and isinstance(value, int):
      value = float(value)
    elif not isinstance(value, type(default)):
      raise ConfigError(_name(where, field.name), value, f"a {type(default).__name__}")
    values[field.name] = value
  return values


def _check(ok: bool, where: str, field: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(_name(where, field), value, allowed)


def _pairs_ok(value) -> bool:
  return all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p) for p in value)


def _objective(cfg, total_steps: int, mode: str) -> ObjectiveConfig:
  d = _group(_get(cfg, "distill", ""), DistillSpec, "distill")
  _check(d["kd_mode"] in KD_MODES, "distill", "kd_mode", d["kd_mode"], f"one of {', '.join(KD_MODES)}")
  _check(d["kd_topk_tail"] in TOPK_TAILS, "distill", "kd_topk_tail", d["kd_topk_tail"],
         f"one of {', '.join(TOPK_TAILS)}")
  _check(d["hidden_distance"] in HIDDEN_DISTANCES, "distill", "hidden_distance", d["hidden_distance"],
         f"one of {', '.join(HIDDEN_DISTANCES)}")
  _check(0 <= d["jsd_beta"] <= 1, "distill", "jsd_beta", d["jsd_beta"],
         "a number in [0, 1] (0: forward KL, 1: reverse KL)")
  _check(d["kd_top_k"] >= 0, "distill", "kd_top_k", d["kd_top_k"], "an integer >= 0 (0: full vocabulary)")
  _check(d["chunk_size"] >= 0, "distill", "chunk_size", d["chunk_size"], "an integer >= 0 (0: no chunking)")
  _check(d["cross_vocab_kd"] in CROSS_VOCAB_KD, "distill", "cross_vocab_kd", d["cross_vocab_kd"],
         f"one of {', '.join(CROSS_VOCAB_KD)}")
  _check(d["uld_top_k"] >= 1, "distill", "uld_top_k", d["uld_top_k"], "an integer >= 1")
  _check(0 <= d["label_smoothing"] < 1, "distill", "label_smoothing", d["label_smoothing"], "a number in [0, 1)")
  _check(d["contrastive_temperature"] > 0, "distill", "contrastive_temperature", d["contrastive_temperature"],
         "a number > 0")
  for field in ("attention_pairs", "layer_map"):
    _check(_pairs_ok(d[field]), "distill", field, d[field], "a tuple of (student, teacher) index pairs")
  _check(all(isinstance(e, int) and e >= 1 for e in d["expert_layers"]), "distill", "expert_layers",
         d["expert_layers"], "a tuple of teacher hidden_states indices >= 1")

  c = CurriculumConfig(**_group(_get(cfg, "curriculum", ""), CurriculumConfig, "curriculum"))
  problem = curriculum_problem(c)
  if problem:
    field, allowed = problem
    raise ConfigError(f"curriculum.{field}", getattr(c, field), allowed)

  if mode == "lm":
    c = lm_only(c)

  r = RouterConfig(**_group(_get(cfg, "router", ""), RouterConfig, "router"))
  _check(r.experts in EXPERT_SOURCES, "router", "experts", r.experts, f"one of {', '.join(EXPERT_SOURCES)}")
  _check(r.moe_layer >= -1, "router", "moe_layer", r.moe_layer, "-1 (the last sparse block) or a block index >= 0")
  _check(r.num_experts >= 1, "router", "num_experts", r.num_experts, "an integer >= 1")
  for field in ("top_k_start", "top_k_end"):
    _check(1 <= getattr(r, field) <= r.num_experts, "router", field, getattr(r, field),
           f"an integer in 1..num_experts={r.num_experts}")
  for field in ("temperature_start", "temperature_end"):
    _check(getattr(r, field) > 0, "router", field, getattr(r, field), "a number > 0")
  for field in ("load_balance_coef", "attention_alignment_coef"):
    _check(getattr(r, field) >= 0, "router", field, getattr(r, field), "a number >= 0")
  if d["expert_layers"]:
    _check(len(d["expert_layers"]) == r.num_experts, "distill", "expert_layers", d["expert_layers"],
           f"router.num_experts={r.num_experts} layer indices")

  return ObjectiveConfig(
      total_steps=total_steps, curriculum=c, router=r, kd_mode=d["kd_mode"], jsd_beta=d["jsd_beta"],
      kd_top_k=d["kd_top_k"], kd_topk_tail=d["kd_topk_tail"], chunk_size=d["chunk_size"],
      cross_vocab_kd=d["cross_vocab_kd"], uld_top_k=d["uld_top_k"], fill_unaligned=d["fill_unaligned"],
      label_smoothing=d["label_smoothing"], attention_pairs=d["attention_pairs"], layer_map=d["layer_map"],
      hidden_distance=d["hidden_distance"], contrastive_temperature=d["contrastive_temperature"],
      expert_layers=d["expert_layers"])


def _optim(cfg) -> OptimConfig:
  # total_steps is derived by the trainer from train.max_steps or train.epochs and the data.
  o = OptimConfig(**_group(_get(cfg, "optim", ""), OptimConfig, "optim", derived=("total_steps",)), total_steps=0)
  for field in ("learning_rate", "heads_learning_rate", "clip_norm", "eps"):
    _check(getattr(o, field) > 0, "optim", field, getattr(o, field), "a number > 0")
  for field, minimum in (("accumulation_steps", 1), ("warmup_steps", 0)):
    _check(getattr(o, field) >= minimum, "optim", field, getattr(o, field), f"an integer >= {minimum}")
  _check(0 <= o.min_lr_ratio <= 1, "optim", "min_lr_ratio", o.min_lr_ratio, "a number in [0, 1]")
  _check(o.weight_decay >= 0, "optim", "weight_decay", o.weight_decay, "a number >= 0")
  for field in ("b1", "b2"):
    _check(0 <= getattr(o, field) < 1, "optim", field, getattr(o, field), "a number in [0, 1)")
  return o


def parse(cfg: ml_collections.ConfigDict) -> Config:
  """Validates a loaded config; the first bad field raises ConfigError naming field, value, allowed."""
  student = _model(_get(cfg, "student", ""), "student")
  tokenizer = _get(cfg, "tokenizer", "")
  if not tokenizer and not student.name_or_path:
    raise ConfigError("tokenizer", tokenizer,
                      f"a tokenizer id or directory, or '{BYTE_TOKENIZER}', when the student has no checkpoint")
  teacher_tokenizer = _get(cfg, "teacher_tokenizer", "")
  _check(isinstance(teacher_tokenizer, str), "", "teacher_tokenizer", teacher_tokenizer,
         "a tokenizer id or directory, or '' for the teacher checkpoint's own")
  optim = _optim(cfg)
  mode = _choice(cfg, "mode", "", MODES)
  teacher = _model(_get(cfg, "teacher", ""), "teacher")
  offline = _offline(cfg, mode)
  objective = _objective(cfg, optim.total_steps, mode)
  if offline.top_k:
    check_offline(objective, offline.top_k)
    objective = dataclasses.replace(objective, offline_top_k=offline.top_k)
  data = _data(cfg)
  _check_positions(student, teacher if mode == "distill" else None, data)
  train = _train(cfg, mode)
  stages = _stages(cfg, mode, teacher)
  _check_warmup(optim, train, stages)
  return Config(
      seed=_positive_int(cfg, "seed", "", minimum=0),
      mode=mode,
      teacher=teacher,
      student=student,
      tokenizer=tokenizer,
      teacher_tokenizer=teacher_tokenizer,
      data=data,
      objective=objective,
      optim=optim,
      train=train,
      checkpoint=_positive_ints(cfg, "checkpoint", CheckpointSpec),
      log=_positive_ints(cfg, "log", LogSpec),
      monitor=_monitor(cfg),
      debug=_debug(cfg, mode),
      stages=stages,
      offline_teacher=offline,
      mesh=_mesh(cfg))


def _mesh(cfg) -> MeshSpec:
  """The `mesh` group. Its sizes against the devices, then the batch against the batch axes, are checked
  where the devices are known (`parallel.MeshPlan`): an impossible mesh is the mesh's fault, not the batch's."""
  return check_spec(MeshSpec(**_group(_get(cfg, "mesh", ""), MeshSpec, "mesh")))


def _check_positions(student: ModelSpec, teacher: ModelSpec | None, data: DataConfig) -> None:
  """A random architecture has a position for every token it reads (GPT-2's learned positions give NaN past
  theirs); a checkpoint's limit is checked once it is loaded (`build.check_positions`)."""
  teacher_field = "data.teacher_seq_len" if data.teacher_seq_len else "data.seq_len"
  for where, spec, field, length in (("student", student, "data.seq_len", data.seq_len),
                                     ("teacher", teacher, teacher_field, data.teacher_len)):
    if spec is not None and spec.arch is not None and spec.arch.max_position_embeddings < length:
      raise ConfigError(f"{where}.arch.max_position_embeddings", spec.arch.max_position_embeddings,
                        f"an integer >= {field}={length}, the tokens the {where} reads per sequence (or lower {field})")


def _check_warmup(optim: OptimConfig, train: TrainSpec, stages: StagesSpec) -> None:
  """The warmup fits in the run's steps when train.max_steps sets them, and in the teacher stage's steps."""
  if train.max_steps:
    check_warmup(optim, train.max_steps, "the run's optimizer steps (train.max_steps)")
  if stages.teacher_steps:
    check_warmup(optim, stages.teacher_steps, "the teacher stage's optimizer steps (stages.teacher_steps)")


def _offline(cfg, mode: str) -> OfflineTeacherSpec:
  o = OfflineTeacherSpec(**_group(_get(cfg, "offline_teacher", ""), OfflineTeacherSpec, "offline_teacher"))
  _check(o.top_k >= 0, "offline_teacher", "top_k", o.top_k, "an integer >= 0 (0: the live teacher at every step)")
  # Plain LM training has no teacher: the group is ignored (the teacher and scratch stages run that way).
  return o if mode == "distill" else OfflineTeacherSpec()


def _stages(cfg, mode: str, teacher: ModelSpec) -> StagesSpec:
  s = StagesSpec(**_group(_get(cfg, "stages", ""), StagesSpec, "stages"))
  _check(s.teacher_steps >= 0, "stages", "teacher_steps", s.teacher_steps, "an integer >= 0 (0: no teacher training)")
  _check(s.teacher_learning_rate >= 0, "stages", "teacher_learning_rate", s.teacher_learning_rate,
         "a number >= 0 (0: optim.learning_rate)")
  if mode == "lm":
    _check(s.teacher_steps == 0, "stages", "teacher_steps", s.teacher_steps, "0 in mode 'lm' (there is no teacher)")
    _check(not s.scratch_baseline, "stages", "scratch_baseline", s.scratch_baseline,
           "False in mode 'lm' (the run is a scratch run already)")
  if teacher.name_or_path:
    _check(s.teacher_steps == 0, "stages", "teacher_steps", s.teacher_steps,
           f"0 when teacher.name_or_path is set ({teacher.name_or_path!r} is trained already)")
  return s


def _debug(cfg, mode: str) -> DebugSpec:
  d = DebugSpec(**_group(_get(cfg, "debug", ""), DebugSpec, "debug"))
  allowed = ("lm",) if mode == "lm" else COMPONENTS  # only computed components can be drilled
  _check(d.inject_nonfinite in ("",) + allowed, "debug", "inject_nonfinite", d.inject_nonfinite,
         f"'' or one of {', '.join(allowed)}")
  _check(d.inject_every >= 0 and (d.inject_every > 0 or not d.inject_nonfinite), "debug", "inject_every",
         d.inject_every, "an integer >= 1 when debug.inject_nonfinite is set")
  return d


def _positive_ints(cfg, group: str, cls):
  """A group whose int fields must all be >= 1."""
  values = _group(_get(cfg, group, ""), cls, group)
  for field, value in values.items():
    if isinstance(value, int) and not isinstance(value, bool):
      _check(value >= 1, group, field, value, "an integer >= 1")
  return cls(**values)


def _data(cfg) -> DataConfig:
  return DataConfig(**_group(_get(cfg, "data", ""), DataConfig, "data"))  # DataConfig checks its own values


def _train(cfg, mode: str) -> TrainSpec:
  t = TrainSpec(**_group(_get(cfg, "train", ""), TrainSpec, "train"))
  _check(t.epochs >= 1, "train", "epochs", t.epochs, "an integer >= 1")
  _check(t.max_steps >= 0, "train", "max_steps", t.max_steps, "an integer >= 0 (0: by epochs)")
  _check(t.eval_every_steps >= 1, "train", "eval_every_steps", t.eval_every_steps, "an integer >= 1")
  _check(t.early_stopping_patience >= 0, "train", "early_stopping_patience", t.early_stopping_patience,
         "an integer >= 0 (0: never)")
  allowed = LM_EVAL_METRICS if mode == "lm" else EVAL_METRICS
  _check(t.best_metric in allowed, "train", "best_metric", t.best_metric, f"one of {', '.join(allowed)}")
  return t


def _monitor(cfg) -> MonitorConfig:
  m = MonitorConfig(**_group(_get(cfg, "monitor", ""), MonitorConfig, "monitor"))
  _check(0 <= m.nonfinite_fraction < 1, "monitor", "nonfinite_fraction", m.nonfinite_fraction, "a number in [0, 1)")
  _check(m.plateau_steps >= 1, "monitor", "plateau_steps", m.plateau_steps, "an integer >= 1")
  _check(m.eval_train_ratio > 1, "monitor", "eval_train_ratio", m.eval_train_ratio, "a number > 1")
  _check(m.diverged_steps >= 1, "monitor", "diverged_steps", m.diverged_steps, "an integer >= 1")
  return m
