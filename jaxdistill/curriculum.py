"""Step-indexed curriculum: the weight of every loss component and the KD temperature.

Training is split into phases at fractions of the total optimizer steps (30% and 60% by default).
Each curriculum entry lists one value per phase; at a boundary the value switches, or ramps
linearly over `ramp_fraction` of training when that is positive. Everything is a pure function
of an integer optimizer step, so train and eval at the same step see the same weights.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

# The loss components the curriculum weighs. The routing losses ride on `feature`.
WEIGHTED = ("kd", "lm", "attention", "feature", "layerwise", "contrastive")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
  """Per-phase values; defaults reproduce the seed run (three phases, boundaries at 30% and 60%)."""
  boundaries: tuple[float, ...] = (0.3, 0.6)
  alpha_kd: float = 1.0                                # multiplies every kd weight
  kd: tuple[float, ...] = (0.7, 0.7, 0.7)
  lm: tuple[float, ...] = (0.3, 0.3, 0.3)
  attention: tuple[float, ...] = (0.0, 0.1, 0.1)
  feature: tuple[float, ...] = (0.0, 0.1, 0.1)
  layerwise: tuple[float, ...] = (0.0, 0.0, 0.05)
  contrastive: tuple[float, ...] = (0.0, 0.0, 0.05)
  temperature: tuple[float, ...] = (2.0, 1.75, 1.5)   # KD temperature per phase
  ramp_fraction: float = 0.0                           # 0: switch at boundaries; > 0: linear ramp

  def values(self, name: str) -> tuple[float, ...]:
    scale = self.alpha_kd if name == "kd" else 1.0
    return tuple(scale * v for v in getattr(self, name))

  def enabled(self, name: str) -> bool:
    """False when a component's weight is 0 in every phase: it need not be computed at all."""
    return any(v != 0 for v in self.values(name))


def lm_only(cfg: CurriculumConfig) -> CurriculumConfig:
  """The curriculum of plain LM training: `lm` weighs 1 in every phase, every other component 0."""
  phases = len(cfg.boundaries) + 1
  zeros = (0.0,) * phases
  return dataclasses.replace(cfg, alpha_kd=1.0, kd=zeros, lm=(1.0,) * phases, attention=zeros, feature=zeros,
                             layerwise=zeros, contrastive=zeros, ramp_fraction=0.0)


def boundary_steps(total_steps: int, cfg: CurriculumConfig) -> tuple[int, ...]:
  """First optimizer step of each phase after the first: ceil(fraction * total_steps)."""
  return tuple(math.ceil(fraction * total_steps - 1e-9) for fraction in cfg.boundaries)


def phase(step: jax.Array, total_steps: int, cfg: CurriculumConfig) -> jax.Array:
  """0-based phase index at optimizer step `step`."""
  starts = jnp.asarray(boundary_steps(total_steps, cfg), jnp.int32)
  return jnp.sum(jnp.asarray(step, jnp.int32) >= starts).astype(jnp.int32)


def _scheduled(values: tuple[float, ...], step: jax.Array, total_steps: int, cfg: CurriculumConfig) -> jax.Array:
  table = jnp.asarray(values, jnp.float32)
  index = phase(step, total_steps, cfg)
  current = table[index]
  ramp_steps = cfg.ramp_fraction * total_steps
  if ramp_steps <= 0:
    return current
  starts = jnp.asarray((0,) + boundary_steps(total_steps, cfg), jnp.float32)
  previous = table[jnp.maximum(index - 1, 0)]
  done = jnp.clip((jnp.asarray(step, jnp.float32) - starts[index]) / ramp_steps, 0.0, 1.0)
  return jnp.where(index == 0, current, previous + (current - previous) * done)


def curriculum_weights(step: jax.Array, total_steps: int, cfg: CurriculumConfig) -> dict[str, jax.Array]:
  """Weight of each component in `WEIGHTED` at optimizer step `step` (pure, jit-able)."""
  return {name: _scheduled(cfg.values(name), step, total_steps, cfg) for name in WEIGHTED}


def temperature(step: jax.Array, total_steps: int, cfg: CurriculumConfig) -> jax.Array:
  """KD temperature at optimizer step `step`."""
  return _scheduled(cfg.temperature, step, total_steps, cfg)


def progress(step: jax.Array, total_steps: int) -> jax.Array:
  """Fraction of training done, in [0, 1]."""
  return jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)


def problem(cfg: CurriculumConfig) -> tuple[str, str] | None:
  """(field, what is allowed) for the first invalid field of `cfg`, or None."""
  phases = len(cfg.boundaries) + 1
  if list(cfg.boundaries) != sorted(set(cfg.boundaries)) or not all(0 < b < 1 for b in cfg.boundaries):
    return "boundaries", "increasing fractions strictly between 0 and 1"
  for name in WEIGHTED + ("temperature",):
    values = getattr(cfg, name)
    if len(values) != phases:
      return name, f"{phases} values, one per phase (boundaries={cfg.boundaries})"
    if any(v < 0 for v in values):
      return name, "values >= 0"
  if any(t <= 0 for t in cfg.temperature):
    return "temperature", "values > 0"
  if cfg.alpha_kd < 0:
    return "alpha_kd", "a number >= 0"
  if not 0 <= cfg.ramp_fraction < 1:
    return "ramp_fraction", "a number in [0, 1)"
  return None
