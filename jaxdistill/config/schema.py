"""Typed, frozen views of a config, and the validation that builds them.

`parse(cfg)` reads a loaded `ml_collections.ConfigDict` once: the first value that is not allowed
raises `ConfigError` naming the field, the value and what is allowed. Past this boundary models,
losses and the trainer only see these dataclasses.
"""

import dataclasses
from typing import Sequence

import ml_collections

from jaxdistill.data.pipeline import DataConfig
from jaxdistill.data.tokenizer import BYTE_TOKENIZER
from jaxdistill.errors import ConfigError
from jaxdistill.models import families
from jaxdistill.models.config import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_POLICIES, ModelConfig
from jaxdistill.objective import COMPONENTS, ENTRIES, DistillSpec, ResolvedObjective
from jaxdistill.objective.cross_vocab import CROSS_VOCAB_KD
from jaxdistill.objective.curriculum import CurriculumConfig
from jaxdistill.objective.losses import HIDDEN_DISTANCES, KD_MODES, TOPK_TAILS
from jaxdistill.objective.offline_teacher import OfflineTeacherSpec
from jaxdistill.objective.on_policy import SOURCES, OnPolicySpec
from jaxdistill.objective.router import EXPERT_SOURCES, RouterConfig
from jaxdistill.parallel import MeshSpec, check_spec
from jaxdistill.training.monitor import MonitorConfig
from jaxdistill.training.optim import OptimConfig, check_warmup

EVAL_METRICS = ("student_lm_loss", "loss", "kl_t1", "raw/kd", "raw/lm")
LM_EVAL_METRICS = ("student_lm_loss", "loss", "raw/lm")   # those a run without a teacher has
MODES = ("distill", "lm")   # distill: teacher -> student; lm: plain LM training of `student`, no teacher


# The arch group's fields (`config.arch_group`) that may be 0, and what 0 means: the tokenizer's vocabulary, a dense
# model, experts as wide as intermediate_size, full causal attention. Every other int field is >= 1.
ARCH_ZERO_FIELDS = ("vocab_size", "num_experts", "moe_intermediate_size", "sliding_window")


class ArchGroup(dict):
  """The arch group as written: a read-only dict, so that Config stays hashable (a static jit argument) while
  fingerprints and the teacher cache key still see the group's own fields (`student.arch.hidden_size`)."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))

  def __reduce__(self):  # copy and pickle rebuild it whole instead of setting items one by one
    return type(self), (dict(self),)

  def _read_only(self, *args, **kwargs):
    raise TypeError("an arch group is read-only; build another")

  __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = __ior__ = _read_only


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name_or_path: str
  revision: str
  arch: ArchGroup | None  # set when name_or_path is empty: the arch group as written (ModelConfig field names)
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

  def model_config(self, vocab_size: int) -> ModelConfig:
    """The random model `arch` describes, at this spec's dtypes and runtime; `vocab_size` unless arch sets one."""
    arch = families.from_arch({**self.arch, "vocab_size": self.arch["vocab_size"] or vocab_size})
    return dataclasses.replace(arch, param_dtype=self.param_dtype, dtype=self.dtype, **self.runtime())


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
  progress_bar: bool = True             # tqdm bar (loss, learning rate, tokens/s, ETA) when stderr is a terminal
  print_every_steps: int = 50           # no bar (a log file, or progress_bar=False): a [TRAIN] line every N steps,
                                        # and at the first (it says its compile time) and the last


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
  objective: ResolvedObjective  # layer pairs unresolved and total_steps 0 until the run is built
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


def _arch(node, where: str) -> ArchGroup:
  """The arch group as written, once its types and ranges, and the family's own rules (`families.from_arch`), hold.

  Its keys are ModelConfig field names: each is read by its ModelConfig type. What a family cannot take
  (experts, windows, head sizes) is the family's to refuse.
  """
  types = {field.name: field.type for field in dataclasses.fields(ModelConfig)}
  arch = {"family": _choice(node, "family", where, families.SUPPORTED_FAMILIES)}
  for key in node.keys():
    _check(key in types, where, key, node[key], "not a field here: the arch group holds ModelConfig fields")
    if types[key] is bool:
      arch[key] = _flag(node, key, where)
    elif types[key] is int:
      arch[key] = _positive_int(node, key, where, minimum=0 if key in ARCH_ZERO_FIELDS else 1)
    elif types[key] is float:
      value = _get(node, key, where)
      _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, where, key, value,
             "a number >= 0")
      arch[key] = float(value)
    elif key != "family":
      arch[key] = _get(node, key, where)
  try:
    families.from_arch(arch, where)
  except KeyError as e:  # a field the family reads that the group lacks
    raise ConfigError(_name(where, e.args[0]), None, "the field is required") from None
  return ArchGroup(arch)


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


