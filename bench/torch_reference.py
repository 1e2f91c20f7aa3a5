"""The PyTorch reference of jaxdistill's distillation step: the way a PyTorch eager trainer does it.

    python -m bench.torch_reference --teacher DIR --student DIR [--batch_size 2 --seq_len 64
        --accumulation 2 --dtype bfloat16 --device cuda --repeats 5]

One optimizer step, exactly the step `jaxdistill.training.steps.train_step` takes over `accumulation_steps`
micro-batches, run the old way: transformers' PyTorch models in eager mode (eager attention), both
called with every hidden state and attention map, the teacher under `torch.no_grad()`, mixed
precision by `torch.autocast` (bf16, or fp16 with a `GradScaler`), `loss / k` backward per
micro-batch, then `clip_grad_norm_` and `torch.optim.AdamW` over two parameter groups (student,
heads). The loss components are the ones of `jaxdistill.objective`'s registry, written again in torch
(`TORCH_TERMS`, by name; an enabled component without one is refused) and computed in float32 outside
autocast; curriculum weights, temperatures, the router's top-k and the
learning rates are configuration, so they come from jaxdistill's own schedule functions.

Out of scope: two tokenizers (an `align_mask` batch) and the router over a mixture-of-experts
teacher's experts (`router.experts='moe'`); both raise ValueError.
"""

from jaxdistill import cli

cli.quiet_environment()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jaxdistill import objective as objective_lib  # noqa: E402
from jaxdistill.models import config as model_config  # noqa: E402
from jaxdistill.models import hf_io  # noqa: E402
from jaxdistill.objective import COMPONENTS, DistillSpec, ResolvedObjective, curriculum, router  # noqa: E402
from jaxdistill.training.optim import OptimConfig, lr_schedule  # noqa: E402

_EPS = 1e-12
_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BATCH_KEYS = ("student_input_ids", "student_attention_mask", "teacher_input_ids", "teacher_attention_mask")


# --------------------------------------------------------------------------------------------
# Losses: jaxdistill/objective/losses.py in torch, float32, same masks and formulas.

def masked_mean(value_BxL, mask_BxL):
  """sum(mask * value) / max(sum(mask), 1), masked values selected away."""
  mask = mask_BxL.bool()
  return torch.where(mask, value_BxL, 0.0).sum() / mask.float().sum().clamp_min(1.0)


def _kl(log_p, log_q):
  """KL(p || q) along the last axis; terms with p = 0 contribute 0."""
  p = log_p.exp()
  return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _divergence(log_p, log_q, mode: str, jsd_beta: float):
  if mode == "forward_kl":
    return _kl(log_p, log_q)
  if mode == "reverse_kl":
    return _kl(log_q, log_p)
  log_m = torch.logaddexp(math.log(jsd_beta) + log_p, math.log1p(-jsd_beta) + log_q)
  return jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)


def _topk_log_probs(log_p_NxV, log_q_NxV, top_k: int, tail: str):
  """Teacher and student log-probabilities on the teacher's top-k tokens (+ a tail bucket)."""
  top_log_p, index_NxK = log_p_NxV.topk(top_k, dim=-1)
  top_log_q = log_q_NxV.gather(-1, index_NxK)
  if tail == "renormalize":
    return top_log_p.log_softmax(-1), top_log_q.log_softmax(-1)

  def with_tail(top):
    mass = top.exp().sum(-1, keepdim=True).clamp_max(1.0 - 1e-7)
    return torch.cat([top, torch.log1p(-mass)], dim=-1)

  return with_tail(top_log_p), with_tail(top_log_q)


def kd_loss(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, d: DistillSpec, temperature: float):
  """T^2 * masked token mean of the divergence between softmax(z_t / T) and softmax(z_s / T)."""
  log_q = (student_logits_BxLxV.float() / temperature).log_softmax(-1)
  log_p = (teacher_logits_BxLxV.detach().float() / temperature).log_softmax(-1)
  if d.kd_top_k:
    log_p, log_q = _topk_log_probs(log_p, log_q, d.kd_top_k, d.kd_topk_tail)
  return temperature ** 2 * masked_mean(_divergence(log_p, log_q, d.kd_mode, d.jsd_beta), mask_BxL)


