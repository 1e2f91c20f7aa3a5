"""Optimizer: clipping, AdamW with warmup + cosine decay, gradient accumulation that averages.

The student and the distillation heads (router and projections) are two parameter groups with
their own learning-rate schedules. Accumulation is `optax.MultiSteps`: each call consumes one
micro-batch gradient, and every `accumulation_steps` calls the *mean* of those gradients goes
through clipping and AdamW (never a sum, never a loss multiplied by the accumulation factor).
"""

import dataclasses
from typing import Callable

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 5e-5         # peak learning rate of the student
  heads_learning_rate: float = 1e-3   # peak learning rate of router and projections
  warmup_steps: int = 100             # optimizer steps of linear warmup from 0
  total_steps: int = 1000             # optimizer steps; cosine decay ends here (the trainer derives it)
  min_lr_ratio: float = 0.1           # final learning rate = peak * this
  weight_decay: float = 0.01          # decoupled, on matrices only (not norms, biases)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0              # global-norm clip of the averaged gradient
  accumulation_steps: int = 1         # micro-batches per optimizer step


def lr_schedule(peak: float, cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=peak * cfg.min_lr_ratio)


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, Callable]:
  """(tx over {'student': ..., 'heads': ...} params, the student's learning-rate schedule)."""
  student_lr = lr_schedule(cfg.learning_rate, cfg)

  def adamw(schedule):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=_decay_mask)

  groups = optax.multi_transform(
      {"student": adamw(student_lr), "heads": adamw(lr_schedule(cfg.heads_learning_rate, cfg))},
      lambda params: {group: jax.tree.map(lambda _, g=group: g, tree) for group, tree in params.items()})
  inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), groups)
  return optax.MultiSteps(inner, every_k_schedule=cfg.accumulation_steps), student_lr