def _objective(cfg, total_steps: int, mode: str, offline_top_k: int) -> ResolvedObjective:
  """The objective of the config's `distill`, `curriculum` and `router` groups, in the config's teacher mode."""
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

  # Built whole, the objective checks the curriculum and that its teacher mode serves every enabled component.
  objective = ResolvedObjective(distill=DistillSpec(**d), curriculum=_curriculum(cfg), router=r,
                                on_policy=_on_policy(cfg), total_steps=total_steps,
                                teacher="records" if offline_top_k else "live", offline_top_k=offline_top_k)
  return objective.plain_lm() if mode == "lm" else objective


def _on_policy(cfg) -> OnPolicySpec:
  """The `on_policy` group (its lengths against the data and the models are checked in `_check_positions`)."""
  o = OnPolicySpec(**_group(_get(cfg, "on_policy", ""), OnPolicySpec, "on_policy"))
  _check(0 <= o.fraction <= 1, "on_policy", "fraction", o.fraction,
         "a number in [0, 1] (the probability that a micro-batch is sampled; 0: never)")
  _check(0 <= o.start < 1, "on_policy", "start", o.start,
         "a number in [0, 1) (the training progress at which sampling starts)")
  _check(o.source in SOURCES, "on_policy", "source", o.source, f"one of {', '.join(SOURCES)}")
  for field in ("prompt_length", "completion_length"):
    _check(getattr(o, field) >= 1, "on_policy", field, getattr(o, field), "an integer >= 1")
  _check(o.temperature > 0, "on_policy", "temperature", o.temperature, "a number > 0")
  _check(o.divergence in KD_MODES, "on_policy", "divergence", o.divergence, f"one of {', '.join(KD_MODES)}")
  _check(0 <= o.jsd_beta <= 1, "on_policy", "jsd_beta", o.jsd_beta, "a number in [0, 1] (0: forward KL, 1: reverse KL)")
  _check(o.top_k >= 0, "on_policy", "top_k", o.top_k, "an integer >= 0 (0: full vocabulary)")
  return o


def _curriculum(cfg) -> CurriculumConfig:
  """The `curriculum` group: the schedule fields, and one tuple per registry entry (`curriculum.kd`, ...)."""
  node = _get(cfg, "curriculum", "")
  weights = {}
  for entry in ENTRIES:
    values = _tuplify(_get(node, entry.name, "curriculum"))
    _check(isinstance(values, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
           "curriculum", entry.name, values, "a tuple of numbers, one weight per phase")
    weights[entry.name] = values
  return CurriculumConfig(**_group(node, CurriculumConfig, "curriculum", derived=("weights",)), weights=weights)


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
  objective = _objective(cfg, optim.total_steps, mode, offline.top_k)
  data = _data(cfg)
  _check_positions(student, teacher if mode == "distill" else None, data, objective.on_policy)
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
      debug=_debug(cfg, objective),
      stages=stages,
      offline_teacher=offline,
      mesh=_mesh(cfg))


def _mesh(cfg) -> MeshSpec:
  """The `mesh` group. Its sizes against the devices, then the batch against the batch axes, are checked
  where the devices are known (`parallel.MeshPlan`): an impossible mesh is the mesh's fault, not the batch's."""
  return check_spec(MeshSpec(**_group(_get(cfg, "mesh", ""), MeshSpec, "mesh")))


def _check_positions(student: ModelSpec, teacher: ModelSpec | None, data: DataConfig, on_policy: OnPolicySpec) -> None:
  """A random architecture has a position for every token it reads (GPT-2's learned positions give NaN past
  theirs), sampled sequences included; a checkpoint's limit is checked once it is loaded (`build.check_positions`).
  Prompts are cut from the data's rows, so they fit in one. (Evaluation's samples fit themselves.)"""
  if on_policy.enabled:
    _check(on_policy.prompt_length <= data.seq_len, "on_policy", "prompt_length", on_policy.prompt_length,
           f"an integer <= data.seq_len={data.seq_len} (prompts are the first tokens of the data's rows)")
  teacher_field = "data.teacher_seq_len" if data.teacher_seq_len else "data.seq_len"
  sampled = (("on_policy.prompt_length + completion_length", on_policy.length),) if on_policy.enabled else ()
  for where, spec, reads in (("student", student, (("data.seq_len", data.seq_len),) + sampled),
                             ("teacher", teacher, ((teacher_field, data.teacher_len),) + sampled)):
    for field, length in reads:
      if spec is not None and spec.arch is not None and spec.arch["max_position_embeddings"] < length:
        raise ConfigError(f"{where}.arch.max_position_embeddings", spec.arch["max_position_embeddings"],
                          f"an integer >= {field}={length}, the tokens the {where} reads per sequence (or lower "
                          f"{field})")


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


def _debug(cfg, objective: ResolvedObjective) -> DebugSpec:
  d = DebugSpec(**_group(_get(cfg, "debug", ""), DebugSpec, "debug"))
  # Only computed components can be drilled: without a teacher, those plain LM training weighs.
  allowed = COMPONENTS if objective.teacher != "none" else tuple(c.name for c in objective.components())
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
