"""The distillation objective: every component, its curriculum weight, the non-finite guard.

`objective(...)` runs the teacher (no gradient) and the student on one batch and returns the
total loss and a flat metrics dict: for each component `raw/<c>` (unweighted, after the guard),
`weight/<c>` and `loss/<c>` (weighted); `loss` is the sum of the `loss/<c>`. It is a pure
function of its inputs and the optimizer step, so training and evaluation at the same step
compute the same thing.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import dtypes

from jaxdistill import attention_maps, cross_vocab, curriculum, losses, offline_teacher, router
from jaxdistill.curriculum import CurriculumConfig
from jaxdistill.errors import ConfigError
from jaxdistill.router import RouterConfig
from jaxdistill.models import ModelConfig, forward

COMPONENTS = ("kd", "lm", "attention", "layerwise", "contrastive", "routing_feature", "routing_load_balance",
              "routing_attention_alignment")
_ROUTING = COMPONENTS[5:]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static description of the objective; `resolve_layers` fills the model-dependent defaults."""
  total_steps: int                           # optimizer steps of the whole run (the curriculum's 100%)
  curriculum: CurriculumConfig = CurriculumConfig()
  kd_mode: str = "forward_kl"                # losses.KD_MODES
  jsd_beta: float = 0.5
  kd_top_k: int = 0                          # 0: full vocabulary
  kd_topk_tail: str = "renormalize"          # losses.TOPK_TAILS
  chunk_size: int = 512                      # tokens per float32 chunk in kd/lm; 0: no chunking
  cross_vocab_kd: str = "prefix"             # two tokenizers: cross_vocab.CROSS_VOCAB_KD
  fill_unaligned: bool = True                # two tokenizers: kd at unaligned positions against the data token
  uld_top_k: int = 128                       # ranks of the vocabulary-free term of cross-vocabulary kd (uld)
  offline_top_k: int = 0                     # > 0: the teacher enters as records of its top-k logits
                                             # (offline_teacher.py), in training and evaluation alike
  label_smoothing: float = 0.0
  attention_pairs: tuple[tuple[int, int], ...] = ()  # (student block, teacher block); () = last blocks
  layer_map: tuple[tuple[int, int], ...] = ()        # hidden_states indices; () = uniform
  hidden_distance: str = "nmse"              # losses.HIDDEN_DISTANCES
  contrastive_temperature: float = 0.07
  router: RouterConfig = RouterConfig()
  expert_layers: tuple[int, ...] = ()        # teacher hidden_states indices; () = evenly spaced

  def enabled(self, component: str) -> bool:
    """Whether a component can have a non-zero weight at some step (otherwise it is not computed)."""
    if component in _ROUTING:
      coef = {"routing_feature": 1.0, "routing_load_balance": self.router.load_balance_coef,
              "routing_attention_alignment": self.router.attention_alignment_coef}[component]
      return coef != 0 and self.curriculum.enabled("feature")
    return self.curriculum.enabled(component)

  @property
  def needs_teacher(self) -> bool:
    """False in plain LM training: only `lm` can be weighted, and no teacher is run."""
    return any(self.enabled(c) for c in COMPONENTS if c != "lm")

  @property
  def needs_heads(self) -> bool:
    """Whether any enabled component uses the DistillHeads (projections, router)."""
    return any(self.enabled(c) for c in ("layerwise", "contrastive") + _ROUTING)

  def resolve_layers(self, student: ModelConfig, teacher: ModelConfig | None) -> "ObjectiveConfig":
    """Fills the default layer pairs for these two models and checks explicit ones."""
    if teacher is None:
      if self.needs_teacher:
        raise ValueError("the objective weighs components that need a teacher, but there is none")
      return self
    pairs = self.attention_pairs or ((student.num_layers - 1, teacher.num_layers - 1),)
    layer_map = self.layer_map or losses.uniform_layer_map(student.num_layers, teacher.num_layers)
    routing = self._resolve_router(teacher)
    experts = () if routing.experts == "moe" else (
        self.expert_layers or router.expert_layers(teacher.num_layers, self.router.num_experts))
    blocks = f"student blocks 0..{student.num_layers - 1}, teacher blocks 0..{teacher.num_layers - 1}"
    if not all(0 <= s < student.num_layers and 0 <= t < teacher.num_layers for s, t in pairs):
      raise ConfigError("distill.attention_pairs", self.attention_pairs, f"(student, teacher) block pairs in {blocks}")
    if not all(0 <= s <= student.num_layers and 0 <= t <= teacher.num_layers for s, t in layer_map):
      raise ConfigError("distill.layer_map", self.layer_map, f"(student, teacher) hidden_states index pairs in "
                        f"student 0..{student.num_layers}, teacher 0..{teacher.num_layers} (0: the embeddings)")
    if routing.experts == "blocks" and (len(experts) != self.router.num_experts
                                        or not all(1 <= e <= teacher.num_layers for e in experts)):
      raise ConfigError("distill.expert_layers", self.expert_layers, f"router.num_experts={self.router.num_experts} "
                        f"teacher hidden_states indices in 1..{teacher.num_layers}")
    vocab = min(student.vocab_size, teacher.vocab_size)   # the ids kd compares
    for field, k in (("distill.kd_top_k", self.kd_top_k), ("offline_teacher.top_k", self.offline_top_k)):
      if k > vocab:
        raise ConfigError(field, k, f"an integer <= {vocab}, the vocabulary kd compares (teacher.vocab_size="
                          f"{teacher.vocab_size}, student.vocab_size={student.vocab_size}), or 0")
    return dataclasses.replace(self, attention_pairs=tuple(pairs), layer_map=tuple(layer_map),
                               expert_layers=tuple(experts), router=routing)

  def _resolve_router(self, teacher: ModelConfig) -> RouterConfig:
    """`router.experts` decided ('moe' or 'blocks') and, with 'moe', the block and the teacher's expert count."""
    r = self.router
    moe = r.experts == "moe" or (r.experts == "auto" and teacher.num_experts > 0 and not self.expert_layers)
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