def lm_loss(logits_BxLxV, input_ids_BxL, mask_BxL, label_smoothing: float):
  """Next-token cross-entropy (label-smoothed), masked token mean; the last position does not count."""
  labels_BxL = F.pad(input_ids_BxL[:, 1:], (0, 1))
  valid_BxL = mask_BxL.bool() & F.pad(mask_BxL[:, 1:], (0, 1)).bool()
  log_q = logits_BxLxV.float().log_softmax(-1)
  nll_BxL = -log_q.gather(-1, labels_BxL.clamp_min(0)[..., None])[..., 0]
  if label_smoothing:
    nll_BxL = (1.0 - label_smoothing) * nll_BxL - label_smoothing * log_q.mean(-1)
  return masked_mean(nll_BxL, valid_BxL)


def align_heads(student_BxHsxLxL, teacher_BxHtxLxL):
  """Equal head counts by averaging groups of consecutive heads (or all heads), as jaxdistill does."""
  hs, ht = student_BxHsxLxL.shape[1], teacher_BxHtxLxL.shape[1]

  def group_mean(x, groups):
    b, h, lq, lk = x.shape
    return x.reshape(b, groups, h // groups, lq, lk).mean(2)

  if hs == ht:
    return student_BxHsxLxL, teacher_BxHtxLxL
  if ht % hs == 0:
    return student_BxHsxLxL, group_mean(teacher_BxHtxLxL, hs)
  if hs % ht == 0:
    return group_mean(student_BxHsxLxL, ht), teacher_BxHtxLxL
  return student_BxHsxLxL.mean(1, keepdim=True), teacher_BxHtxLxL.mean(1, keepdim=True)


def attention_rows_kl(target_BxHxLxL, student_BxHxLxL, mask_BxL):
  """Mean over heads and real queries of KL(target row || student row) over unmasked keys."""
  p, q = target_BxHxLxL.float(), student_BxHxLxL.float()
  keys_Bx1x1xL = mask_BxL.bool()[:, None, None, :]
  log_ratio = p.clamp_min(_EPS).log() - q.clamp_min(_EPS).log()
  terms = torch.where(keys_Bx1x1xL & (p > 0), p * log_ratio, 0.0)
  return masked_mean(terms.sum(-1).mean(1), mask_BxL)


def attention_loss(student_maps, teacher_maps, mask_BxL):
  """Mean over layer pairs of KL(teacher row || student row), heads aligned, no gradient into the teacher."""
  values = []
  for student_BxHxLxL, teacher_BxHxLxL in zip(student_maps, teacher_maps):
    student_BxHxLxL, teacher_BxHxLxL = align_heads(student_BxHxLxL, teacher_BxHxLxL.detach())
    values.append(attention_rows_kl(teacher_BxHxLxL, student_BxHxLxL, mask_BxL))
  return torch.stack(values).mean()


def hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, distance: str):
  """nmse ||p - t||^2 / ||t||^2 or cosine 1 - cos(p, t), masked token mean."""
  p, t = projected_BxLxD.float(), target_BxLxD.detach().float()
  if distance == "nmse":
    per_token = (p - t).square().sum(-1) / t.square().sum(-1).clamp_min(_EPS)
  else:
    norms = ((p * p).sum(-1) * (t * t).sum(-1)).clamp_min(_EPS * _EPS).sqrt()
    per_token = 1.0 - (p * t).sum(-1) / norms
  return masked_mean(per_token, mask_BxL)


