"""The student-aware router (jaxdistill/objective/router.py): layers, schedules, gates and its three losses.

Every number is checked against an independent float64 NumPy reference written below from the
docstring formulas; the functions under test are never used to build their own expected values.
"""

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxdistill.objective import router
from jaxdistill.objective.router import RouterConfig

# --------------------------------------------------------------------------------------------
# Float64 NumPy references.


def _np_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  z = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return z / np.sum(z, axis=axis, keepdims=True)


def _np_gates(logits_BxLxE, top_k, temperature):
  """softmax(logits / T) over each token's top_k largest logits (ties: lower index first), renormalised."""
  scaled = np.asarray(logits_BxLxE, np.float64) / temperature
  order = np.argsort(-scaled, axis=-1, kind="stable")
  keep = np.zeros(scaled.shape, bool)
  np.put_along_axis(keep, order[..., :top_k], True, axis=-1)
  z = np.where(keep, np.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
  return z / z.sum(-1, keepdims=True)


def _np_masked_mean(value_BxL, mask_BxL):
  mask = np.asarray(mask_BxL, np.float64)
  return float(np.sum(value_BxL * mask) / max(mask.sum(), 1.0))


def _np_rms_normalise(x_ExBxLxD):
  x = np.asarray(x_ExBxLxD, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _np_feature_per_token(projected_BxLxD, gates_BxLxE, experts_ExBxLxD):
  target_BxLxD = np.einsum("ble,ebld->bld", np.float64(gates_BxLxE), np.float64(experts_ExBxLxD))
  return np.mean(np.square(np.float64(projected_BxLxD) - target_BxLxD), axis=-1), target_BxLxD


def _np_load_balance(logits_BxLxE, gates_BxLxE, temperature, mask_BxL):
  """E * sum_e f_e P_e, f_e: share of chosen (token, expert) pairs, P_e: mean routing probability."""
  mask_BxLx1 = np.float64(mask_BxL)[..., None]
  chosen_BxLxE = (np.asarray(gates_BxLxE) > 0) * mask_BxLx1
  share_E = chosen_BxLxE.sum((0, 1)) / max(chosen_BxLxE.sum(), 1.0)
  probs_BxLxE = _np_softmax(np.float64(logits_BxLxE) / temperature) * mask_BxLx1
  mean_prob_E = probs_BxLxE.sum((0, 1)) / max(mask_BxLx1.sum(), 1.0)
  return logits_BxLxE.shape[-1] * float(np.sum(share_E * mean_prob_E)), share_E


def _np_alignment_per_query(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL):
  """Per query: sum over unmasked keys with p > 0 of p (log p - log q); p = gate mix of head-averaged experts."""
  experts_ExBxLxL = np.stack([np.float64(m).mean(axis=1) for m in expert_maps])
  p_BxLxL = np.einsum("bqe,ebqk->bqk", np.float64(gates_BxLxE), experts_ExBxLxL)
  q_BxLxL = np.float64(student_BxHxLxL).mean(axis=1)
  keys_Bx1xL = np.asarray(mask_BxL, bool)[:, None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = p_BxLxL * (np.log(np.maximum(p_BxLxL, 1e-12)) - np.log(np.maximum(q_BxLxL, 1e-12)))
  return np.sum(np.where(keys_Bx1xL & (p_BxLxL > 0), terms, 0.0), axis=-1)


def _np_alignment(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL):
  return _np_masked_mean(_np_alignment_per_query(student_BxHxLxL, expert_maps, gates_BxLxE, mask_BxL), mask_BxL)


# --------------------------------------------------------------------------------------------
# Inputs.

B, L, E, D = 2, 6, 4, 8
# Batch row 0 is right-padded, row 1 left-padded (so padded keys are visible to real queries' past).
MASK_BxL = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], np.int32)


def _causal_maps(rng, batch, heads, length, mask_BxL, sharpness=2.0):
  """Random row-stochastic causal maps; a query attends only to unmasked past keys (any past key if none)."""
  logits = sharpness * rng.normal(size=(batch, heads, length, length))
  causal_LxL = np.tril(np.ones((length, length), bool))
  allowed_BxLxL = causal_LxL[None] & np.asarray(mask_BxL, bool)[:, None, :]
  allowed_BxLxL = np.where(allowed_BxLxL.any(-1, keepdims=True), allowed_BxLxL, causal_LxL[None])
  z = np.where(allowed_BxLxL[:, None], np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  return z / z.sum(-1, keepdims=True)


def _random_gates(rng, top_k=2, temperature=0.7, shape=(B, L, E)):
  logits_BxLxE = rng.normal(size=shape)
  return logits_BxLxE, _np_gates(logits_BxLxE, top_k, temperature)


# --------------------------------------------------------------------------------------------
# expert_layers and schedule.


@pytest.mark.parametrize("teacher_layers, num_experts, expected", [
    (12, 4, (3, 6, 9, 12)),
    (3, 4, (1, 2, 2, 3)),       # 0.75, 1.5, 2.25, 3 rounded
    (4, 4, (1, 2, 3, 4)),
    (8, 2, (4, 8)),
    (10, 3, (3, 7, 10)),        # 3.33, 6.67, 10
    (5, 1, (5,)),
])
def test_expert_layers_hand_computed(teacher_layers, num_experts, expected):
  assert router.expert_layers(teacher_layers, num_experts) == expected


@pytest.mark.parametrize("teacher_layers, num_experts", [(2, 4), (1, 2), (3, 6)])
def test_expert_layers_stay_in_one_to_teacher_layers_when_experts_outnumber_layers(teacher_layers, num_experts):
  layers = router.expert_layers(teacher_layers, num_experts)
  assert len(layers) == num_experts and layers[-1] == teacher_layers
  assert all(1 <= e <= teacher_layers for e in layers), layers


def _np_schedule(progress, cfg):
  p = float(np.clip(progress, 0.0, 1.0))
  top_k = int(np.clip(np.round(cfg.top_k_start + (cfg.top_k_end - cfg.top_k_start) * p), 1, cfg.num_experts))
  return top_k, cfg.temperature_start + (cfg.temperature_end - cfg.temperature_start) * p


@pytest.mark.parametrize("progress, top_k, temperature", [
    (0.0, 1, 2.0), (0.3, 1, 1.55), (0.5, 2, 1.25), (0.8, 2, 0.8), (1.0, 2, 0.5),
    (-0.5, 1, 2.0), (3.0, 2, 0.5),   # outside [0, 1]: clipped
])
def test_schedule_default_config_hand_values(progress, top_k, temperature):
  k, t = router.schedule(progress, RouterConfig())
  chex.assert_type(k, jnp.int32)
  chex.assert_type(t, jnp.float32)
  assert int(k) == top_k
  np.testing.assert_allclose(float(t), temperature, rtol=1e-6)
  assert (top_k, temperature) == pytest.approx(_np_schedule(progress, RouterConfig()))


def test_schedule_under_jit_with_traced_progress_and_clipping_to_num_experts():
  cfg = RouterConfig(num_experts=4, top_k_start=1, top_k_end=4, temperature_start=1.5, temperature_end=0.25)
  wide = RouterConfig(num_experts=4, top_k_start=0, top_k_end=7, temperature_start=1.0, temperature_end=3.0)
  schedule_cfg = jax.jit(lambda p: router.schedule(p, cfg))
  schedule_wide = jax.jit(lambda p: router.schedule(p, wide))
  # 1 + 3p: 1.3, 1.9, 2.35, 3.1, 3.7 -> 1, 2, 2, 3, 4 (no value near .5, so no rounding-mode question).
  for p, k_expected in [(-1.0, 1), (0.0, 1), (0.1, 1), (0.3, 2), (0.45, 2), (0.7, 3), (0.9, 4), (1.0, 4), (2.0, 4)]:
    k, t = schedule_cfg(jnp.float32(p))
    assert int(k) == k_expected == _np_schedule(p, cfg)[0], p
    np.testing.assert_allclose(float(t), _np_schedule(p, cfg)[1], rtol=1e-6, atol=1e-7)
  # 0 + 7p is clipped to [1, num_experts]: 0 -> 1, 0.05 -> round(0.35) = 0 -> 1, 1 -> 7 -> 4.
  for p, k_expected, t_expected in [(0.0, 1, 1.0), (0.05, 1, 1.1), (0.3, 2, 1.6), (1.0, 4, 3.0), (5.0, 4, 3.0)]:
    k, t = schedule_wide(jnp.float32(p))
    assert int(k) == k_expected == _np_schedule(p, wide)[0], p
    np.testing.assert_allclose(float(t), t_expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# gates.


def test_gates_hand_computed_three_experts():
  logits_1x1x3 = jnp.array([[[2.0, 1.0, 0.0]]])
  # top_k=2, T=1: softmax over {2, 1} = (e / (e + 1), 1 / (e + 1), 0) = (0.7311, 0.2689, 0).
  e = np.e
  np.testing.assert_allclose(router.gates(logits_1x1x3, 2, 1.0)[0, 0], [e / (e + 1), 1 / (e + 1), 0.0], rtol=1e-6)
  # top_k=2, T=2: logits/T = (1, 0.5, 0) -> (e^.5 / (e^.5 + 1), 1 / (e^.5 + 1), 0) = (0.6225, 0.3775, 0).
  s = np.exp(0.5)
  np.testing.assert_allclose(router.gates(logits_1x1x3, 2, 2.0)[0, 0], [s / (s + 1), 1 / (s + 1), 0.0], rtol=1e-6)
  # top_k=1: all weight on the largest; top_k=3: the full softmax (e^2, e, 1) / (e^2 + e + 1).
  np.testing.assert_allclose(router.gates(logits_1x1x3, 1, 1.0)[0, 0], [1.0, 0.0, 0.0], atol=0)
  full = np.array([e * e, e, 1.0]) / (e * e + e + 1.0)   # (0.6652, 0.2447, 0.0900)
  np.testing.assert_allclose(router.gates(logits_1x1x3, 3, 1.0)[0, 0], full, rtol=1e-6)
  # The order of the experts does not matter: the largest logits win wherever they sit.
  np.testing.assert_allclose(router.gates(jnp.array([[[0.0, 2.0, 1.0]]]), 2, 1.0)[0, 0],
                             [0.0, e / (e + 1), 1 / (e + 1)], rtol=1e-6)


def test_gates_with_traced_top_k_match_reference():
  rng = np.random.default_rng(0)
  num_experts = 6
  logits_BxLxE = rng.normal(size=(B, L, num_experts)).astype(np.float32)
  gates_jit = jax.jit(router.gates)
  for top_k in range(1, num_experts + 1):
    for temperature in (0.5, 2.0):
      gates_BxLxE = np.asarray(gates_jit(logits_BxLxE, jnp.int32(top_k), jnp.float32(temperature)))
      chex.assert_shape(gates_BxLxE, (B, L, num_experts))
      np.testing.assert_array_equal(np.sum(gates_BxLxE > 0, axis=-1), np.full((B, L), top_k))
      np.testing.assert_allclose(gates_BxLxE.sum(-1), 1.0, rtol=1e-6)
      np.testing.assert_allclose(gates_BxLxE, _np_gates(logits_BxLxE, top_k, temperature), rtol=1e-5, atol=1e-7)


def test_gates_ties_keep_exactly_top_k_and_gradients_are_finite():
  tied_1x2x4 = jnp.array([[[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 3.0, 3.0]]])
  gates_1x2x4 = router.gates(tied_1x2x4, jnp.int32(2), 1.0)
  np.testing.assert_allclose(gates_1x2x4[0], [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]], atol=1e-7)
  # The masked-out logits are -inf inside the softmax; their gradient must be exactly 0, not NaN.
  weights_1x2x4 = jnp.arange(8.0).reshape(1, 2, 4)
  grad_1x2x4 = jax.grad(lambda l: jnp.sum(router.gates(l, 2, 1.0) * weights_1x2x4))(tied_1x2x4)
  chex.assert_tree_all_finite(grad_1x2x4)
  np.testing.assert_array_equal(np.asarray(grad_1x2x4)[0, 0, 2:], 0.0)
  # Kept pair with equal gates 0.5: d(0.5 w0 + 0.5 w1)/dl0 = 0.5 * 0.5 * (w0 - w1) = -0.25.
  np.testing.assert_allclose(grad_1x2x4[0, 0, :2], [-0.25, 0.25], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# normalized_experts.


def test_normalized_experts_have_unit_rms_whatever_the_scale_and_no_gradient():
  rng = np.random.default_rng(1)
  states_ExBxLxD = [rng.normal(size=(B, L, D)).astype(np.float32) * s for s in (1.0, 1000.0, 0.5, 37.0)]
  out_ExBxLxD = router.normalized_experts([jnp.asarray(x) for x in states_ExBxLxD])
  chex.assert_shape(out_ExBxLxD, (4, B, L, D))
  chex.assert_type(out_ExBxLxD, jnp.float32)
  rms_ExBxL = np.sqrt(np.mean(np.square(np.float64(out_ExBxLxD)), axis=-1))
  np.testing.assert_allclose(rms_ExBxL, 1.0, atol=1e-3)
  np.testing.assert_allclose(out_ExBxLxD, _np_rms_normalise(states_ExBxLxD), rtol=1e-5, atol=1e-6)
  # x1000 gives the same normalised vectors.
  scaled_ExBxLxD = router.normalized_experts([jnp.asarray(x * 1000.0) for x in states_ExBxLxD])
  np.testing.assert_allclose(scaled_ExBxLxD, out_ExBxLxD, rtol=1e-5, atol=1e-5)

  weights_ExBxLxD = jnp.asarray(rng.normal(size=(4, B, L, D)), jnp.float32)
  grads = jax.grad(lambda xs: jnp.sum(router.normalized_experts(xs) * weights_ExBxLxD))(
      [jnp.asarray(x) for x in states_ExBxLxD])
  assert len(grads) == 4
  for g_BxLxD in grads:
    np.testing.assert_array_equal(g_BxLxD, 0.0)


# --------------------------------------------------------------------------------------------
# feature_loss.


def _feature_inputs(seed=2):
  rng = np.random.default_rng(seed)
  projected_BxLxD = rng.normal(size=(B, L, D)).astype(np.float32)
  _, gates_BxLxE = _random_gates(rng)
  scales_Ex1x1x1 = np.array([1.0, 5.0, 0.1, 30.0])[:, None, None, None]
  experts_ExBxLxD = _np_rms_normalise(rng.normal(size=(E, B, L, D)) * scales_Ex1x1x1)
  return projected_BxLxD, gates_BxLxE.astype(np.float32), experts_ExBxLxD.astype(np.float32)


def test_feature_loss_matches_reference_and_masked_tokens_do_not_count():
  projected_BxLxD, gates_BxLxE, experts_ExBxLxD = _feature_inputs()
  per_token_BxL, _ = _np_feature_per_token(projected_BxLxD, gates_BxLxE, experts_ExBxLxD)
  expected = _np_masked_mean(per_token_BxL, MASK_BxL)
  value = router.feature_loss(projected_BxLxD, gates_BxLxE, experts_ExBxLxD, MASK_BxL)
  chex.assert_shape(value, ())
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert expected > 0.1   # a real, non-degenerate value

  pad_BxLx1 = (MASK_BxL == 0)[..., None]
  garbage = np.random.default_rng(3)
  value_garbage = router.feature_loss(
      np.where(pad_BxLx1, 1e4 * garbage.normal(size=projected_BxLxD.shape), projected_BxLxD).astype(np.float32),
      np.where(pad_BxLx1, garbage.uniform(size=gates_BxLxE.shape), gates_BxLxE).astype(np.float32),
      np.where(pad_BxLx1[None], 1e4, experts_ExBxLxD).astype(np.float32), MASK_BxL)
  np.testing.assert_allclose(float(value_garbage), float(value), rtol=1e-6)


def test_feature_loss_of_zero_projection_is_mean_squared_target_at_most_one():
  _, gates_BxLxE, experts_ExBxLxD = _feature_inputs(seed=4)
  _, target_BxLxD = _np_feature_per_token(np.zeros((B, L, D)), gates_BxLxE, experts_ExBxLxD)
  expected = _np_masked_mean(np.mean(np.square(target_BxLxD), -1), MASK_BxL)
  value = float(router.feature_loss(jnp.zeros((B, L, D)), gates_BxLxE, experts_ExBxLxD, MASK_BxL))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert 0.2 < value <= 1.0
  # One expert per token (top_k=1): the target is a unit-RMS state (up to the 1e-6 eps), so the loss is ~1.
  one_hot_BxLxE = np.eye(E, dtype=np.float32)[np.arange(B * L).reshape(B, L) % E]
  _, target_one_BxLxD = _np_feature_per_token(np.zeros((B, L, D)), one_hot_BxLxE, experts_ExBxLxD)
  value_one = float(router.feature_loss(jnp.zeros((B, L, D)), one_hot_BxLxE, experts_ExBxLxD, MASK_BxL))
  np.testing.assert_allclose(value_one, _np_masked_mean(np.mean(np.square(target_one_BxLxD), -1), MASK_BxL), rtol=1e-5)
  np.testing.assert_allclose(value_one, 1.0, atol=1e-4)
  assert value > value_one - 0.5   # mixing shrinks the target, but not to nothing


def test_feature_loss_gradients_reach_projection_and_gates():
  projected_BxLxD, gates_BxLxE, experts_ExBxLxD = _feature_inputs(seed=5)
  grad_p_BxLxD, grad_g_BxLxE = jax.grad(router.feature_loss, argnums=(0, 1))(
      projected_BxLxD, gates_BxLxE, experts_ExBxLxD, MASK_BxL)
  # d/dP = 2 m (P - T) / (D N);  d/dg_e = -2 m <P - T, t_e> / (D N),  N = number of real tokens.
  _, target_BxLxD = _np_feature_per_token(projected_BxLxD, gates_BxLxE, experts_ExBxLxD)
  m_BxLx1 = np.float64(MASK_BxL)[..., None]
  residual_BxLxD = (np.float64(projected_BxLxD) - target_BxLxD) * m_BxLx1 * 2.0 / (D * MASK_BxL.sum())
  np.testing.assert_allclose(grad_p_BxLxD, residual_BxLxD, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad_g_BxLxE, -np.einsum("bld,ebld->ble", residual_BxLxD, np.float64(experts_ExBxLxD)),
                             rtol=1e-4, atol=1e-7)
  real_BxL = MASK_BxL.astype(bool)
  assert np.all(np.abs(np.asarray(grad_p_BxLxD)[real_BxL]).sum(-1) > 0)
  assert np.all(np.abs(np.asarray(grad_g_BxLxE)[real_BxL]).sum(-1) > 0)
  np.testing.assert_array_equal(np.asarray(grad_p_BxLxD)[~real_BxL], 0.0)
  np.testing.assert_array_equal(np.asarray(grad_g_BxLxE)[~real_BxL], 0.0)


def test_feature_loss_check_grads_float64():
  projected_BxLxD, gates_BxLxE, experts_ExBxLxD = _feature_inputs(seed=6)
  # feature_loss casts the projection to float32 (the loss is float64 only through the gates), so the
  # finite differences carry float32 rounding: ~4e-5 relative here, above check_grads' float64 default.
  with jax.enable_x64(True):
    experts = jnp.asarray(experts_ExBxLxD, jnp.float64)
    mask = jnp.asarray(MASK_BxL)
    check_grads(lambda p, g: router.feature_loss(p, g, experts, mask),
                (jnp.asarray(projected_BxLxD, jnp.float64), jnp.asarray(gates_BxLxE, jnp.float64)),
                order=1, modes=["rev"], atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# load_balance_loss.


def test_load_balance_is_one_for_uniform_use():
  mask_1x8 = np.ones((1, 8), np.int32)
  # Equal logits, every expert chosen: f = P = 1/4, so 4 * sum 1/16 = 1.
  equal_1x8x4 = jnp.zeros((1, 8, E))
  all_gates_1x8x4 = router.gates(equal_1x8x4, E, 1.0)
  assert float(router.load_balance_loss(equal_1x8x4, all_gates_1x8x4, 1.0, mask_1x8)) == 1.0
  # Hand-made balanced assignment: token t prefers expert t % 4 (logit 3, others 0), top_k = 1.
  # f = (1/4, ...) and by symmetry P = (1/4, ...) even though each token's distribution is peaked.
  balanced_1x8x4 = 3.0 * np.eye(E, dtype=np.float32)[np.arange(8) % E][None]
  one_hot_1x8x4 = np.eye(E, dtype=np.float32)[np.arange(8) % E][None]
  np.testing.assert_array_equal(router.gates(balanced_1x8x4, 1, 0.7), one_hot_1x8x4)
  value = float(router.load_balance_loss(balanced_1x8x4, one_hot_1x8x4, 0.7, mask_1x8))
  np.testing.assert_allclose(value, 1.0, rtol=1e-6)
  np.testing.assert_allclose(value, _np_load_balance(balanced_1x8x4, one_hot_1x8x4, 0.7, mask_1x8)[0], rtol=1e-6)


def test_load_balance_grows_when_routing_concentrates():
  mask_1x8 = np.ones((1, 8), np.int32)
  values = []
  for peak in (0.0, 1.0, 3.0, 8.0):
    logits_1x8x4 = np.tile(np.array([peak, 0.0, 0.0, 0.0], np.float32), (1, 8, 1))
    gates_1x8x4 = np.zeros((1, 8, 4), np.float32)
    gates_1x8x4[..., 0] = 1.0                       # every token routed to expert 0: f = (1, 0, 0, 0)
    value = float(router.load_balance_loss(logits_1x8x4, gates_1x8x4, 1.0, mask_1x8))
    p0 = np.exp(peak) / (np.exp(peak) + 3.0)        # then the loss is E * P_0
    np.testing.assert_allclose(value, 4.0 * p0, rtol=1e-6)
    values.append(value)
  assert values[0] == pytest.approx(1.0) and values[1] > 1.0 and values[-1] > 3.99
  assert values == sorted(values)


def test_load_balance_matches_reference_with_mask():
  rng = np.random.default_rng(7)
  logits_BxLxE, gates_BxLxE = _random_gates(rng, top_k=2, temperature=0.7)
  logits_BxLxE = (2.0 * logits_BxLxE).astype(np.float32)
  gates_BxLxE = _np_gates(logits_BxLxE, 2, 0.7).astype(np.float32)
  expected, _ = _np_load_balance(logits_BxLxE, gates_BxLxE, 0.7, MASK_BxL)
  value = router.load_balance_loss(logits_BxLxE, gates_BxLxE, 0.7, MASK_BxL)
  chex.assert_shape(value, ())
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert expected > 1.0   # random routing on 8 tokens is not perfectly balanced
  # Garbage (and different choices) at padded tokens changes nothing.
  pad_BxLx1 = (MASK_BxL == 0)[..., None]
  garbage_logits_BxLxE = np.where(pad_BxLx1, 50.0 * rng.normal(size=logits_BxLxE.shape), logits_BxLxE)
  value_garbage = router.load_balance_loss(garbage_logits_BxLxE, np.where(pad_BxLx1, 1.0, gates_BxLxE), 0.7, MASK_BxL)
  np.testing.assert_allclose(float(value_garbage), float(value), rtol=1e-6)


def test_load_balance_gradient_is_that_of_stopped_share_times_mean_prob():
  rng = np.random.default_rng(8)
  temperature = 0.8
  logits_BxLxE = (1.5 * rng.normal(size=(B, L, E))).astype(np.float32)
  gates_BxLxE = _np_gates(logits_BxLxE, 2, temperature).astype(np.float32)
  grad_l_BxLxE, grad_g_BxLxE = jax.grad(router.load_balance_loss, argnums=(0, 1))(
      logits_BxLxE, gates_BxLxE, temperature, MASK_BxL)
  # Reference: L = E / N * sum_t m_t sum_e f_e p_te with f constant, p = softmax(z / T):
  #   dL/dz_tj = E / (N T) * m_t * p_tj * (f_j - sum_e f_e p_te).
  _, share_E = _np_load_balance(logits_BxLxE, gates_BxLxE, temperature, MASK_BxL)
  p_BxLxE = _np_softmax(np.float64(logits_BxLxE) / temperature)
  expected_BxLxE = (E / (MASK_BxL.sum() * temperature) * np.float64(MASK_BxL)[..., None]
                    * p_BxLxE * (share_E - np.sum(p_BxLxE * share_E, -1, keepdims=True)))
  np.testing.assert_allclose(grad_l_BxLxE, expected_BxLxE, rtol=1e-4, atol=1e-7)
  assert np.abs(expected_BxLxE).max() > 1e-2
  np.testing.assert_array_equal(grad_g_BxLxE, 0.0)   # the share (through gates > 0) has no gradient


# --------------------------------------------------------------------------------------------
# attention_alignment_loss.


def _alignment_inputs(seed=9, heads=2, expert_heads=(2, 4, 1, 3)):
  rng = np.random.default_rng(seed)
  student_BxHxLxL = _causal_maps(rng, B, heads, L, MASK_BxL).astype(np.float32)
  expert_maps = [_causal_maps(rng, B, h, L, MASK_BxL).astype(np.float32) for h in expert_heads]
  _, gates_BxLxE = _random_gates(rng, top_k=2, temperature=0.7, shape=(B, L, len(expert_heads)))
  return student_BxHxLxL, expert_maps, gates_BxLxE.astype(np.float32)


def test_attention_alignment_matches_reference_and_is_positive():
  student_BxHxLxL, expert_maps, gates_BxLxE = _alignment_inputs()
  np.testing.assert_allclose(student_BxHxLxL.sum(-1), 1.0, rtol=1e-6)
  expected = _np_alignment(student_BxHxLxL, expert_maps, gates_BxLxE, MASK_BxL)
  value = router.attention_alignment_loss(student_BxHxLxL, expert_maps, gates_BxLxE, MASK_BxL)
  chex.assert_shape(value, ())
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert expected > 0.05
  # Rows of padded queries do not count: garbage there leaves the value unchanged.
  pad_Bx1xLx1 = (MASK_BxL == 0)[:, None, :, None]
  student_garbage = np.where(pad_Bx1xLx1, 0.123, student_BxHxLxL).astype(np.float32)
  value_garbage = router.attention_alignment_loss(student_garbage, expert_maps, gates_BxLxE, MASK_BxL)
  np.testing.assert_allclose(float(value_garbage), float(value), rtol=1e-6)


def test_attention_alignment_is_zero_when_student_follows_the_gated_mix():
  _, expert_maps, gates_BxLxE = _alignment_inputs(seed=10, expert_heads=(2, 2, 2, 2))
  # Student head h = sum_e g_e(query) A_e[h]: each head is row-stochastic, and their mean is the target.
  student_BxHxLxL = np.einsum("bqe,ebhqk->bhqk", np.float64(gates_BxLxE), np.stack(expert_maps)).astype(np.float32)
  np.testing.assert_allclose(student_BxHxLxL.sum(-1), 1.0, rtol=1e-6)
  assert np.abs(student_BxHxLxL[:, 0] - student_BxHxLxL[:, 1]).max() > 0.1   # the heads themselves differ
  value = float(router.attention_alignment_loss(student_BxHxLxL, expert_maps, gates_BxLxE, MASK_BxL))
  assert abs(value) < 1e-6
  # Mixing with other gates (same experts, same student) gives a strictly positive loss.
  other_gates_BxLxE = np.roll(gates_BxLxE, 1, axis=-1)
  value_other = float(router.attention_alignment_loss(student_BxHxLxL, expert_maps, other_gates_BxLxE, MASK_BxL))
  np.testing.assert_allclose(value_other, _np_alignment(student_BxHxLxL, expert_maps, other_gates_BxLxE, MASK_BxL),
                             rtol=1e-5)
  assert value_other > 1e-2


def test_attention_alignment_cannot_be_zeroed_by_the_gates():
  # Two experts, one fixed student unlike either: every per-token gate (w, 1 - w) leaves KL > 0.
  rng = np.random.default_rng(11)
  mask_BxL = np.ones((B, L), np.int32)
  student_BxHxLxL = _causal_maps(rng, B, 2, L, mask_BxL, sharpness=3.0).astype(np.float32)
  expert_maps = [_causal_maps(rng, B, 2, L, mask_BxL, sharpness=3.0).astype(np.float32) for _ in range(2)]
  grid_W = np.linspace(0.0, 1.0, 401)
  per_query_WxBxL = np.stack([
      _np_alignment_per_query(student_BxHxLxL, expert_maps, np.stack([np.full((B, L), w), np.full((B, L), 1 - w)], -1),
                              mask_BxL) for w in grid_W])
  # Lower bound over any gates: the per-query minimum over the grid (KL is convex in w), averaged.
  lower_bound = _np_masked_mean(per_query_WxBxL.min(0), mask_BxL)
  assert lower_bound > 0.05
  loss_fn = jax.jit(router.attention_alignment_loss)
  for w in (0.0, 0.3, 1.0):   # constant gates on the grid agree with the reference
    gates_BxLx2 = np.stack([np.full((B, L), w), np.full((B, L), 1 - w)], -1).astype(np.float32)
    np.testing.assert_allclose(float(loss_fn(student_BxHxLxL, expert_maps, gates_BxLx2, mask_BxL)),
                               _np_masked_mean(per_query_WxBxL[np.argmin(np.abs(grid_W - w))], mask_BxL), rtol=1e-5)
  # Gates from ever larger (and temperature-sharpened) logits stay above the bound.
  logits_BxLx2 = rng.normal(size=(B, L, 2)).astype(np.float32)
  for scale in (0.0, 1.0, 10.0, 1e3, 1e6):
    for top_k in (1, 2):
      gates_BxLx2 = router.gates(scale * logits_BxLx2, jnp.int32(top_k), 0.5)
      value = float(loss_fn(student_BxHxLxL, expert_maps, gates_BxLx2, mask_BxL))
      assert value >= 0.999 * lower_bound, (scale, top_k, value, lower_bound)


def test_attention_alignment_gradients_reach_gates_and_student_not_experts():
  student_BxHxLxL, expert_maps, gates_BxLxE = _alignment_inputs(seed=12)
  grad_s, grad_experts, grad_g_BxLxE = jax.grad(router.attention_alignment_loss, argnums=(0, 1, 2))(
      student_BxHxLxL, expert_maps, gates_BxLxE, MASK_BxL)
  chex.assert_tree_all_finite((grad_s, grad_g_BxLxE))
  real_BxL = MASK_BxL.astype(bool)
  # d/dg_e = sum_k A_e[q, k] (log p_k - log q_k + 1) / N at real queries (the gates are not renormalised).
  p_BxLxL = np.einsum("bqe,ebqk->bqk", np.float64(gates_BxLxE), np.stack([np.float64(m).mean(1) for m in expert_maps]))
  q_BxLxL = np.float64(student_BxHxLxL).mean(1)
  keep_BxLxL = real_BxL[:, :, None] & real_BxL[:, None, :] & (p_BxLxL > 0)
  safe_p_BxLxL, safe_q_BxLxL = np.where(keep_BxLxL, p_BxLxL, 1.0), np.where(keep_BxLxL, q_BxLxL, 1.0)
  log_ratio_BxLxL = np.where(keep_BxLxL, np.log(safe_p_BxLxL / safe_q_BxLxL) + 1.0, 0.0)
  expected_g_BxLxE = np.einsum("ebqk,bqk->bqe", np.stack([np.float64(m).mean(1) for m in expert_maps]),
                               log_ratio_BxLxL) * real_BxL[..., None] / real_BxL.sum()
  np.testing.assert_allclose(grad_g_BxLxE, expected_g_BxLxE, rtol=1e-4, atol=1e-6)
  assert np.all(np.abs(np.asarray(grad_g_BxLxE)[real_BxL]).sum(-1) > 1e-2)
  np.testing.assert_array_equal(np.asarray(grad_g_BxLxE)[~real_BxL], 0.0)
  # d/dq_hk of sum p log(p / q) with q = mean_h: -p_k / (H q_k N) at visible keys of real queries.
  expected_Bx1xLxL = np.where(keep_BxLxL, -safe_p_BxLxL / (2 * safe_q_BxLxL * real_BxL.sum()), 0.0)[:, None]
  np.testing.assert_allclose(grad_s, np.broadcast_to(expected_Bx1xLxL, grad_s.shape), rtol=1e-4, atol=1e-7)
  for g in grad_experts:
    np.testing.assert_array_equal(g, 0.0)


def test_attention_alignment_check_grads_float64():
  student_BxHxLxL, expert_maps, gates_BxLxE = _alignment_inputs(seed=13)
  with jax.enable_x64(True):
    maps = [jnp.asarray(m, jnp.float64) for m in expert_maps]
    mask = jnp.asarray(MASK_BxL)
    check_grads(lambda s, g: router.attention_alignment_loss(s, maps, g, mask),
                (jnp.asarray(student_BxHxLxL, jnp.float64), jnp.asarray(gates_BxLxE, jnp.float64)),
                order=1, modes=["rev"])   # default tolerances: the loss is computed (and returned) in float32


# --------------------------------------------------------------------------------------------
# Router module.


def test_router_module_shapes_and_values():
  rng = np.random.default_rng(14)
  student_BxLxDs = jnp.asarray(rng.normal(size=(B, L, 16)), jnp.bfloat16)
  module = router.Router(num_experts=E, teacher_dim=24)
  params = module.init(jax.random.key(0), student_BxLxDs)["params"]
  chex.assert_shape(params["gate"]["kernel"], (16, E))
  chex.assert_shape(params["proj"]["kernel"], (16, 24))
  gate_logits_BxLxE, projected_BxLxDt = module.apply({"params": params}, student_BxLxDs)
  chex.assert_shape(gate_logits_BxLxE, (B, L, E))
  chex.assert_shape(projected_BxLxDt, (B, L, 24))
  chex.assert_type((gate_logits_BxLxE, projected_BxLxDt), jnp.float32)
  x_BxLxDs = np.float64(np.asarray(student_BxLxDs, np.float32))

  def dense(name):
    return x_BxLxDs @ np.float64(params[name]["kernel"]) + np.float64(params[name]["bias"])

  np.testing.assert_allclose(gate_logits_BxLxE, dense("gate"), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(projected_BxLxDt, dense("proj"), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(gate_logits_BxLxE)).max() > 1e-2   # a real, non-zero map
