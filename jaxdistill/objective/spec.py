"""The `distill` config group, and the resolved objective a step computes.

`DistillSpec` declares the `distill` group's fields once (how each loss is computed; the weights come
from the curriculum). `ResolvedObjective` holds it with the curriculum, the router, and what the config
alone does not say: the run's length, how the teacher enters the step (`teacher`: a live forward, its
offline records, or none), whether batches are aligned across two tokenizers, and the layer pairs
resolved for the two models. What it asks of the models and which components it computes derive from
the loss-component registry (`registry.py`); a component the mode cannot serve is refused when the
objective is built (ConfigError naming `curriculum.<entry>`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxdistill.errors import ConfigError
from jaxdistill.models import ModelConfig
from jaxdistill.objective import curriculum, losses, router
from jaxdistill.objective.component import Component
from jaxdistill.objective.curriculum import CurriculumConfig
from jaxdistill.objective.on_policy import OnPolicySpec
from jaxdistill.objective.registry import ENTRIES, REGISTRY
from jaxdistill.objective.router import RouterConfig

TEACHER_MODES = ("live", "records", "none")   # a teacher forward in the step | its offline records | no teacher


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


def curriculum_config(**values) -> CurriculumConfig:
  """The default curriculum (each registry entry's defaults) with `values` in place: entries by name
  (`kd=(...)`) and schedule fields (`boundaries`, `temperature`, `alpha_kd`, `ramp_fraction`)."""
  return CurriculumConfig(weights={e.name: e.defaults for e in ENTRIES}).replace(**values)


@dataclasses.dataclass(frozen=True)
class ResolvedObjective:
  """The objective of a step (static, hashable); see the module docstring.

  Built by `schema.parse` from the config (layer pairs unresolved, `total_steps` 0) and completed where
  the run is built: `total_steps`, `aligned` (two tokenizers) and `resolve_layers` for the two models.
  """
  distill: DistillSpec = DistillSpec()
  curriculum: CurriculumConfig = dataclasses.field(default_factory=curriculum_config)
  router: RouterConfig = RouterConfig()
  on_policy: OnPolicySpec = OnPolicySpec()  # sampled micro-batches (on-policy / sequence-level KD); on_policy.py
  total_steps: int = 0                      # optimizer steps of the whole run (the curriculum's 100%)
  teacher: str = "live"                     # TEACHER_MODES
  offline_top_k: int = 0                    # teacher 'records': teacher logits per token each record keeps
  aligned: bool = False                     # batches aligned across two tokenizers (align_student/_teacher/_mask)
  attention_pairs: tuple[tuple[int, int], ...] = ()  # resolved (student block, teacher block) pairs
  layer_map: tuple[tuple[int, int], ...] = ()        # resolved (student, teacher) hidden_states indices
  expert_layers: tuple[int, ...] = ()                # resolved teacher hidden_states indices ('blocks' experts)

  def __post_init__(self):
    if self.teacher not in TEACHER_MODES:
      raise ValueError(f"teacher {self.teacher!r} is not one of {', '.join(TEACHER_MODES)}")
    if (self.teacher == "records") != (self.offline_top_k > 0):
      raise ValueError(f"teacher {self.teacher!r} with offline_top_k={self.offline_top_k}: records need a top-k > 0")
    missing = sorted({e.name for e in ENTRIES} ^ set(self.curriculum.entries))
    if missing:
      raise ValueError(f"the curriculum's entries differ from the registry's at {', '.join(missing)} "
                       "(build it with `curriculum_config`)")
    curriculum.check(self.curriculum)
    if self.aligned and self.teacher == "records":
      raise ConfigError("offline_teacher.top_k", self.offline_top_k, "0 when the teacher's tokenizer differs from "
                        "the run's (records keep the teacher's own top-k tokens; across vocabularies kd needs its "
                        "full logits)")
    self._check_on_policy()
    for c in self.components():
      self._check_served(c)
      if c.check is not None:
        c.check(self)

  def _check_on_policy(self) -> None:
    """Sampled micro-batches need the live teacher reading the student's own tokens."""
    if not self.on_policy.enabled:
      return
    why = ""
    if self.teacher == "records":
      why = f"with offline_teacher.top_k={self.offline_top_k} (records cannot score new samples: the teacher must run)"
    elif self.aligned:
      why = "when the teacher's tokenizer differs from the run's (sampled text is not re-tokenised for the teacher)"
    if why:
      raise ConfigError("on_policy.fraction", self.on_policy.fraction, f"0 {why}")

  def _unserved(self, c: Component, teacher: str, aligned: bool) -> str:
    """Why teacher mode `teacher` (across two tokenizers if `aligned`) cannot serve `c`; '' where it can."""
    if teacher == "none" and (c.needs.teacher or c.needs.heads):
      return f"without a teacher (mode 'lm'), and {c.name} reads it"
    if teacher == "records" and c.needs.teacher and not c.records:
      return (f"with offline_teacher.top_k={self.offline_top_k} ({c.name} reads what the teacher's records do not "
              f"keep; set offline_teacher.top_k=0)")
    if aligned and not c.two_tokenizers:
      return f"when the teacher's tokenizer differs from the run's ({c.name} cannot be computed across two tokenizers)"
    return ""

  def _check_served(self, c: Component) -> None:
    """ConfigError when the mode cannot serve enabled component `c`: its entry must be 0 (or its scale)."""
    why = self._unserved(c, self.teacher, self.aligned)
    if not why:
      return
    scale = f", or {c.scale}=0" if c.scale else ""
    raise ConfigError(f"curriculum.{c.entry.name}", self.curriculum.values(c.entry.name), f"0 in every phase {why}"
                      f"{scale}")

  # What the registry says about this objective. ------------------------------------------------

  def scale(self, c: Component) -> float:
    """The config field `c.scale` (1.0 without one)."""
    return functools.reduce(getattr, c.scale.split("."), self) if c.scale else 1.0

  def enabled(self, name: str) -> bool:
    """Whether component `name` can have a non-zero weight at some step (otherwise it is not computed)."""
    c = _BY_NAME[name]
    return self.curriculum.enabled(c.entry.name) and self.scale(c) != 0

  def components(self) -> tuple[Component, ...]:
    """The enabled components, in registry order."""
    return tuple(c for c in REGISTRY if self.enabled(c.name))

  @property
  def needs_teacher(self) -> bool:
    """False in plain LM training: no enabled component reads the teacher, and none is run."""
    return any(c.needs.teacher or c.needs.heads for c in self.components())

  @property
  def needs_heads(self) -> bool:
    """Whether any enabled component reads the DistillHeads (projections, router)."""
    return any(c.needs.heads for c in self.components())

  @property
  def needs_teacher_states(self) -> bool:
    return any(c.needs.teacher_states for c in self.components())

  def attention_blocks(self, student: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student blocks, teacher blocks) whose queries and keys the enabled components read."""
    wanted = [c.needs.attention(self, student) for c in self.components() if c.needs.attention is not None]
    return tuple(sorted({b for s, _ in wanted for b in s})), tuple(sorted({b for _, t in wanted for b in t}))

  def expert_blocks(self) -> tuple[int, ...]:
    """Teacher blocks whose routed experts' outputs the enabled components read."""
    return tuple(sorted({b for c in self.components() if c.needs.experts is not None for b in c.needs.experts(self)}))

  # Variants. -------------------------------------------------------------------------------------

  def plain_lm(self) -> "ResolvedObjective":
    """Plain LM training (mode 'lm', the teacher and scratch stages): no teacher, and every entry at its
    registry `plain_lm` weight in every phase (`lm` 1, the others 0)."""
    weights = {e.name: (e.plain_lm,) * self.curriculum.phases for e in ENTRIES}
    return dataclasses.replace(self, curriculum=self.curriculum.replace(ramp_fraction=0.0, **weights), teacher="none",
                               offline_top_k=0, aligned=False, on_policy=OnPolicySpec())

  def on_samples(self) -> "ResolvedObjective":
    """The objective of a sampled micro-batch (on_policy.py): the kd term alone, weight 1 in every phase, at
    T = 1, computed with `on_policy.divergence` (and its beta and top-k) over the batch's `loss_mask`."""
    op, phases = self.on_policy, self.curriculum.phases
    weights = {e.name: (0.0,) for e in ENTRIES} | {"kd": (1.0,) * phases}
    distill = dataclasses.replace(self.distill, kd_mode=op.divergence, jsd_beta=op.jsd_beta, kd_top_k=op.top_k,
                                  kd_topk_tail="renormalize")
    curriculum = self.curriculum.replace(alpha_kd=1.0, temperature=(1.0,) * phases, ramp_fraction=0.0, **weights)
    return dataclasses.replace(self, distill=distill, curriculum=curriculum)

  def without_unserved(self, teacher: str = "live", aligned: bool = False) -> "ResolvedObjective":
    """This objective with the curriculum entries at 0 of every component that teacher mode `teacher` (across
    two tokenizers if `aligned`) cannot serve, e.g. before records are switched on; its own mode unchanged."""
    off = {c.entry.name: (0.0,) for c in REGISTRY if self._unserved(c, teacher, aligned)}
    return dataclasses.replace(self, curriculum=self.curriculum.replace(**off))

  def resolve_layers(self, student: ModelConfig, teacher: ModelConfig | None) -> "ResolvedObjective":
    """Fills the default layer pairs for these two models and checks the configured ones."""
    if teacher is None:
      if self.teacher != "none":
        raise ValueError(f"teacher {self.teacher!r} needs a teacher model; plain LM training is `plain_lm()`")
      return self
    d = self.distill
    pairs = d.attention_pairs or ((student.num_layers - 1, teacher.num_layers - 1),)
    layer_map = d.layer_map or losses.uniform_layer_map(student.num_layers, teacher.num_layers)
    routing = self._resolve_router(teacher)
    experts = () if routing.experts == "moe" else (
        d.expert_layers or router.expert_layers(teacher.num_layers, self.router.num_experts))
    blocks = f"student blocks 0..{student.num_layers - 1}, teacher blocks 0..{teacher.num_layers - 1}"
    if not all(0 <= s < student.num_layers and 0 <= t < teacher.num_layers for s, t in pairs):
      raise ConfigError("distill.attention_pairs", d.attention_pairs, f"(student, teacher) block pairs in {blocks}")
    if not all(0 <= s <= student.num_layers and 0 <= t <= teacher.num_layers for s, t in layer_map):
      raise ConfigError("distill.layer_map", d.layer_map, f"(student, teacher) hidden_states index pairs in "
                        f"student 0..{student.num_layers}, teacher 0..{teacher.num_layers} (0: the embeddings)")
    if routing.experts == "blocks" and (len(experts) != self.router.num_experts
                                        or not all(1 <= e <= teacher.num_layers for e in experts)):
      raise ConfigError("distill.expert_layers", d.expert_layers, f"router.num_experts={self.router.num_experts} "
                        f"teacher hidden_states indices in 1..{teacher.num_layers}")
    vocab = min(student.vocab_size, teacher.vocab_size)   # the ids kd compares
    for field, k in (("distill.kd_top_k", d.kd_top_k), ("offline_teacher.top_k", self.offline_top_k)):
      if k > vocab:
        raise ConfigError(field, k, f"an integer <= {vocab}, the vocabulary kd compares (teacher.vocab_size="
                          f"{teacher.vocab_size}, student.vocab_size={student.vocab_size}), or 0")
    return dataclasses.replace(self, attention_pairs=tuple(pairs), layer_map=tuple(layer_map),
                               expert_layers=tuple(experts), router=routing)

  def _resolve_router(self, teacher: ModelConfig) -> RouterConfig:
    """`router.experts` decided ('moe' or 'blocks') and, with 'moe', the block and the teacher's expert count."""
    r = self.router
    moe = r.experts == "moe" or (r.experts == "auto" and teacher.num_experts > 0 and not self.distill.expert_layers)
    if not moe:
      return dataclasses.replace(r, experts="blocks")
    if not teacher.sparse_layers:
      raise ConfigError("router.experts", r.experts, "'blocks' or 'auto': the teacher has no routed experts")
    layer = teacher.sparse_layers[-1] if r.moe_layer < 0 else r.moe_layer
    if not teacher.is_sparse_layer(layer):
      raise ConfigError("router.moe_layer", r.moe_layer, f"-1 or one of the teacher's sparse blocks "
                        f"{', '.join(map(str, teacher.sparse_layers))}")
    return dataclasses.replace(r, experts="moe", moe_layer=layer, num_experts=teacher.num_experts,
                               top_k_start=min(r.top_k_start, teacher.num_experts),
                               top_k_end=min(r.top_k_end, teacher.num_experts))


_BY_NAME = {c.name: c for c in REGISTRY}


def component_weights(opt_step: jax.Array, obj: ResolvedObjective) -> dict[str, jax.Array]:
  """Weight of every registry component at optimizer step `opt_step`: its entry's weight x its scale
  (0 for those not enabled)."""
  w = curriculum.curriculum_weights(opt_step, obj.total_steps, obj.curriculum)
  zero = jnp.zeros((), jnp.float32)
  return {c.name: w[c.entry.name] * obj.scale(c) if obj.enabled(c.name) else zero for c in REGISTRY}