def masked_mean_pool(hidden_BxLxD, mask_BxL):
  mask = mask_BxL.float()[..., None]
  return (hidden_BxLxD.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def contrastive_loss(student_BxD, teacher_BxD, temperature: float, valid_B):
  """InfoNCE with in-batch negatives over valid rows (cosine similarities / tau)."""
  s, t = student_BxD.float(), teacher_BxD.detach().float()
  s = s / ((s * s).sum(-1, keepdim=True) + _EPS).sqrt()
  t = t / ((t * t).sum(-1, keepdim=True) + _EPS).sqrt()
  logits_BxB = torch.where(valid_B[None, :], s @ t.T / temperature, -1e9)
  nll_B = -logits_BxB.log_softmax(-1).diagonal()
  return torch.where(valid_B, nll_B, 0.0).sum() / valid_B.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# Router: jaxdistill/objective/router.py in torch.

def gates(gate_logits_BxLxE, top_k: int, temperature: float):
  """Softmax(logits / T) over each token's top_k logits (by stable rank, as jaxdistill), 0 elsewhere."""
  scaled = gate_logits_BxLxE / temperature
  rank = torch.argsort(torch.argsort(-scaled, dim=-1, stable=True), dim=-1, stable=True)
  return torch.where(rank < top_k, scaled, -torch.inf).softmax(-1)


def normalized_experts(expert_states):
  x = torch.stack(list(expert_states)).detach().float()
  return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)


def feature_loss(projected_BxLxD, gates_BxLxE, experts_ExBxLxD, mask_BxL):
  target_BxLxD = torch.einsum("ble,ebld->bld", gates_BxLxE, experts_ExBxLxD)
  return masked_mean((projected_BxLxD.float() - target_BxLxD).square().mean(-1), mask_BxL)


def load_balance_loss(gate_logits_BxLxE, gates_BxLxE, temperature: float, mask_BxL):
  """Switch Transformer balance E * sum_e f_e * P_e (f without gradient)."""
  mask = mask_BxL.float()[..., None]
  chosen_BxLxE = (gates_BxLxE > 0).float() * mask
  share_E = (chosen_BxLxE.sum((0, 1)) / chosen_BxLxE.sum().clamp_min(1.0)).detach()
  probs_BxLxE = (gate_logits_BxLxE / temperature).softmax(-1) * mask
  mean_prob_E = probs_BxLxE.sum((0, 1)) / mask.sum().clamp_min(1.0)
  return gate_logits_BxLxE.shape[-1] * (share_E * mean_prob_E).sum()


def attention_alignment_loss(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL):
  """KL(gate-weighted mix of the experts' head-averaged attention || student head-averaged attention)."""
  expert_ExBxLxL = torch.stack([m.float().mean(1) for m in expert_maps]).detach()
  target_BxLxL = torch.einsum("bqe,ebqk->bqk", gates_BxLxE, expert_ExBxLxL)
  student_Bx1xLxL = student_BxHxLxL.float().mean(1, keepdim=True)
  return attention_rows_kl(target_BxLxL[:, None], student_Bx1xLxL, mask_BxL)


# --------------------------------------------------------------------------------------------
# The distillation heads, the schedule values, the objective.

class Heads(nn.Module):
  """jaxdistill's DistillHeads as torch Linears: layer projections, contrastive projection, router."""

  def __init__(self, heads_params, num_layer_pairs: int):
    super().__init__()

    def linear(p):
      kernel = np.array(p["kernel"], np.float32)
      layer = nn.Linear(*kernel.shape)
      with torch.no_grad():  # Flax kernels are [in, out], torch weights [out, in]
        layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
        layer.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))
      return layer

    self.layer_proj = nn.ModuleList(linear(heads_params[f"layer_proj_{i}"]) for i in range(num_layer_pairs))
    self.contrastive_proj = linear(heads_params["contrastive_proj"])
    self.router_gate = linear(heads_params["router"]["gate"])
    self.router_proj = linear(heads_params["router"]["proj"])


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Python numbers of everything jaxdistill schedules by optimizer step."""
  weights: dict[str, float]
  kd_temperature: float
  top_k: int
  gate_temperature: float
  learning_rate: float
  heads_learning_rate: float


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scheduled(cfg: ResolvedObjective, optim: OptimConfig, step: jax.Array) -> dict:
  """jaxdistill's own schedule functions at `step`, in one compiled call (eagerly, each op would compile)."""
  top_k, gate_temperature = router.schedule(curriculum.progress(step, cfg.total_steps), cfg.router)
  return {"weights": objective_lib.component_weights(step, cfg),
          "kd_temperature": curriculum.temperature(step, cfg.total_steps, cfg.curriculum),
          "top_k": top_k, "gate_temperature": gate_temperature,
          "learning_rate": lr_schedule(optim.learning_rate, optim)(step),
          "heads_learning_rate": lr_schedule(optim.heads_learning_rate, optim)(step)}


