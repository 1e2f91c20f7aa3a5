"""The step-indexed curriculum, at the seed run's milestones and under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.errors import ConfigError
from jaxdistill.objective import ResolvedObjective, component_weights, curriculum, curriculum_config
from jaxdistill.objective.curriculum import CurriculumConfig, curriculum_weights

SEED_TOTAL = 74_823  # optimizer steps of the seed run
AUXILIARY = ("attention", "feature", "layerwise", "contrastive")


def _weights(step, total=SEED_TOTAL, cfg=curriculum_config()):
  return {k: float(v) for k, v in jax.jit(curriculum_weights, static_argnums=(1, 2))(step, total, cfg).items()}


@pytest.mark.parametrize("step", [0, 1000, 1999])
def test_seed_milestones_in_phase_one(step):
  w = _weights(jnp.int32(step))
  assert w["kd"] == pytest.approx(0.7) and w["lm"] == pytest.approx(0.3)
  assert all(w[name] == 0.0 for name in AUXILIARY)


def test_boundaries_switch_exactly_at_30_and_60_percent():
  # 0.3 * 74823 = 22446.9 -> phase 2 starts at 22447; 0.6 * 74823 = 44893.8 -> phase 3 at 44894.
  assert curriculum.boundary_steps(SEED_TOTAL, curriculum_config()) == (22447, 44894)
  before, after = _weights(jnp.int32(22446)), _weights(jnp.int32(22447))
  assert before["attention"] == before["feature"] == 0.0
  assert after["attention"] == pytest.approx(0.1) and after["feature"] == pytest.approx(0.1)
  assert after["layerwise"] == after["contrastive"] == 0.0
  before, after = _weights(jnp.int32(44893)), _weights(jnp.int32(44894))
  assert before["layerwise"] == before["contrastive"] == 0.0
  assert after["layerwise"] == pytest.approx(0.05) and after["contrastive"] == pytest.approx(0.05)
  assert after["attention"] == pytest.approx(0.1) and after["kd"] == pytest.approx(0.7)
  end = _weights(jnp.int32(SEED_TOTAL - 1))
  assert end == after


def test_exact_fraction_boundary_is_not_shifted_by_rounding():
  # 0.3 * 10 is 3.0000000000000004 in floating point: phase 2 must still start at step 3.
  assert curriculum.boundary_steps(10, curriculum_config()) == (3, 6)


def test_alpha_kd_scales_kd_only():
  """alpha_kd is the kd component's scale: the curriculum's entry stays, the component's weight is scaled."""
  cfg = curriculum_config(alpha_kd=0.5)
  assert _weights(jnp.int32(0), cfg=cfg)["kd"] == pytest.approx(0.7)
  w = component_weights(jnp.int32(0), ResolvedObjective(curriculum=cfg, total_steps=10))
  w = {k: float(v) for k, v in w.items()}
  assert w["kd"] == pytest.approx(0.35) and w["lm"] == pytest.approx(0.3)


def test_the_default_curriculum_comes_from_the_registry_and_off_entries_fit_any_phase_count():
  """Each registry entry with its defaults; an entry left at 0 takes one 0 per phase of another phase count."""
  assert curriculum_config().values("feature") == (0.0, 0.1, 0.1)
  cfg = CurriculumConfig(boundaries=(0.5,), temperature=(1.0, 1.0), weights={"kd": (1.0, 0.5), "off": (0.0, 0.0, 0.0)})
  assert cfg.values("off") == (0.0, 0.0) and not cfg.enabled("off") and cfg.enabled("kd")
  curriculum.check(cfg)
  assert cfg.as_group()["kd"] == (1.0, 0.5) and cfg.as_group()["boundaries"] == (0.5,)
  with pytest.raises(ValueError, match="no curriculum field or entry kdd"):
    cfg.replace(kdd=(1.0, 1.0))
  hash(cfg)  # a static jit argument


def test_linear_ramp_after_a_boundary():
  cfg = curriculum_config(boundaries=(0.5,), kd=(1.0, 0.0), lm=(0.0, 1.0), attention=(0.0,), feature=(0.0,),
                          layerwise=(0.0,), contrastive=(0.0,), temperature=(2.0, 1.0), ramp_fraction=0.1)
  # 100 steps: phase 2 from step 50, ramp over 10 steps: at step 55 halfway.
  w = _weights(jnp.int32(55), total=100, cfg=cfg)
  assert w["kd"] == pytest.approx(0.5) and w["lm"] == pytest.approx(0.5)
  assert _weights(jnp.int32(49), total=100, cfg=cfg)["kd"] == 1.0
  assert _weights(jnp.int32(60), total=100, cfg=cfg)["kd"] == 0.0
  temperature = jax.jit(curriculum.temperature, static_argnums=(1, 2))
  assert float(temperature(jnp.int32(55), 100, cfg)) == pytest.approx(1.5)
  assert float(temperature(jnp.int32(0), 100, cfg)) == 2.0


def test_default_temperature_schedule():
  temps = [float(curriculum.temperature(jnp.int32(s), SEED_TOTAL, curriculum_config())) for s in (0, 22447, 44894)]
  assert temps == [2.0, 1.75, 1.5]


def test_traced_step_compiles_once():
  fn = jax.jit(chex.assert_max_traces(curriculum_weights, n=1), static_argnums=(1, 2))
  values = [float(fn(jnp.int32(s), SEED_TOTAL, curriculum_config())["layerwise"]) for s in range(0, SEED_TOTAL, 7481)]
  np.testing.assert_allclose(values, [0.0] * 7 + [0.05] * 4)


@pytest.mark.parametrize("change, field", [
    (dict(boundaries=(0.6, 0.3)), "boundaries"),
    (dict(boundaries=(0.0, 0.6)), "boundaries"),
    (dict(kd=(0.7, 0.7)), "kd"),
    (dict(lm=(0.3, -0.1, 0.3)), "lm"),
    (dict(temperature=(2.0, 0.0, 1.0)), "temperature"),
    (dict(ramp_fraction=1.5), "ramp_fraction"),
])
def test_invalid_fields_are_config_errors_naming_field_value_and_allowed(change, field):
  with pytest.raises(ConfigError, match=rf"config field 'curriculum.{field}' = .* is not allowed: "):
    curriculum.check(curriculum_config(**change))
  curriculum.check(curriculum_config())
