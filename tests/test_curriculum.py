"""The step-indexed curriculum, at the seed run's milestones and under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import curriculum
from jaxdistill.curriculum import CurriculumConfig, curriculum_weights

SEED_TOTAL = 74_823  # optimizer steps of the seed run
AUXILIARY = ("attention", "feature", "layerwise", "contrastive")


def _weights(step, total=SEED_TOTAL, cfg=CurriculumConfig()):
  return {k: float(v) for k, v in jax.jit(curriculum_weights, static_argnums=(1, 2))(step, total, cfg).items()}


@pytest.mark.parametrize("step", [0, 1000, 1999])
def test_seed_milestones_in_phase_one(step):
  w = _weights(jnp.int32(step))
  assert w["kd"] == pytest.approx(0.7) and w["lm"] == pytest.approx(0.3)
  assert all(w[name] == 0.0 for name in AUXILIARY)


def test_boundaries_switch_exactly_at_30_and_60_percent():
  # 0.3 * 74823 = 22446.9 -> phase 2 starts at 22447; 0.6 * 74823 = 44893.8 -> phase 3 at 44894.
  assert curriculum.boundary_steps(SEED_TOTAL, CurriculumConfig()) == (22447, 44894)
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
  assert curriculum.boundary_steps(10, CurriculumConfig()) == (3, 6)


def test_alpha_kd_scales_kd_only():
  w = _weights(jnp.int32(0), cfg=CurriculumConfig(alpha_kd=0.5))
  assert w["kd"] == pytest.approx(0.35) and w["lm"] == pytest.approx(0.3)


def test_linear_ramp_after_a_boundary():
  cfg = CurriculumConfig(boundaries=(0.5,), kd=(1.0, 0.0), lm=(0.0, 1.0), attention=(0.0, 0.0),
                         feature=(0.0, 0.0), layerwise=(0.0, 0.0), contrastive=(0.0, 0.0),
                         temperature=(2.0, 1.0), ramp_fraction=0.1)
  # 100 steps: phase 2 from step 50, ramp over 10 steps: at step 55 halfway.
  w = _weights(jnp.int32(55), total=100, cfg=cfg)
  assert w["kd"] == pytest.approx(0.5) and w["lm"] == pytest.approx(0.5)
  assert _weights(jnp.int32(49), total=100, cfg=cfg)["kd"] == 1.0
  assert _weights(jnp.int32(60), total=100, cfg=cfg)["kd"] == 0.0
  temperature = jax.jit(curriculum.temperature, static_argnums=(1, 2))
  assert float(temperature(jnp.int32(55), 100, cfg)) == pytest.approx(1.5)
  assert float(temperature(jnp.int32(0), 100, cfg)) == 2.0


def test_default_temperature_schedule():
  temps = [float(curriculum.temperature(jnp.int32(s), SEED_TOTAL, CurriculumConfig())) for s in (0, 22447, 44894)]
  assert temps == [2.0, 1.75, 1.5]


def test_traced_step_compiles_once():
  fn = jax.jit(chex.assert_max_traces(curriculum_weights, n=1), static_argnums=(1, 2))
  values = [float(fn(jnp.int32(s), SEED_TOTAL, CurriculumConfig())["layerwise"]) for s in range(0, SEED_TOTAL, 7481)]
  np.testing.assert_allclose(values, [0.0] * 7 + [0.05] * 4)


@pytest.mark.parametrize("change, field", [
    (dict(boundaries=(0.6, 0.3)), "boundaries"),
    (dict(boundaries=(0.0, 0.6)), "boundaries"),
    (dict(kd=(0.7, 0.7)), "kd"),
    (dict(lm=(0.3, -0.1, 0.3)), "lm"),
    (dict(temperature=(2.0, 0.0, 1.0)), "temperature"),
    (dict(ramp_fraction=1.5), "ramp_fraction"),
])
def test_problems_name_the_field(change, field):
  assert curriculum.problem(CurriculumConfig(**change))[0] == field
  assert curriculum.problem(CurriculumConfig()) is None