def schedule_at(cfg: ResolvedObjective, optim: OptimConfig, opt_step: int) -> Schedule:
  values = jax.device_get(_scheduled(cfg, optim, jnp.int32(opt_step)))
  return Schedule(weights={c: float(w) for c, w in values.pop("weights").items()}, top_k=int(values.pop("top_k")),
                  **{name: float(v) for name, v in values.items()})


@dataclasses.dataclass
class TermInputs:
  """What a torch term reads: both models' outputs (every hidden state and attention map), the heads, the batch."""
  student_out: object
  teacher_out: object
  heads: Heads | None
  batch: dict
  cfg: ResolvedObjective
  sched: Schedule

  @property
  def mask_BxL(self):
    return self.batch["student_attention_mask"]

  @functools.cached_property
  def router(self):
    """(the student's last state [B, L, D], gate logits [B, L, E], gates [B, L, E]): the router's, computed once."""
    last_BxLxD = self.student_out.hidden_states[-1].float()
    gate_logits_BxLxE = self.heads.router_gate(last_BxLxD)
    return last_BxLxD, gate_logits_BxLxE, gates(gate_logits_BxLxE, self.sched.top_k, self.sched.gate_temperature)


def _kd(x: TermInputs):
  vocab = min(x.student_out.logits.shape[-1], x.teacher_out.logits.shape[-1])
  return kd_loss(x.student_out.logits[..., :vocab], x.teacher_out.logits[..., :vocab], x.mask_BxL, x.cfg.distill,
                 x.sched.kd_temperature)


def _lm(x: TermInputs):
  return lm_loss(x.student_out.logits, x.batch["student_input_ids"], x.mask_BxL, x.cfg.distill.label_smoothing)


def _attention(x: TermInputs):
  pairs = x.cfg.attention_pairs
  return attention_loss([x.student_out.attentions[s] for s, _ in pairs],
                        [x.teacher_out.attentions[t] for _, t in pairs], x.mask_BxL)


def _layerwise(x: TermInputs):
  student_states, teacher_states = x.student_out.hidden_states, x.teacher_out.hidden_states
  distance = x.cfg.distill.hidden_distance
  values = [hidden_distance(proj(student_states[s].float()), teacher_states[t], x.mask_BxL, distance)
            for proj, (s, t) in zip(x.heads.layer_proj, x.cfg.layer_map)]
  return torch.stack(values).mean()


def _contrastive(x: TermInputs):
  pooled_BxD = x.heads.contrastive_proj(masked_mean_pool(x.student_out.hidden_states[-1], x.mask_BxL))
  teacher_pooled_BxD = masked_mean_pool(x.teacher_out.hidden_states[-1], x.batch["teacher_attention_mask"])
  return contrastive_loss(pooled_BxD, teacher_pooled_BxD, x.cfg.distill.contrastive_temperature,
                          (x.mask_BxL > 0).any(1))


def _routing_feature(x: TermInputs):
  last_BxLxD, _, gates_BxLxE = x.router
  experts = normalized_experts([x.teacher_out.hidden_states[e] for e in x.cfg.expert_layers])
  return feature_loss(x.heads.router_proj(last_BxLxD), gates_BxLxE, experts, x.mask_BxL)


def _routing_load_balance(x: TermInputs):
  _, gate_logits_BxLxE, gates_BxLxE = x.router
  return load_balance_loss(gate_logits_BxLxE, gates_BxLxE, x.sched.gate_temperature, x.mask_BxL)


def _routing_attention_alignment(x: TermInputs):
  _, _, gates_BxLxE = x.router
  expert_maps = [x.teacher_out.attentions[e - 1] for e in x.cfg.expert_layers]  # hidden_states index -> block
  return attention_alignment_loss(x.student_out.attentions[-1], expert_maps, gates_BxLxE, x.mask_BxL)


