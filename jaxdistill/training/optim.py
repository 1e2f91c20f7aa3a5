"""Optimizer: clipping, AdamW with warmup + cosine decay, gradient accumulation that averages.

The student and the distillation heads (router and projections) are two parameter groups with
their own learning-rate schedules. `Optimizer.apply` consumes one micro-batch gradient per call;
every `accumulation_steps` calls the *mean* of those gradients goes through clipping and AdamW
(an optax chain; a running mean, never a sum, never a loss multiplied by the accumulation factor) and is applied.
A micro-batch whose gradients are not finite changes nothing: not the params, not the moments, not
the running mean.

Both decisions are `lax.cond`s, so each call runs one branch: a micro-batch that only accumulates
touches the running mean and nothing else, an update touches params and moments once, and a skipped one
touches nothing. (`optax.MultiSteps` runs AdamW on every micro-batch and selects its result, and a
select over params and state afterwards doubles that pass; both also cost compile time in deep
models, `bench/RESULTS.md`.) With one micro-batch per step there is no accumulator at all.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdistill.errors import ConfigError
from jaxdistill.models.config import is_stacked
from jaxdistill.parallel import path_names


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


def check_warmup(optim: OptimConfig, total_steps: int, steps: str = "the run's optimizer steps") -> None:
  """ConfigError when the warmup is longer than the `total_steps` a run has (`steps` says whose they are).

  The schedule would end before the learning rate reached its peak. The trainer calls this once the total
  is known from the data; `schema.parse` checks `train.max_steps` and `stages.teacher_steps` when they are set.
  """
  if optim.warmup_steps > total_steps:
    raise ConfigError("optim.warmup_steps", optim.warmup_steps,
                      f"an integer <= {total_steps}, {steps}: a longer warmup never reaches the peak learning rate")


def lr_schedule(peak: float, cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=peak * cfg.min_lr_ratio)


def _decay_mask(params):
  """Matrices decay; norms and biases do not. A stacked block's leaves have one more (layer) axis."""
  def is_matrix(path, x):
    return x.ndim - is_stacked(path_names(path)) >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


class OptState(NamedTuple):
  inner: Any             # the clip + AdamW chain's state
  acc_grads: Any         # mean of this step's micro-batch gradients so far (params' dtypes); None at 1 micro-batch
  mini_step: jax.Array   # int32 micro-batches summed since the last update
  opt_step: jax.Array    # int32 updates applied: the curriculum's clock


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation applied to the mean of `accumulation_steps` micro-batch gradients."""
  tx: optax.GradientTransformation
  accumulation_steps: int = 1

  def init(self, params) -> OptState:
    acc = jax.tree.map(jnp.zeros_like, params) if self.accumulation_steps > 1 else None
    return OptState(self.tx.init(params), acc, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def apply(self, grads, params, state: OptState, finite: jax.Array):
    """(params, state) after one micro-batch's `grads`; unchanged when `finite` is False."""
    k = self.accumulation_steps

    def update(params, state, mean_grads):
      updates, inner = self.tx.update(mean_grads, state.inner, params)
      acc = None if state.acc_grads is None else jax.tree.map(jnp.zeros_like, state.acc_grads)
      return optax.apply_updates(params, updates), OptState(inner, acc, jnp.zeros_like(state.mini_step),
                                                            state.opt_step + 1)

    def use(params, state):
      if k == 1:
        return update(params, state, grads)
      n = state.mini_step.astype(jnp.float32)   # a running mean: acc_n = acc + (g - acc) / (n + 1)
      acc = jax.tree.map(lambda a, g: a + (g.astype(a.dtype) - a) / (n + 1), state.acc_grads, grads)
      return jax.lax.cond(
          state.mini_step == k - 1,
          lambda p, s: update(p, s, acc),
          lambda p, s: (p, s._replace(acc_grads=acc, mini_step=s.mini_step + 1)),
          params, state)

    return jax.lax.cond(finite, use, lambda p, s: (p, s), params, state)


def make_optimizer(cfg: OptimConfig) -> tuple[Optimizer, Callable]:
  """(the Optimizer over {'student': ..., 'heads': ...} params, the student's learning-rate schedule)."""
  student_lr = lr_schedule(cfg.learning_rate, cfg)

  def adamw(schedule):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=_decay_mask)

  groups = optax.multi_transform(
      {"student": adamw(student_lr), "heads": adamw(lr_schedule(cfg.heads_learning_rate, cfg))},
      lambda params: {group: jax.tree.map(lambda _, g=group: g, tree) for group, tree in params.items()})
  inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), groups)
  return Optimizer(inner, cfg.accumulation_steps), student_lr
