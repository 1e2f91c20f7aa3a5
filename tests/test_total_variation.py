"""total_variation: the TVD loss against a float64 NumPy reference, its gradient, its registry entry in a run."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.errors import ConfigError
from jaxdistill.objective import COMPONENTS, init_heads, objective
from jaxdistill.objective.components.total_variation import total_variation_loss

B, L, V = 3, 5, 11
REF_TOL = dict(rtol=2e-5, atol=2e-6)  # float32 computation against a float64 reference
MASK_BxL = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)  # left- and right-padded


def _logits(seed, scale=2.0):
  return (scale * np.random.RandomState(seed).randn(B, L, V)).astype(np.float32)


def _np_tvd(student_BxLxV, teacher_BxLxV, mask_BxL, temperature):
  """By hand, in float64: 1/2 sum_v |softmax(z_t / T) - softmax(z_s / T)|, averaged over the masked positions."""
  def softmax(z):
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  per_token_BxL = 0.5 * np.abs(softmax(teacher_BxLxV) - softmax(student_BxLxV)).sum(-1)
  return float(per_token_BxL[mask_BxL == 1].mean())


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 4, B * L + 2])
def test_matches_the_float64_reference_under_jit_and_in_chunks(temperature, chunk_size):
  student, teacher = _logits(0), _logits(1)
  loss = jax.jit(functools.partial(total_variation_loss, chunk_size=chunk_size))
  value = float(loss(student, teacher, MASK_BxL, temperature=temperature))
  np.testing.assert_allclose(value, _np_tvd(student, teacher, MASK_BxL, temperature), **REF_TOL)
  assert 0 < value < 1


def test_masked_positions_do_not_count_and_the_bounds_hold():
  student, teacher = _logits(2), _logits(3)
  loss = jax.jit(total_variation_loss)
  masked = float(loss(student, teacher, MASK_BxL, temperature=1.5))
  # Anything at a masked position is selected away: huge logits there change nothing.
  garbage = np.where(MASK_BxL[..., None] == 0, 1e4, student).astype(np.float32)
  assert float(loss(garbage, teacher, MASK_BxL, temperature=1.5)) == pytest.approx(masked, rel=1e-6)
  # The masked mean is the mean over the real rows alone: row 2 (no padding) on its own...
  row = float(loss(student[2:], teacher[2:], np.ones((1, L), np.float32), temperature=1.5))
  np.testing.assert_allclose(row, _np_tvd(student[2:], teacher[2:], np.ones((1, L)), 1.5), **REF_TOL)
  # ...and the mask of all ones over the whole batch is the plain mean over every position.
  every = float(loss(student, teacher, np.ones((B, L), np.float32), temperature=1.5))
  np.testing.assert_allclose(every, _np_tvd(student, teacher, np.ones((B, L)), 1.5), **REF_TOL)
  # 0 for the same distribution; near 1 for two sharp distributions on different tokens; 0 with no token.
  assert float(loss(teacher, teacher, MASK_BxL, temperature=1.5)) == pytest.approx(0.0, abs=1e-7)
  sharp_s = np.zeros((B, L, V), np.float32)
  sharp_s[..., 0] = 50.0
  sharp_t = np.zeros((B, L, V), np.float32)
  sharp_t[..., 1] = 50.0
  assert float(loss(sharp_s, sharp_t, MASK_BxL, temperature=1.0)) == pytest.approx(1.0, abs=1e-6)
  assert float(loss(student, teacher, np.zeros((B, L), np.float32), temperature=1.0)) == 0.0


def test_gradient_matches_finite_differences_in_float64_and_skips_the_teacher():
  student, teacher = _logits(4), _logits(5)
  with jax.enable_x64(True):
    mask = jnp.asarray(MASK_BxL, jnp.float64)
    t = jnp.asarray(teacher, jnp.float64)
    s = jnp.asarray(student, jnp.float64)
    assert total_variation_loss(s, t, mask, temperature=1.5).dtype == jnp.float64
    check_grads(jax.jit(lambda x: total_variation_loss(x, t, mask, temperature=1.5, chunk_size=4)), (s,), order=1,
                modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    grad_s, grad_t = jax.grad(lambda x, y: total_variation_loss(x, y, mask, temperature=1.5), argnums=(0, 1))(s, t)
  np.testing.assert_array_equal(np.asarray(grad_t), 0.0)  # no gradient into the teacher
  np.testing.assert_array_equal(np.asarray(grad_s)[MASK_BxL == 0], 0.0)  # nor from masked positions
  assert np.all(np.isfinite(np.asarray(grad_s))) and np.abs(np.asarray(grad_s)).max() > 0


# --------------------------------------------------------------------------------------------
# Its registry entry: off by default, weighed by `curriculum.total_variation`, refused where it cannot run.

OFF = {"curriculum.attention": (0.0, 0.0, 0.0), "curriculum.feature": (0.0, 0.0, 0.0),
       "curriculum.layerwise": (0.0, 0.0, 0.0), "curriculum.contrastive": (0.0, 0.0, 0.0)}


def _parse(**overrides):
  return config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {**OFF, **overrides}))


def test_it_is_off_by_default_and_a_config_entry():
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke"))
  assert "total_variation" in COMPONENTS
  assert cfg.objective.curriculum.values("total_variation") == (0.0, 0.0, 0.0)
  assert not cfg.objective.enabled("total_variation")
  assert _parse(**{"curriculum.total_variation": (0.0, 0.2, 0.4)}).objective.enabled("total_variation")


def test_enabling_it_in_the_config_adds_weight_times_value_to_the_loss():
  off, on = _parse(), _parse(**{"curriculum.total_variation": (0.5, 0.5, 0.5)})
  vocab = 257  # the smoke config's byte tokenizer
  student, teacher = off.student.model_config(vocab), off.teacher.model_config(vocab)
  keys = jax.random.split(jax.random.key(0), 3)
  teacher_params = models.init_params(teacher, keys[0])
  trainable = {"student": models.init_params(student, keys[1])}
  ids_BxL = jax.random.randint(keys[2], (2, 12), 0, vocab)
  mask_BxL = jnp.ones_like(ids_BxL).at[1, -4:].set(0)
  batch = {"student_input_ids": ids_BxL, "student_attention_mask": mask_BxL, "teacher_input_ids": ids_BxL,
           "teacher_attention_mask": mask_BxL}
  results = []
  for cfg in (off, on):
    obj = dataclasses.replace(cfg.objective, total_steps=10).resolve_layers(student, teacher)
    trainable["heads"] = init_heads(obj, student, teacher, keys[1])
    run = jax.jit(functools.partial(objective, cfg=obj, student=student, teacher=teacher))
    results.append(run(trainable, teacher_params, batch, jnp.int32(0)))
  (loss_off, metrics_off), (loss_on, metrics_on) = results
  value = float(metrics_on["raw/total_variation"])
  assert float(metrics_on["weight/total_variation"]) == 0.5 and float(metrics_off["raw/total_variation"]) == 0.0
  # The value is the TVD of the two models' logits at the curriculum's temperature (1 in the smoke config).
  student_logits = models.forward(trainable["student"], student, ids_BxL, mask_BxL).logits_BxLxV
  teacher_logits = models.forward(teacher_params, teacher, ids_BxL, mask_BxL).logits_BxLxV
  np.testing.assert_allclose(value, _np_tvd(student_logits, teacher_logits, np.asarray(mask_BxL), 1.0), **REF_TOL)
  assert float(loss_on) - float(loss_off) == pytest.approx(0.5 * value, rel=1e-5)
  for c in ("kd", "lm"):  # the other components are untouched
    assert float(metrics_on[f"loss/{c}"]) == pytest.approx(float(metrics_off[f"loss/{c}"]), rel=1e-6)


def test_records_and_two_tokenizers_cannot_serve_it():
  on = {"curriculum.total_variation": (0.0, 0.1, 0.1)}
  with pytest.raises(ConfigError, match=r"'curriculum.total_variation' = \(0.0, 0.1, 0.1\) is not allowed: 0 in every "
                                        r"phase with offline_teacher.top_k=8 \(total_variation reads what"):
    _parse(**on, **{"offline_teacher.top_k": 8})
  objective_on = _parse(**on).objective
  with pytest.raises(ConfigError, match=r"'curriculum.total_variation' .* 0 in every phase when the teacher's "
                                        r"tokenizer differs from the run's \(total_variation cannot be computed"):
    dataclasses.replace(objective_on, aligned=True)
  assert dataclasses.replace(_parse().objective, aligned=True).aligned  # off, it is no obstacle