# The torch term of each registry component it covers, by name. A component without one is refused
# when enabled (`uncovered`): the reference would otherwise time and compare less than jaxdistill computes.
TORCH_TERMS = {"kd": _kd, "lm": _lm, "attention": _attention, "layerwise": _layerwise, "contrastive": _contrastive,
               "routing_feature": _routing_feature, "routing_load_balance": _routing_load_balance,
               "routing_attention_alignment": _routing_attention_alignment}
_ROUTER_TERMS = ("routing_feature", "routing_load_balance", "routing_attention_alignment")


def uncovered(cfg: ResolvedObjective) -> list[str]:
  """The enabled components the reference has no torch term for."""
  return [c.name for c in cfg.components() if c.name not in TORCH_TERMS]


def distill_objective(student_out, teacher_out, heads, batch, cfg: ResolvedObjective, sched: Schedule):
  """(weighted total, component -> raw value) of the enabled components, in float32 outside autocast as
  jaxdistill computes them.

  A non-finite component counts as 0 (jaxdistill's guard; here a plain `torch.where`).
  """
  logits = student_out.logits
  inputs = TermInputs(student_out, teacher_out, heads, batch, cfg, sched)
  with torch.autocast(logits.device.type, enabled=False):
    raw = {c.name: TORCH_TERMS[c.name](inputs) for c in cfg.components()}
    raw = {c: torch.where(torch.isfinite(v), v, 0.0) for c, v in raw.items()}
    total = sum((sched.weights[c] * v for c, v in raw.items()), torch.zeros((), device=logits.device))
  return total, raw


# --------------------------------------------------------------------------------------------
# Models, optimizer, the timed step.

@dataclasses.dataclass
class Reference:
  """Everything one optimizer step of the reference touches."""
  student: nn.Module
  teacher: nn.Module | None        # None when the objective needs no teacher (plain LM)
  heads: Heads | None
  optimizer: torch.optim.Optimizer
  scaler: torch.amp.GradScaler     # enabled with float16 only
  cfg: ResolvedObjective
  sched: Schedule
  autocast_dtype: torch.dtype | None
  clip_norm: float

  @property
  def params(self):
    return [p for group in self.optimizer.param_groups for p in group["params"]]


def load_model(path: str, dtype: torch.dtype, device: str):
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(device)