class DistillHeads(nn.Module):
  """Trainable parts besides the student: layer projections, contrastive projection, router."""
  cfg: ObjectiveConfig
  teacher_dim: int

  def setup(self):
    self.layer_proj = [nn.Dense(self.teacher_dim, name=f"layer_proj_{i}") for i in range(len(self.cfg.layer_map))]
    self.contrastive_proj = nn.Dense(self.teacher_dim)
    self.router = router.Router(self.cfg.router.num_experts, self.teacher_dim)

  def __call__(self, student_states, pooled_BxD):
    """student_states: hidden_states of the student. Returns every head's output."""
    projected = [proj(student_states[s].astype(jnp.float32)) for proj, (s, _) in zip(self.layer_proj, self.cfg.layer_map)]
    gate_logits, routed = self.router(student_states[-1])
    return {"layerwise": projected, "contrastive": self.contrastive_proj(pooled_BxD),
            "gate_logits": gate_logits, "routed": routed}


def init_heads(cfg: ObjectiveConfig, student: ModelConfig, teacher: ModelConfig | None, rng: jax.Array):
  """Random params of the DistillHeads; {} when no enabled component uses them."""
  if not cfg.needs_heads:
    return {}
  return _init_heads(cfg, student, teacher, rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_heads(cfg: ObjectiveConfig, student: ModelConfig, teacher: ModelConfig, rng: jax.Array):
  states = [jnp.zeros((1, 2, student.hidden_size), jnp.float32)] * (student.num_layers + 1)
  return DistillHeads(cfg, teacher.hidden_size).init(rng, states, jnp.zeros((1, student.hidden_size)))["params"]


def guard(fn):
  """Wraps a scalar loss `fn(*args)`: returns (value or 0 if non-finite, 1.0 if it was non-finite).

  The replacement happens inside jit, and the backward pass sends zero cotangents into `args`
  when the value was non-finite, so a NaN in one component cannot leak NaN gradients into the
  parameters through the shared forward (a bare `jnp.where` would: 0 * NaN = NaN).
  """
  @jax.custom_vjp
  def guarded(*args):
    value = fn(*args)
    ok = jnp.isfinite(value)
    return jnp.where(ok, value, 0.0), (~ok).astype(jnp.float32)

  def guarded_fwd(*args):
    value, vjp = jax.vjp(fn, *args)
    ok = jnp.isfinite(value)
    return (jnp.where(ok, value, 0.0), (~ok).astype(jnp.float32)), (vjp, ok)

  def guarded_bwd(residuals, cotangents):
    vjp, ok = residuals
    grads = vjp(jnp.where(ok, cotangents[0], 0.0))
    return jax.tree.map(lambda g: g if g.dtype == dtypes.float0 else jnp.where(ok, g, jnp.zeros_like(g)), grads)

  guarded.defvjp(guarded_fwd, guarded_bwd)
  return guarded


def component_weights(opt_step: jax.Array, cfg: ObjectiveConfig) -> dict[str, jax.Array]:
  """Curriculum weight of every component in COMPONENTS (0 for those not enabled)."""
  w = curriculum.curriculum_weights(opt_step, cfg.total_steps, cfg.curriculum)
  weights = {c: w[c] for c in COMPONENTS[:5]}
  weights["routing_feature"] = w["feature"]
  weights["routing_load_balance"] = w["feature"] * cfg.router.load_balance_coef
  weights["routing_attention_alignment"] = w["feature"] * cfg.router.attention_alignment_coef
  return {c: (weights[c] if cfg.enabled(c) else jnp.zeros((), jnp.float32)) for c in COMPONENTS}


def _requests(cfg: ObjectiveConfig):
  """Which hidden states and attention layers (their q and k) each model must return (static)."""
  needs_states = cfg.needs_heads
  student_attn, teacher_attn = set(), set()
  if cfg.enabled("attention"):
    student_attn |= {s for s, _ in cfg.attention_pairs}
    teacher_attn |= {t for _, t in cfg.attention_pairs}
  return needs_states, tuple(sorted(student_attn)), tuple(sorted(teacher_attn))


def _router_requests(cfg: ObjectiveConfig, student: ModelConfig):
  """(student, teacher) blocks whose attention rows the router's attention alignment reads."""
  if not cfg.enabled("routing_attention_alignment"):
    return (), ()
  return (student.num_layers - 1,), _expert_blocks(cfg)


def _expert_blocks(cfg: ObjectiveConfig) -> tuple[int, ...]:
  """The teacher blocks behind the router's experts: the MoE block, or the blocks of `expert_layers`."""
  return (cfg.router.moe_layer,) if cfg.router.experts == "moe" else tuple(e - 1 for e in cfg.expert_layers)


def run_models(student_params, teacher_params, batch, cfg: ObjectiveConfig, student: ModelConfig,
               teacher: ModelConfig | None):
  """Student forward (differentiable) and teacher forward (stop_gradient), with what cfg needs.

  Returns (student output, {block: its QueriesKeys}, teacher output, {block: its QueriesKeys}); the
  attention losses recompute map rows from those q and k. With no teacher (plain LM training) the
  teacher's output is None. Batches are the pipeline's packed rows, padded only at their end
  (`right_padded`: the fused attention kernel then takes the causal mask alone).
  """
  needs_states, student_attn, teacher_attn = _requests(cfg)
  router_student, router_teacher = _router_requests(cfg, student)
  student_attn = tuple(sorted(set(student_attn) | set(router_student)))
  teacher_attn = tuple(sorted(set(teacher_attn) | set(router_teacher)))
  student_out = forward(student_params, student, batch["student_input_ids"], batch["student_attention_mask"],
                        output_hidden_states=needs_states, qk_layers=student_attn, right_padded=True)
  student_qk = dict(zip(student_attn, student_out.queries_keys))
  if teacher is None or offline_teacher.RECORD_KEY in batch:  # no teacher, or its records instead
    return student_out, student_qk, None, {}
  moe_experts = (cfg.router.moe_layer,) if cfg.enabled("routing_feature") and cfg.router.experts == "moe" else ()
  teacher_out = forward(teacher_params, teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                        output_hidden_states=needs_states, qk_layers=teacher_attn, expert_layers=moe_experts,
                        right_padded=True)
  teacher_out = jax.lax.stop_gradient(teacher_out)
  return student_out, student_qk, teacher_out, dict(zip(teacher_attn, teacher_out.queries_keys))


def _alignment(batch):
  """(student positions -> aligned, teacher positions -> aligned, each model's q/k -> its `MapView`, pair mask).

  A batch from two tokenizers carries `align_student`, `align_teacher` and `align_mask` [B, A]: pair a
  is a student and a teacher position after which both models have read exactly the same text; the
  attention losses then compare the aligned rows over the aligned keys. With one tokenizer every
  position is its own pair, the positions are identities and the views are whole maps.
  """
  s_mask = batch["student_attention_mask"]
  t_mask = batch.get("teacher_attention_mask", s_mask)  # absent in plain LM training
  if "align_mask" not in batch:
    same = lambda x: x  # noqa: E731
    return (same, same, lambda qk: attention_maps.full_view(qk, s_mask),
            lambda qk: attention_maps.full_view(qk, t_mask), s_mask)
  s_pos, t_pos, pairs = batch["align_student"], batch["align_teacher"], batch["align_mask"]
  return (lambda x: cross_vocab.gather_positions(x, s_pos),
          lambda x: cross_vocab.gather_positions(x, t_pos),
          lambda qk: attention_maps.aligned_view(qk, s_mask, s_pos, pairs),
          lambda qk: attention_maps.aligned_view(qk, t_mask, t_pos, pairs),
          pairs)


def objective(trainable, teacher_params, batch, opt_step: jax.Array, cfg: ObjectiveConfig, student: ModelConfig,
              teacher: ModelConfig | None, models_out=None, vocab_map: cross_vocab.VocabMap | None = None):
  """Total loss and metrics at optimizer step `opt_step`.

  Args:
    trainable: {'student': student params, 'heads': DistillHeads params}.
    teacher_params: the teacher's params (no gradient flows into them); None with no teacher.
    batch: student_/teacher_ input_ids and attention_mask ([B, Ls], [B, Lt]); with two tokenizers
      also `align_student`, `align_teacher`, `align_mask` [B, A] (see `_alignment`): every
      teacher-student comparison is then made on aligned pairs only. Optionally `inject_nonfinite`
      [len(COMPONENTS)], added to the raw component values (0 normally; NaN/Inf to drill the guard
      and the run monitor).
    opt_step: int32 optimizer step; drives the curriculum and the router schedules.
    cfg, student, teacher: static configs (cfg already `resolve_layers`-ed); teacher None for
      plain LM training, where only `lm` may be enabled.
    models_out: precomputed `run_models` output (eval reuses it for its plain metrics).
      With `cfg.offline_top_k` the batch carries the teacher's records (`offline_teacher.RECORD_KEY`)
      and kd, layerwise and contrastive read the teacher from them; the teacher does not run.
    vocab_map: the shared tokens of two vocabularies (`cross_vocab.VocabMap`); required with an
      alignment, where kd is `cross_vocab.kd_across` (`cfg.cross_vocab_kd`).
  """
  if models_out is None:
    models_out = run_models(trainable["student"], teacher_params, batch, cfg, student, teacher)
  student_out, student_qk, teacher_out, teacher_qk = models_out
  mask_BxL = batch["student_attention_mask"]
  at_student, at_teacher, student_view, teacher_view, pairs_BxA = _alignment(batch)
  aligned = "align_mask" in batch
  record = batch.get(offline_teacher.RECORD_KEY)
  if cfg.offline_top_k and record is None:
    raise ValueError(f"cfg.offline_top_k={cfg.offline_top_k} needs the teacher's records in batch"
                     f"[{offline_teacher.RECORD_KEY!r}] (offline_teacher.compute_records)")
  inject = batch.get("inject_nonfinite", jnp.zeros(len(COMPONENTS), jnp.float32))
  weights = component_weights(opt_step, cfg)
  kd_temperature = curriculum.temperature(opt_step, cfg.total_steps, cfg.curriculum)
  top_k, gate_temperature = router.schedule(curriculum.progress(opt_step, cfg.total_steps), cfg.router)
  def kd_cross(student_logits, teacher_logits, pairs, positions, ids, mask, vocab_map, temperature):
    at_pairs = cross_vocab.kd_across(cfg.cross_vocab_kd, cross_vocab.gather_positions(student_logits, positions),
                                     teacher_logits, pairs, vocab_map, temperature=temperature,
                                     uld_top_k=cfg.uld_top_k, chunk_size=cfg.chunk_size)
    if not cfg.fill_unaligned:
      return at_pairs
    return cross_vocab.fill_unaligned(at_pairs, student_logits, ids, mask, positions, pairs, temperature=temperature,
                                      chunk_size=cfg.chunk_size)

  def kd(student_logits, teacher_logits, mask, temperature):
    vocab = min(student.vocab_size, teacher.vocab_size)
    return losses.kd_loss(student_logits[..., :vocab], teacher_logits[..., :vocab], mask, temperature=temperature,
                          mode=cfg.kd_mode, jsd_beta=cfg.jsd_beta, top_k=cfg.kd_top_k, topk_tail=cfg.kd_topk_tail,
                          chunk_size=cfg.chunk_size)

  def lm(student_logits, ids, mask):
    labels, label_mask = losses.next_token_labels(ids, mask)
    return losses.lm_loss(student_logits, labels, label_mask, label_smoothing=cfg.label_smoothing,
                          chunk_size=cfg.chunk_size)

  # component -> (function closing over static values only, its array inputs).
  terms = {}
  if cfg.enabled("kd") and aligned:
    terms["kd"] = (kd_cross, (student_out.logits_BxLxV, at_teacher(teacher_out.logits_BxLxV), pairs_BxA,
                              batch["align_student"], batch["student_input_ids"], mask_BxL, vocab_map, kd_temperature))
  elif cfg.enabled("kd") and record is not None:
    def kd_offline(student_logits, record, mask, step, temperature):
      return offline_teacher.kd_loss(student_logits[..., :min(student.vocab_size, teacher.vocab_size)], record, mask,
                                     step, cfg, temperature=temperature)

    terms["kd"] = (kd_offline, (student_out.logits_BxLxV, record, mask_BxL, opt_step, kd_temperature))
  elif cfg.enabled("kd"):
    terms["kd"] = (kd, (student_out.logits_BxLxV, teacher_out.logits_BxLxV, mask_BxL, kd_temperature))
  if cfg.enabled("lm"):
    terms["lm"] = (lm, (student_out.logits_BxLxV, batch["student_input_ids"], mask_BxL))
  if cfg.enabled("attention"):
    def attention_transfer(student_views, teacher_views, mask):
      return attention_maps.attention_loss(student_views, teacher_views, mask, student.attention_block)

    terms["attention"] = (attention_transfer, (
        [student_view(student_qk[s]) for s, _ in cfg.attention_pairs],
        [teacher_view(teacher_qk[t]) for _, t in cfg.attention_pairs], pairs_BxA))
  heads_out = None
  if student_out.hidden_states is not None:
    pooled = losses.masked_mean_pool(student_out.hidden_states[-1], mask_BxL)
    heads_out = DistillHeads(cfg, teacher.hidden_size).apply(
        {"params": trainable["heads"]}, student_out.hidden_states, pooled)
  if cfg.enabled("layerwise"):
    targets = offline_teacher.layer_targets(record, cfg) if record is not None else [
        at_teacher(teacher_out.hidden_states[t]) for _, t in cfg.layer_map]
    terms["layerwise"] = (
        lambda p, t, m: losses.layerwise_loss(p, t, m, cfg.hidden_distance),
        ([at_student(p) for p in heads_out["layerwise"]], targets, pairs_BxA))
  if cfg.enabled("contrastive"):
    teacher_pooled = record["pooled"] if record is not None else losses.masked_mean_pool(
        teacher_out.hidden_states[-1], batch["teacher_attention_mask"])
    terms["contrastive"] = (
        lambda s, t, valid: losses.contrastive_loss(s, t, temperature=cfg.contrastive_temperature, valid_B=valid),
        (heads_out["contrastive"], teacher_pooled, jnp.any(mask_BxL > 0, axis=1)))
  if cfg.enabled("routing_feature"):
    if cfg.router.experts == "moe":  # every routed expert's output [B, Lt, E, D] -> [E, B, A, D]
      experts = router.normalized_experts(jnp.moveaxis(at_teacher(teacher_out.expert_outputs[0]), 2, 0))
    else:
      experts = router.normalized_experts([at_teacher(teacher_out.hidden_states[e]) for e in cfg.expert_layers])
    gate_logits, routed = at_student(heads_out["gate_logits"]), at_student(heads_out["routed"])

    def routing_feature(gate_logits, routed, mask, experts, top_k, temperature):
      return router.feature_loss(routed, router.gates(gate_logits, top_k, temperature), experts, mask)

    def routing_balance(gate_logits, mask, top_k, temperature):
      return router.load_balance_loss(gate_logits, router.gates(gate_logits, top_k, temperature), temperature, mask)

    terms["routing_feature"] = (routing_feature, (gate_logits, routed, pairs_BxA, experts, top_k, gate_temperature))
    terms["routing_load_balance"] = (routing_balance, (gate_logits, pairs_BxA, top_k, gate_temperature))
  if cfg.enabled("routing_attention_alignment"):
    def routing_alignment(gate_logits, student_rows, expert_rows, mask, top_k, temperature):
      return router.attention_alignment_blockwise(student_rows, expert_rows, router.gates(gate_logits, top_k,
                                                                                         temperature),
                                                  mask, student.attention_block)

    terms["routing_attention_alignment"] = (routing_alignment, (
        at_student(heads_out["gate_logits"]), student_view(student_qk[student.num_layers - 1]),
        [teacher_view(teacher_qk[b]) for b in _expert_blocks(cfg)], pairs_BxA, top_k, gate_temperature))

  metrics, total = {}, jnp.zeros((), jnp.float32)
  for index, component in enumerate(COMPONENTS):
    if component in terms:
      fn, args = terms[component]
      # Traced values enter as arguments: a custom_vjp function may not close over them.
      raw, nonfinite = guard(lambda *a, fn=fn: fn(*a[:-1]) + a[-1])(*args, inject[index])
    else:
      raw, nonfinite = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    weighted = weights[component] * raw
    total = total + weighted
    metrics.update({f"raw/{component}": raw, f"weight/{component}": weights[component],
                    f"loss/{component}": weighted, f"nonfinite/{component}": nonfinite})
  metrics.update({"loss": total, "temperature": kd_temperature, "router/top_k": top_k.astype(jnp.float32),
                  "router/temperature": gate_temperature})
  return total, metrics
