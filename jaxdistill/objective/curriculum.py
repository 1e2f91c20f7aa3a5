"""Step-indexed curriculum: the weight of every curriculum entry and the KD temperature.

Training is split into phases at fractions of the total optimizer steps (30% and 60% by default).
Each curriculum entry lists one value per phase; at a boundary the value switches, or ramps
linearly over `ramp_fraction` of training when that is positive. Everything is a pure function
of an integer optimizer step, so train and eval at the same step see the same weights.

The entries (`kd`, `lm`, `attention`, `feature`, ...) and their defaults are declared by the loss
components that are weighted by them (`jaxdistill/objective/registry.py`); this module knows none
of them by name: `objective.curriculum_config()` builds the default curriculum from the registry.
"""

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp

from jaxdistill.errors import ConfigError

Weights = tuple[tuple[str, tuple[float, ...]], ...]  # ((entry, one weight per phase), ...), hashable


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
  """The `curriculum` group: the phases, the KD temperature per phase, and each entry's weight per phase.

  `weights` may be given as a mapping; it is kept as sorted (entry, values) pairs so the config stays
  hashable (a static jit argument). An entry that is 0 in every phase is off, whatever the number of
  values it lists: it is stored with one 0 per phase, so a curriculum of another phase count need not
  list the entries it leaves off.
  """
  boundaries: tuple[float, ...] = (0.3, 0.6)          # phase starts, as fractions of the optimizer steps
  alpha_kd: float = 1.0                                # multiplies every kd weight (the kd component's scale)
  temperature: tuple[float, ...] = (2.0, 1.75, 1.5)   # KD temperature per phase
  ramp_fraction: float = 0.0                           # 0: switch at boundaries; > 0: linear ramp
  weights: Weights | Mapping[str, tuple[float, ...]] = ()

  def __post_init__(self):
    off = (0.0,) * self.phases
    pairs = dict(self.weights).items()
    weights = tuple(sorted((name, off if not any(values) else tuple(values)) for name, values in pairs))
    object.__setattr__(self, "weights", weights)

  @property
  def phases(self) -> int:
    return len(self.boundaries) + 1

  @property
  def entries(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.weights)

  def values(self, entry: str) -> tuple[float, ...]:
    """The per-phase weights of `entry`."""
    return dict(self.weights)[entry]

  def enabled(self, entry: str) -> bool:
    """False when an entry's weight is 0 in every phase: nothing weighted by it need be computed."""
    return any(v != 0 for v in self.values(entry))

  def replace(self, **values) -> "CurriculumConfig":
    """A copy with schedule fields (`boundaries`, `temperature`, ...) and entries (`kd=(...)`) replaced."""
    fields = {f.name for f in dataclasses.fields(self)} - {"weights"}
    unknown = sorted(set(values) - fields - set(self.entries))
    if unknown:
      raise ValueError(f"no curriculum field or entry {', '.join(unknown)}; entries: {', '.join(self.entries)}")
    weights = {**dict(self.weights), **{k: v for k, v in values.items() if k not in fields}}
    return dataclasses.replace(self, **{k: v for k, v in values.items() if k in fields}, weights=weights)

  def as_group(self) -> dict:
    """The fields as the config file writes them: `curriculum.kd`, `curriculum.boundaries`, ..."""
    group = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "weights"}
    return {**group, **dict(self.weights)}


def check(cfg: CurriculumConfig) -> None:
  """Raises ConfigError naming the first field of `cfg` that is not allowed (`curriculum.<field>`)."""
  if list(cfg.boundaries) != sorted(set(cfg.boundaries)) or not all(0 < b < 1 for b in cfg.boundaries):
    raise ConfigError("curriculum.boundaries", cfg.boundaries, "increasing fractions strictly between 0 and 1")
  for name, values in cfg.weights + (("temperature", cfg.temperature),):
    if len(values) != cfg.phases:
      raise ConfigError(f"curriculum.{name}", values, f"{cfg.phases} values, one per phase "
                        f"(boundaries={cfg.boundaries})")
    if any(v < 0 for v in values):
      raise ConfigError(f"curriculum.{name}", values, "values >= 0")
  if any(t <= 0 for t in cfg.temperature):
    raise ConfigError("curriculum.temperature", cfg.temperature, "values > 0")
  if cfg.alpha_kd < 0:
    raise ConfigError("curriculum.alpha_kd", cfg.alpha_kd, "a number >= 0")
  if not 0 <= cfg.ramp_fraction < 1:
    raise ConfigError("curriculum.ramp_fraction", cfg.ramp_fraction, "a number in [0, 1)")


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
  """Weight of each curriculum entry at optimizer step `step` (pure, jit-able), before any component's scale."""
  return {name: _scheduled(values, step, total_steps, cfg) for name, values in cfg.weights}


def temperature(step: jax.Array, total_steps: int, cfg: CurriculumConfig) -> jax.Array:
  """KD temperature at optimizer step `step`."""
  return _scheduled(cfg.temperature, step, total_steps, cfg)


def progress(step: jax.Array, total_steps: int) -> jax.Array:
  """Fraction of training done, in [0, 1]."""
  return jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