def make_optimizer(student: nn.Module, heads: Heads | None, optim: OptimConfig, sched: Schedule):
  """AdamW over two groups (student, heads), each its learning rate; weight decay on >= 2-D params only."""
  groups = []
  for module, lr in ((student, sched.learning_rate), (heads, sched.heads_learning_rate)):
    if module is None:
      continue
    params = list(module.parameters())
    groups += [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": optim.weight_decay},
               {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, betas=(optim.b1, optim.b2), eps=optim.eps)


def _model_inputs(batch, side: str):
  mask_BxL = batch[f"{side}_attention_mask"]
  # Positions counted over real tokens (jaxdistill's default_positions): left padding shifts nothing.
  return dict(input_ids=batch[f"{side}_input_ids"], attention_mask=mask_BxL,
              position_ids=(mask_BxL.cumsum(1) - 1).clamp_min(0), output_hidden_states=True,
              output_attentions=True, use_cache=False)


def train_step(ref: Reference, batches):
  """One optimizer step over the micro-batches; returns the first micro-batch's (total, raw), detached."""
  device_type = ref.optimizer.param_groups[0]["params"][0].device.type
  first = None
  for batch in batches:
    with torch.autocast(device_type, dtype=ref.autocast_dtype, enabled=ref.autocast_dtype is not None):
      with torch.no_grad():
        teacher_out = None if ref.teacher is None else ref.teacher(**_model_inputs(batch, "teacher"))
      student_out = ref.student(**_model_inputs(batch, "student"))
    total, raw = distill_objective(student_out, teacher_out, ref.heads, batch, ref.cfg, ref.sched)
    if first is None:
      first = (total.detach(), {c: v.detach() for c, v in raw.items()})
    ref.scaler.scale(total / len(batches)).backward()  # the mean gradient over micro-batches
  ref.scaler.unscale_(ref.optimizer)
  torch.nn.utils.clip_grad_norm_(ref.params, ref.clip_norm)
  ref.scaler.step(ref.optimizer)
  ref.scaler.update()
  ref.optimizer.zero_grad(set_to_none=True)
  return first


def _check(batches, cfg: ResolvedObjective, heads_params, dtype: str, repeats: int):
  if dtype not in _AUTOCAST:
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_AUTOCAST)}")
  if not batches:
    raise ValueError("batches must hold the micro-batches of one optimizer step; got none")
  if repeats < 1:
    raise ValueError(f"repeats ({repeats}) must be at least 1: the median of no timed step is undefined")
  if cfg.aligned or any("align_mask" in b for b in batches):
    raise ValueError("the torch reference covers one tokenizer; this batch is aligned across two (align_mask)")
  if uncovered(cfg):
    raise ValueError(f"the torch reference has no term for {', '.join(uncovered(cfg))} (bench/torch_reference.py "
                     "TORCH_TERMS): set its curriculum weight to 0 to compare the rest")
  if cfg.router.experts == "moe" and any(cfg.enabled(c) for c in _ROUTER_TERMS):
    raise ValueError("router.experts='moe' (the router over a mixture-of-experts teacher's experts) is outside "
                     "the torch reference; it covers router.experts='blocks'")
  if cfg.needs_heads and not heads_params:
    raise ValueError("the objective enables components that use the distillation heads, but heads_params is empty")


def _metrics(total, raw) -> dict[str, float]:
  metrics = {f"raw/{c}": float(raw[c]) if c in raw else 0.0 for c in COMPONENTS}
  metrics["loss"] = float(total)
  return metrics


def run_reference(teacher_dir: str, student_dir: str, batches: list[dict[str, np.ndarray]],
                  objective: ResolvedObjective, opt_step: int, heads_params, optim: OptimConfig, *,
                  dtype: str = "float32", device: str = "cpu", repeats: int = 5, warmup: int = 1) -> dict:
  """Times the reference's optimizer step over `batches` (the micro-batches of one step).

  Args:
    teacher_dir, student_dir: transformers checkpoint directories (one shared tokenizer).
    batches: dicts of int32 [B, L] `student_/teacher_ input_ids / attention_mask`.
    objective: a ResolvedObjective already `resolve_layers`-ed for these two models.
    opt_step: the optimizer step whose curriculum weights, temperatures, router top-k and learning
      rates are used (held constant over the timed steps).
    heads_params: jaxdistill's DistillHeads params (copied, so both sides start from the same heads);
      {} or None when `objective.needs_heads` is False.
    optim: clip norm, AdamW betas/eps/weight decay and the learning-rate schedules.
    (The objective's components must all have a torch term, `TORCH_TERMS`; see `uncovered`.)
    dtype: float32 (no autocast), bfloat16 or float16 (autocast; fp16 with a GradScaler). With the
      half dtypes the teacher is loaded in that dtype; the student keeps float32 master weights.
    repeats, warmup: timed and untimed optimizer steps.

  Returns:
    step_ms: median milliseconds per optimizer step (device synchronised); tokens_per_s: student tokens
    (B * L of every micro-batch, padding included) per median second; peak_bytes: CUDA peak allocation
    over the timed steps (None on CPU); metrics: the first micro-batch's `raw/<component>` and `loss`
    before any update, as jaxdistill names them (0 for components not enabled).
  """
  _check(batches, objective, heads_params, dtype, repeats)
  autocast_dtype = _AUTOCAST[dtype]
  sched = schedule_at(objective, optim, opt_step)
  student = load_model(student_dir, torch.float32, device).train()
  teacher = (load_model(teacher_dir, autocast_dtype or torch.float32, device).eval().requires_grad_(False)
             if objective.needs_teacher else None)
  heads = Heads(heads_params, len(objective.layer_map)).to(device) if objective.needs_heads else None
  ref = Reference(student, teacher, heads, make_optimizer(student, heads, optim, sched),
                  torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16"),
                  objective, sched, autocast_dtype, optim.clip_norm)
  on_device = [{k: torch.from_numpy(np.asarray(b[k], np.int64)).to(device) for k in _BATCH_KEYS} for b in batches]
  first, seconds = _time_steps(ref, on_device, repeats, warmup)
  median = statistics.median(seconds)
  tokens = sum(int(np.asarray(b["student_input_ids"]).size) for b in batches)
  cuda = torch.device(device).type == "cuda"
  return {"step_ms": median * 1e3, "tokens_per_s": tokens / median,
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "metrics": _metrics(*first)}


def _time_steps(ref: Reference, batches, repeats: int, warmup: int):
  """(first step's first micro-batch (total, raw), seconds of each timed step); CUDA peak stats reset after warmup."""
  cuda = batches[0]["student_input_ids"].is_cuda
  recorded = [train_step(ref, batches) for _ in range(warmup)]
  if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    recorded.append(train_step(ref, batches))
    if cuda:
      torch.cuda.synchronize()
    seconds.append(time.perf_counter() - start)
  return recorded[0], seconds


def _random_batches(batch_size: int, seq_len: int, accumulation: int, vocab: int):
  """`accumulation` unpadded micro-batches of random ids, the same ids for both models (one tokenizer)."""
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(accumulation):
    ids_BxL = rng.randint(0, vocab, (batch_size, seq_len)).astype(np.int32)
    mask_BxL = np.ones_like(ids_BxL)
    batches.append({"student_input_ids": ids_BxL, "student_attention_mask": mask_BxL,
                    "teacher_input_ids": ids_BxL, "teacher_attention_mask": mask_BxL})
  return batches


def main(argv=None) -> None:
  # argparse, not absl flags: bench/step.py imports this module, and module-level absl flags would
  # collide with its own --teacher/--dtype/... definitions.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", required=True, help="Teacher checkpoint directory.")
  parser.add_argument("--student", required=True, help="Student checkpoint directory (same tokenizer).")
  parser.add_argument("--batch_size", type=int, default=2, help="Sequences per micro-batch.")
  parser.add_argument("--seq_len", type=int, default=64, help="Tokens per sequence.")
  parser.add_argument("--accumulation", type=int, default=2, help="Micro-batches per optimizer step.")
  parser.add_argument("--dtype", default="float32", choices=list(_AUTOCAST), help="Autocast dtype.")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--repeats", type=int, default=5, help="Timed optimizer steps after one warmup step.")
  args = parser.parse_args(argv)
  student_cfg, teacher_cfg = (model_config.from_hf_config(hf_io.read_config(d), d)
                               for d in (args.student, args.teacher))
  optim = OptimConfig(accumulation_steps=args.accumulation)
  cfg = ResolvedObjective(total_steps=optim.total_steps).resolve_layers(student_cfg, teacher_cfg)
  opt_step = int(0.8 * cfg.total_steps)  # phase 3: every default component weighted
  heads_params = objective_lib.init_heads(cfg, student_cfg, teacher_cfg, jax.random.key(0))
  batches = _random_batches(args.batch_size, args.seq_len, args.accumulation,
                            min(student_cfg.vocab_size, teacher_cfg.vocab_size))
  r = run_reference(args.teacher, args.student, batches, cfg, opt_step, heads_params, optim, dtype=args.dtype,
                    device=args.device, repeats=args.repeats)
  peak = "" if r["peak_bytes"] is None else f", peak {r['peak_bytes'] / 2**20:,.0f} MiB"
  print(f"torch reference ({args.dtype}, {args.device}) batch {args.batch_size} x seq {args.seq_len} x "
        f"{args.accumulation} micro-batches: {r['step_ms']:.2f} ms/step, {r['tokens_per_s']:,.0f} tokens/s{peak}, "
        f"loss {r['metrics']['loss']:.4f}")


if __name__ == "__main__":
  main()
