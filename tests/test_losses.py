"""Distillation losses against float64 NumPy references written from the docstring formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxdistill.objective import losses

B, L, V, D = 2, 5, 11, 8
REF_TOL = dict(rtol=2e-5, atol=2e-6)  # float32 computation against a float64 reference
SAME_TOL = dict(rtol=1e-6, atol=1e-6)
CHUNK_SIZES = (None, 1, 3, 7, B * L + 4)
KD_CASES = [(mode, 0, "renormalize") for mode in losses.KD_MODES] + [
    (mode, 3, tail) for mode in losses.KD_MODES for tail in losses.TOPK_TAILS]
KD_IDS = [f"{mode}-top{k}-{tail}" for mode, k, tail in KD_CASES]
KD_CORE = [(mode, 0, "renormalize") for mode in losses.KD_MODES]  # every chunk size, compiled once each
KD_CORE_IDS = [f"{mode}-top0" for mode in losses.KD_MODES]
KD_TOPK = [("forward_kl", 3, "other_bucket"), ("reverse_kl", 3, "renormalize")]


# --------------------------------------------------------------------------------------------
# Inputs.

def _normal(seed, shape, scale=1.0):
  return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


def _mask(kind, batch=B, length=L):
  """'ones', or 'padded': row 0 left-padded by 1, row 1 right-padded by 2."""
  mask_BxL = np.ones((batch, length), np.float32)
  if kind == "padded":
    mask_BxL[0, :1] = 0
    mask_BxL[1, length - 2:] = 0
  return mask_BxL


def _labels(seed, ignore=True):
  labels_BxL = np.random.RandomState(seed).randint(0, V, (B, L)).astype(np.int32)
  if ignore:
    labels_BxL[0, 2] = labels_BxL[1, 0] = -100
  return labels_BxL


def _with_garbage(x, mask_BxL, seed, scale):
  """`x` ([B, L, ...]) with its mask-0 tokens overwritten by huge random values."""
  out = np.array(x)
  garbage = scale * np.random.RandomState(seed).randn(*out.shape).astype(out.dtype)
  out[mask_BxL == 0] = garbage[mask_BxL == 0]
  return out


def _attention_maps(seed, heads, mask_BxL):
  """Row-stochastic causal maps over valid keys, each query seeing itself (as the models build them)."""
  batch, length = mask_BxL.shape
  scores_BxHxLxL = np.random.RandomState(seed).randn(batch, heads, length, length)
  allowed_BxLxL = np.tril(np.ones((length, length), bool))[None] & (mask_BxL[:, None, :] > 0)
  allowed_BxLxL |= np.eye(length, dtype=bool)[None]
  weights = np.where(allowed_BxLxL[:, None], np.exp(scores_BxHxLxL), 0.0)
  return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# float64 NumPy references, from the docstrings.

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kl(p_V, q_V):
  """KL(p || q) with 0 log 0 = 0."""
  support = p_V > 0
  return float(np.sum(p_V[support] * (np.log(p_V[support]) - np.log(q_V[support]))))


def np_masked_token_mean(value_BxL, mask_BxL):
  mask = np.asarray(mask_BxL, np.float64)
  return float(np.sum(np.asarray(value_BxL, np.float64) * mask) / max(mask.sum(), 1.0))


def ref_kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature, mode, beta=0.5, top_k=0,
                tail="renormalize"):
  vocab = student_BxLxV.shape[-1]
  p_NxV = np.exp(np_log_softmax(np.reshape(teacher_BxLxV, (-1, vocab)) / temperature))
  q_NxV = np.exp(np_log_softmax(np.reshape(student_BxLxV, (-1, vocab)) / temperature))
  divergences = []
  for p, q in zip(p_NxV, q_NxV):
    if top_k:
      top = np.argsort(-p)[:top_k]
      if tail == "renormalize":
        p, q = p[top] / p[top].sum(), q[top] / q[top].sum()
      else:
        p, q = np.append(p[top], 1.0 - p[top].sum()), np.append(q[top], 1.0 - q[top].sum())
    if mode == "forward_kl":
      divergences.append(np_kl(p, q))
    elif mode == "reverse_kl":
      divergences.append(np_kl(q, p))
    else:
      m = beta * p + (1.0 - beta) * q
      divergences.append(beta * np_kl(p, m) + (1.0 - beta) * np_kl(q, m))
  return temperature ** 2 * np_masked_token_mean(np.reshape(divergences, np.shape(mask_BxL)), mask_BxL)


def ref_lm_loss(logits_BxLxV, labels_BxL, mask_BxL, label_smoothing=0.0):
  log_q_NxV = np_log_softmax(np.reshape(logits_BxLxV, (-1, logits_BxLxV.shape[-1])))
  total, count = 0.0, 0
  for log_q, label, keep in zip(log_q_NxV, np.ravel(labels_BxL), np.ravel(mask_BxL)):
    if keep and label >= 0:
      total += (1.0 - label_smoothing) * -log_q[label] + label_smoothing * np.mean(-log_q)
      count += 1
  return total / max(count, 1)


def ref_next_token_labels(ids_BxL, mask_BxL):
  labels_BxL, next_mask_BxL = np.zeros_like(ids_BxL), np.zeros_like(mask_BxL)
  for b in range(ids_BxL.shape[0]):
    for t in range(ids_BxL.shape[1] - 1):
      labels_BxL[b, t] = ids_BxL[b, t + 1]
      next_mask_BxL[b, t] = mask_BxL[b, t] and mask_BxL[b, t + 1]
  return labels_BxL, next_mask_BxL


def ref_align_heads(student_BxHsxLxL, teacher_BxHtxLxL):
  hs, ht = student_BxHsxLxL.shape[1], teacher_BxHtxLxL.shape[1]

  def grouped(x, groups):
    size = x.shape[1] // groups
    return np.stack([x[:, g * size:(g + 1) * size].mean(1) for g in range(groups)], axis=1)

  if hs == ht:
    return student_BxHsxLxL, teacher_BxHtxLxL
  if ht % hs == 0:
    return student_BxHsxLxL, grouped(teacher_BxHtxLxL, hs)
  if hs % ht == 0:
    return grouped(student_BxHsxLxL, ht), teacher_BxHtxLxL
  return student_BxHsxLxL.mean(1, keepdims=True), teacher_BxHtxLxL.mean(1, keepdims=True)


def ref_attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL):
  batch, heads, length, _ = student_BxHxLxL.shape
  per_query_BxL = np.zeros((batch, length))
  for b in range(batch):
    for i in range(length):
      for h in range(heads):
        for j in range(length):
          p, q = float(teacher_BxHxLxL[b, h, i, j]), float(student_BxHxLxL[b, h, i, j])
          if mask_BxL[b, j] and p > 0:
            per_query_BxL[b, i] += p * (np.log(p) - np.log(max(q, 1e-12))) / heads
  return np_masked_token_mean(per_query_BxL, mask_BxL)


def ref_hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, distance):
  p, t = np.asarray(projected_BxLxD, np.float64), np.asarray(target_BxLxD, np.float64)
  if distance == "nmse":
    per_token_BxL = np.sum((p - t) ** 2, -1) / np.sum(t ** 2, -1)
  else:
    per_token_BxL = 1.0 - np.sum(p * t, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
  return np_masked_token_mean(per_token_BxL, mask_BxL)


def ref_masked_mean_pool(hidden_BxLxD, mask_BxL):
  out_BxD = np.zeros((hidden_BxLxD.shape[0], hidden_BxLxD.shape[2]))
  for b in range(hidden_BxLxD.shape[0]):
    rows = [np.asarray(hidden_BxLxD[b, t], np.float64) for t in range(hidden_BxLxD.shape[1]) if mask_BxL[b, t]]
    if rows:
      out_BxD[b] = np.mean(rows, axis=0)
  return out_BxD


def ref_contrastive_loss(student_BxD, teacher_BxD, temperature, valid_B=None):
  """InfoNCE over the valid rows only (invalid rows dropped from the batch)."""
  keep = np.arange(len(student_BxD)) if valid_B is None else np.flatnonzero(valid_B)
  if not len(keep):
    return 0.0
  s = np.asarray(student_BxD, np.float64)[keep]
  t = np.asarray(teacher_BxD, np.float64)[keep]
  s /= np.linalg.norm(s, axis=-1, keepdims=True)
  t /= np.linalg.norm(t, axis=-1, keepdims=True)
  return float(-np.mean(np.diag(np_log_softmax(s @ t.T / temperature))))


def _kd(mode, top_k, tail, **kwargs):
  return functools.partial(losses.kd_loss, mode=mode, top_k=top_k, topk_tail=tail, **kwargs)


# --------------------------------------------------------------------------------------------
# Masked token mean.

def test_masked_mean_hand_computed():
  """sum(mask * value) / max(sum(mask), 1): (1 + 3) / 2 = 2; an all-0 mask gives 0, not 0 / 0."""
  value_2x2 = np.array([[1.0, 1e4], [3.0, -7e3]], np.float32)
  np.testing.assert_allclose(losses.masked_mean(value_2x2, np.array([[1, 0], [1, 0]], np.float32)), 2.0)
  np.testing.assert_allclose(losses.masked_mean(value_2x2, np.array([[1, 0], [1, 0]], bool)), 2.0)
  np.testing.assert_array_equal(losses.masked_mean(value_2x2, np.zeros((2, 2), np.float32)), 0.0)
  np.testing.assert_allclose(losses.masked_mean(value_2x2, np.ones((2, 2), np.int32)), value_2x2.mean(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Logit distillation.

@pytest.mark.parametrize("mask_kind, temperature", [("ones", 1.0), ("padded", 2.5)])
@pytest.mark.parametrize("mode, top_k, tail", KD_CASES, ids=KD_IDS)
def test_kd_loss_matches_reference(mode, top_k, tail, mask_kind, temperature):
  student_BxLxV, teacher_BxLxV = _normal(0, (B, L, V), 2.0), _normal(1, (B, L, V), 2.0)
  mask_BxL = _mask(mask_kind)
  loss = _kd(mode, top_k, tail)(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=temperature)
  chex.assert_shape(loss, ())
  assert loss.dtype == jnp.float32
  expected = ref_kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature, mode, top_k=top_k, tail=tail)
  assert expected > 0.01
  np.testing.assert_allclose(loss, expected, **REF_TOL)


@pytest.mark.parametrize("top_k, tail", [(0, "renormalize"), (3, "other_bucket")])
def test_kd_loss_jsd_with_asymmetric_beta_matches_reference(top_k, tail):
  student_BxLxV, teacher_BxLxV, mask_BxL = _normal(26, (B, L, V), 2.0), _normal(27, (B, L, V), 2.0), _mask("padded")
  values = []
  for beta in (0.1, 0.9):
    loss = _kd("jsd", top_k, tail, jsd_beta=beta)(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=1.5)
    np.testing.assert_allclose(loss, ref_kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, 1.5, "jsd", beta, top_k, tail),
                               **REF_TOL)
    values.append(float(loss))
  assert abs(values[0] - values[1]) > 1e-3


def test_kd_loss_hand_computed():
  """V = 2, T = 2: p = softmax([2 ln 3, 0] / 2) = [3/4, 1/4], q = softmax([0, 0] / 2) = [1/2, 1/2].

  forward: T^2 (3/4 ln(3/2) + 1/4 ln(1/2)) = 3 ln(3/2) - ln 2 = ln(27/16) = 0.5232481437645479
  reverse: T^2 (1/2 ln(2/3) + 1/2 ln 2) = 2 ln(4/3) = ln(16/9) = 0.5753641449035618
  jsd (beta 1/2, m = [5/8, 3/8]):
    T^2 / 2 (3/4 ln(6/5) + 1/4 ln(2/3) + 1/2 ln(4/5) + 1/2 ln(4/3)) = 0.13528829...
  The second token is masked and holds garbage.
  """
  student_1x2x2 = np.array([[[0.0, 0.0], [1e4, -3e4]]], np.float32)
  teacher_1x2x2 = np.array([[[2 * np.log(3.0), 0.0], [-2e4, 5e3]]], np.float32)
  mask_1x2 = np.array([[1, 0]], np.float32)
  jsd = 2.0 * (0.75 * np.log(1.2) + 0.25 * np.log(2 / 3) + 0.5 * np.log(0.8) + 0.5 * np.log(4 / 3))
  for mode, expected in [("forward_kl", 0.5232481437645479), ("reverse_kl", 0.5753641449035618), ("jsd", jsd)]:
    loss = losses.kd_loss(student_1x2x2, teacher_1x2x2, mask_1x2, temperature=2.0, mode=mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=mode)
  np.testing.assert_allclose(jsd, 0.13528829, rtol=1e-6)
  np.testing.assert_allclose(np.log(27 / 16), 0.5232481437645479, rtol=1e-12)
  np.testing.assert_allclose(np.log(16 / 9), 0.5753641449035618, rtol=1e-12)


def test_kd_loss_jsd_ends_are_the_two_kls_as_in_trl():
  """TRL's generalized JSD: beta 0 is KL(teacher || student), beta 1 is KL(student || teacher).

  The mixture formula vanishes at both ends (m = q at beta 0, m = p at beta 1), so the ends are the KLs and
  beta just inside them is the small mixture value, never a silent 0. Same tokens as `test_kd_loss_hand_computed`
  (p = [3/4, 1/4], q = [1/2, 1/2], T = 2); beta = 0.01: m = [0.5025, 0.4975],
    T^2 (0.01 (3/4 ln(0.75/0.5025) + 1/4 ln(0.25/0.4975)) + 0.99 (1/2 ln(0.5/0.5025) + 1/2 ln(0.5/0.4975)))
  = 4 (0.01 x 0.1283245... + 0.99 x 0.0000125...) = 0.0051825...; beta = 0.99 by the same formula: 0.0056871...
  """
  student_1x2x2 = np.array([[[0.0, 0.0], [1e4, -3e4]]], np.float32)
  teacher_1x2x2 = np.array([[[2 * np.log(3.0), 0.0], [-2e4, 5e3]]], np.float32)
  mask_1x2 = np.array([[1, 0]], np.float32)
  jsd = jax.jit(losses.kd_loss, static_argnames=("mode", "jsd_beta", "top_k", "topk_tail", "chunk_size"))

  def loss(beta):
    return float(jsd(student_1x2x2, teacher_1x2x2, mask_1x2, temperature=2.0, mode="jsd", jsd_beta=beta))

  np.testing.assert_allclose(loss(0.0), 0.5232481437645479, rtol=1e-6)   # ln(27/16), the forward KL
  np.testing.assert_allclose(loss(1.0), 0.5753641449035618, rtol=1e-6)   # ln(16/9), the reverse KL
  p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
  for beta in (0.01, 0.99):
    m = beta * p + (1 - beta) * q
    expected = 4.0 * (beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m)))
    np.testing.assert_allclose(loss(beta), expected, rtol=1e-4)   # float32 on a value 100x below the KLs
  np.testing.assert_allclose([loss(0.01), loss(0.99)], [0.0051825, 0.0056871], rtol=1e-4)
  assert 1e-3 < loss(0.01) < 0.1 and 1e-3 < loss(0.99) < 0.1   # near the ends: small, not 0, not the KLs


@pytest.mark.parametrize("mode, top_k, tail", KD_CASES, ids=KD_IDS)
def test_kd_loss_is_zero_for_identical_models(mode, top_k, tail):
  logits_BxLxV = _normal(2, (B, L, V), 3.0)
  loss = _kd(mode, top_k, tail)(logits_BxLxV, logits_BxLxV, _mask("padded"), temperature=1.5)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_kd_loss_top_k_of_whole_vocab_renormalized_equals_full_vocab():
  student_BxLxV, teacher_BxLxV, mask_BxL = _normal(3, (B, L, V)), _normal(4, (B, L, V)), _mask("padded")
  for mode in losses.KD_MODES:
    full = losses.kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=2.0, mode=mode)
    top_v = losses.kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=2.0, mode=mode, top_k=V)
    np.testing.assert_allclose(top_v, full, rtol=1e-5, atol=1e-6, err_msg=mode)


def test_kd_loss_accepts_bfloat16_logits():
  student_BxLxV = jnp.asarray(_normal(5, (B, L, V), 2.0), jnp.bfloat16)
  teacher_BxLxV = jnp.asarray(_normal(6, (B, L, V), 2.0), jnp.bfloat16)
  mask_BxL = _mask("padded")
  loss = losses.kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=2.0)
  assert loss.dtype == jnp.float32
  expected = ref_kd_loss(np.asarray(student_BxLxV, np.float64), np.asarray(teacher_BxLxV, np.float64), mask_BxL,
                         2.0, "forward_kl")
  np.testing.assert_allclose(loss, expected, **REF_TOL)


# --------------------------------------------------------------------------------------------
# Language-model loss and labels.

@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_lm_loss_matches_reference(label_smoothing, mask_kind, ignore):
  logits_BxLxV, labels_BxL, mask_BxL = _normal(10, (B, L, V), 2.0), _labels(11, ignore), _mask(mask_kind)
  loss = losses.lm_loss(logits_BxLxV, labels_BxL, mask_BxL, label_smoothing=label_smoothing)
  chex.assert_shape(loss, ())
  expected = ref_lm_loss(logits_BxLxV, labels_BxL, mask_BxL, label_smoothing)
  assert expected > 0.5
  np.testing.assert_allclose(loss, expected, **REF_TOL)


def test_lm_loss_hand_computed():
  """logits [0, ln 3] -> q = [1/4, 3/4]; label 1: -ln(3/4) = ln(4/3) = 0.28768207245178085.

  eps = 0.1: 0.9 ln(4/3) + 0.1 (ln 4 + ln(4/3)) / 2 = 0.25891386520 + 0.08369882180 = 0.34261268701.
  The second token's label is -100 (ignored) and its logits are garbage.
  """
  logits_1x2x2 = np.array([[[0.0, np.log(3.0)], [3e4, -3e4]]], np.float32)
  labels_1x2 = np.array([[1, -100]], np.int32)
  mask_1x2 = np.ones((1, 2), np.float32)
  np.testing.assert_allclose(losses.lm_loss(logits_1x2x2, labels_1x2, mask_1x2), 0.28768207245178085, rtol=1e-6)
  np.testing.assert_allclose(losses.lm_loss(logits_1x2x2, labels_1x2, mask_1x2, label_smoothing=0.1),
                             0.34261268701, rtol=1e-6)


def test_lm_loss_ignore_label_equals_mask_zero():
  logits_BxLxV, mask_BxL = _normal(12, (B, L, V)), _mask("ones")
  labels_BxL = _labels(13, ignore=False)
  ignored_BxL = labels_BxL.copy()
  ignored_BxL[_mask("padded") == 0] = -100
  for eps in (0.0, 0.2):
    by_label = losses.lm_loss(logits_BxLxV, ignored_BxL, mask_BxL, label_smoothing=eps)
    by_mask = losses.lm_loss(logits_BxLxV, labels_BxL, _mask("padded"), label_smoothing=eps)
    np.testing.assert_allclose(by_label, by_mask, **SAME_TOL)


@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
def test_next_token_labels_matches_reference(mask_kind):
  ids_BxL = np.random.RandomState(16).randint(1, V, (B, L)).astype(np.int32)
  mask_BxL = _mask(mask_kind).astype(np.int32)
  labels_BxL, label_mask_BxL = losses.next_token_labels(ids_BxL, mask_BxL)
  chex.assert_shape([labels_BxL, label_mask_BxL], (B, L))
  expected_labels_BxL, expected_mask_BxL = ref_next_token_labels(ids_BxL, mask_BxL)
  np.testing.assert_array_equal(label_mask_BxL, expected_mask_BxL)
  np.testing.assert_array_equal(labels_BxL[:, :-1], expected_labels_BxL[:, :-1])


def test_next_token_labels_hand_computed():
  ids_2x4 = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.int32)
  mask_2x4 = np.array([[0, 1, 1, 1], [1, 1, 1, 0]], np.int32)
  labels_2x4, label_mask_2x4 = losses.next_token_labels(ids_2x4, mask_2x4)
  np.testing.assert_array_equal(labels_2x4[:, :3], [[6, 7, 8], [2, 3, 4]])
  np.testing.assert_array_equal(label_mask_2x4, [[0, 1, 1, 0], [1, 1, 0, 0]])


# --------------------------------------------------------------------------------------------
# Attention transfer.

@pytest.mark.parametrize("student_heads, teacher_heads, heads", [(2, 2, 2), (2, 4, 2), (4, 2, 2), (2, 3, 1), (3, 2, 1)])
def test_align_heads_matches_reference(student_heads, teacher_heads, heads):
  mask_BxL = _mask("padded")
  student_BxHsxLxL = _attention_maps(20, student_heads, mask_BxL)
  teacher_BxHtxLxL = _attention_maps(21, teacher_heads, mask_BxL)
  aligned_s, aligned_t = losses.align_heads(student_BxHsxLxL, teacher_BxHtxLxL)
  expected_s, expected_t = ref_align_heads(student_BxHsxLxL, teacher_BxHtxLxL)
  chex.assert_shape([aligned_s, aligned_t], (B, heads, L, L))
  chex.assert_trees_all_close((aligned_s, aligned_t), (expected_s, expected_t), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(jnp.sum(aligned_s, -1), jnp.sum(aligned_t, -1), jnp.ones((B, heads, L)), atol=1e-6)


def test_align_heads_groups_consecutive_teacher_heads():
  teacher_1x4x1x1 = np.array([1.0, 3.0, 10.0, 20.0], np.float32).reshape(1, 4, 1, 1)
  _, aligned_1x2x1x1 = losses.align_heads(np.zeros((1, 2, 1, 1), np.float32), teacher_1x4x1x1)
  np.testing.assert_allclose(aligned_1x2x1x1.ravel(), [2.0, 15.0])


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
def test_attention_kl_matches_reference(mask_kind, heads):
  mask_BxL = _mask(mask_kind)
  student_BxHxLxL, teacher_BxHxLxL = _attention_maps(22, heads, mask_BxL), _attention_maps(23, heads, mask_BxL)
  loss = losses.attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL)
  chex.assert_shape(loss, ())
  expected = ref_attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL)
  assert expected > 0.05
  np.testing.assert_allclose(loss, expected, **REF_TOL)
  np.testing.assert_allclose(losses.attention_kl(teacher_BxHxLxL, teacher_BxHxLxL, mask_BxL), 0.0, atol=1e-6)


def test_attention_kl_clamps_zero_student_probabilities():
  """Query 0: p = q = [1, 0], KL 0. Query 1: p = [1/2, 1/2], q = [1, 0]:
  1/2 (ln(1/2) - ln 1) + 1/2 (ln(1/2) - ln 1e-12) = 1/2 ln(1e12) - ln 2 = 13.122363377404328; mean 6.561181688702164.
  """
  teacher_1x1x2x2 = np.array([[1.0, 0.0], [0.5, 0.5]], np.float32).reshape(1, 1, 2, 2)
  student_1x1x2x2 = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32).reshape(1, 1, 2, 2)
  loss = losses.attention_kl(student_1x1x2x2, teacher_1x1x2x2, np.ones((1, 2), np.float32))
  np.testing.assert_allclose(0.5 * np.log(1e12) - np.log(2.0), 13.122363377404328, rtol=1e-12)
  np.testing.assert_allclose(loss, 6.561181688702164, rtol=1e-6)


def test_attention_rows_kl_takes_the_target_first_and_passes_gradients_to_both():
  mask_BxL = _mask("padded")
  target_BxHxLxL, student_BxHxLxL = _attention_maps(24, 2, mask_BxL), _attention_maps(25, 2, mask_BxL)
  loss = losses.attention_rows_kl(target_BxHxLxL, student_BxHxLxL, mask_BxL)
  np.testing.assert_allclose(loss, ref_attention_kl(student_BxHxLxL, target_BxHxLxL, mask_BxL), **REF_TOL)
  np.testing.assert_allclose(loss, losses.attention_kl(student_BxHxLxL, target_BxHxLxL, mask_BxL), **SAME_TOL)
  grad_target, grad_student = jax.grad(losses.attention_rows_kl, argnums=(0, 1))(target_BxHxLxL, student_BxHxLxL,
                                                                                 mask_BxL)
  assert np.abs(grad_target).max() > 1e-3 and np.abs(grad_student).max() > 1e-3


@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
def test_attention_loss_matches_reference(mask_kind):
  mask_BxL = _mask(mask_kind)
  pairs = [(2, 4), (3, 2), (2, 2)]
  student_maps = [_attention_maps(30 + i, hs, mask_BxL) for i, (hs, _) in enumerate(pairs)]
  teacher_maps = [_attention_maps(40 + i, ht, mask_BxL) for i, (_, ht) in enumerate(pairs)]
  loss = losses.attention_loss(student_maps, teacher_maps, mask_BxL)
  expected = np.mean([ref_attention_kl(*ref_align_heads(s, t), mask_BxL) for s, t in zip(student_maps, teacher_maps)])
  np.testing.assert_allclose(loss, expected, **REF_TOL)


# --------------------------------------------------------------------------------------------
# Hidden states.

@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
@pytest.mark.parametrize("distance", losses.HIDDEN_DISTANCES)
def test_hidden_distance_matches_reference(distance, mask_kind):
  projected_BxLxD, target_BxLxD, mask_BxL = _normal(50, (B, L, D)), _normal(51, (B, L, D), 3.0), _mask(mask_kind)
  loss = losses.hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, distance)
  chex.assert_shape(loss, ())
  expected = ref_hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, distance)
  assert expected > 0.1
  np.testing.assert_allclose(loss, expected, **REF_TOL)


def test_hidden_distance_hand_computed():
  """p = [1, 0], t = [2, 0]: nmse = 1 / 4; cosine = 0. p = [0, 1]: nmse = 5 / 4; cosine = 1."""
  target_1x2x2 = np.array([[[2.0, 0.0], [2.0, 0.0]]], np.float32)
  projected_1x2x2 = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  for mask_1x2, nmse, cosine in [([[1, 0]], 0.25, 0.0), ([[0, 1]], 1.25, 1.0), ([[1, 1]], 0.75, 0.5)]:
    mask_1x2 = np.array(mask_1x2, np.float32)
    np.testing.assert_allclose(losses.hidden_distance(projected_1x2x2, target_1x2x2, mask_1x2, "nmse"), nmse,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.hidden_distance(projected_1x2x2, target_1x2x2, mask_1x2, "cosine"), cosine,
                               atol=1e-6)


@pytest.mark.parametrize("teacher_scale", [1.0, 1000.0])
def test_hidden_nmse_is_one_for_zero_projection_whatever_the_teacher_scale(teacher_scale):
  target_BxLxD, mask_BxL = _normal(52, (B, L, D)), _mask("padded")
  zeros_BxLxD = np.zeros_like(target_BxLxD)
  loss = losses.hidden_distance(zeros_BxLxD, teacher_scale * target_BxLxD, mask_BxL, "nmse")
  np.testing.assert_allclose(loss, 1.0, rtol=1e-5)


@pytest.mark.parametrize("distance", losses.HIDDEN_DISTANCES)
def test_hidden_distance_is_scale_free_for_small_teacher_states(distance):
  target_BxLxD, mask_BxL = 1e-3 * _normal(52, (B, L, D)), _mask("ones")
  projected_BxLxD = np.zeros_like(target_BxLxD) if distance == "nmse" else target_BxLxD
  expected = 1.0 if distance == "nmse" else 0.0
  np.testing.assert_allclose(losses.hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, distance), expected,
                             atol=1e-3)


def test_hidden_cosine_is_invariant_to_either_scale():
  projected_BxLxD, target_BxLxD, mask_BxL = _normal(53, (B, L, D)), _normal(54, (B, L, D)), _mask("padded")
  base = losses.hidden_distance(projected_BxLxD, target_BxLxD, mask_BxL, "cosine")
  scaled = losses.hidden_distance(1000.0 * projected_BxLxD, 0.01 * target_BxLxD, mask_BxL, "cosine")
  np.testing.assert_allclose(scaled, base, rtol=1e-5)


@pytest.mark.parametrize("distance", losses.HIDDEN_DISTANCES)
def test_layerwise_loss_is_mean_over_layers(distance):
  mask_BxL = _mask("padded")
  projected = [_normal(60 + i, (B, L, D)) for i in range(3)]
  targets = [_normal(70 + i, (B, L, D), 2.0) for i in range(3)]
  loss = losses.layerwise_loss(projected, targets, mask_BxL, distance)
  expected = np.mean([ref_hidden_distance(p, t, mask_BxL, distance) for p, t in zip(projected, targets)])
  np.testing.assert_allclose(loss, expected, **REF_TOL)


def test_uniform_layer_map():
  assert losses.uniform_layer_map(2, 4) == ((1, 2), (2, 4))
  assert losses.uniform_layer_map(3, 12) == ((1, 4), (2, 8), (3, 12))
  assert losses.uniform_layer_map(3, 5) == ((1, 2), (2, 3), (3, 5))
  assert losses.uniform_layer_map(4, 4) == ((1, 1), (2, 2), (3, 3), (4, 4))
  assert losses.uniform_layer_map(1, 7) == ((1, 7),)
  assert losses.uniform_layer_map(4, 2) == ((1, 1), (2, 1), (3, 2), (4, 2))  # never the embeddings (index 0)
  for student_layers in range(1, 9):
    for teacher_layers in range(student_layers, 25):
      pairs = losses.uniform_layer_map(student_layers, teacher_layers)
      assert [i for i, _ in pairs] == list(range(1, student_layers + 1))
      teacher_blocks = [j for _, j in pairs]
      assert teacher_blocks[-1] == teacher_layers and teacher_blocks[0] >= 1
      assert all(a < b for a, b in zip(teacher_blocks, teacher_blocks[1:]))
      assert all(abs(j - i * teacher_layers / student_layers) <= 0.5 for i, j in pairs)


# --------------------------------------------------------------------------------------------
# Sequence-level contrastive.

@pytest.mark.parametrize("mask_kind", ["ones", "padded"])
def test_masked_mean_pool_matches_reference(mask_kind):
  hidden_BxLxD, mask_BxL = _normal(80, (B, L, D)), _mask(mask_kind)
  pooled_BxD = losses.masked_mean_pool(hidden_BxLxD, mask_BxL)
  chex.assert_shape(pooled_BxD, (B, D))
  np.testing.assert_allclose(pooled_BxD, ref_masked_mean_pool(hidden_BxLxD, mask_BxL), rtol=1e-6, atol=1e-7)


def test_masked_mean_pool_of_all_padding_row_is_zero():
  hidden_BxLxD, mask_BxL = _normal(81, (B, L, D)), _mask("ones")
  mask_BxL[1] = 0
  pooled_BxD = losses.masked_mean_pool(hidden_BxLxD, mask_BxL)
  np.testing.assert_array_equal(pooled_BxD[1], np.zeros(D))
  np.testing.assert_allclose(pooled_BxD[0], hidden_BxLxD[0].mean(0), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("valid", [None, (1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 0, 1)])
def test_contrastive_loss_matches_reference(valid, temperature):
  student_BxD, teacher_BxD = _normal(92, (4, D)), _normal(93, (4, D))
  valid_B = None if valid is None else np.array(valid, bool)
  loss = losses.contrastive_loss(student_BxD, teacher_BxD, temperature=temperature, valid_B=valid_B)
  chex.assert_shape(loss, ())
  expected = ref_contrastive_loss(student_BxD, teacher_BxD, temperature, valid_B)
  assert expected > 0.01
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)


def test_contrastive_loss_hand_computed_and_all_ones_equals_none():
  """Orthonormal s = t, B = 2, tau = 1/2: logits [[2, 0], [0, 2]], loss = log(1 + e^-2) = 0.1269280110429725."""
  eye_2x2 = np.eye(2, dtype=np.float32)
  unmasked = losses.contrastive_loss(eye_2x2, 3.0 * eye_2x2, temperature=0.5)
  all_valid = losses.contrastive_loss(eye_2x2, 3.0 * eye_2x2, temperature=0.5, valid_B=np.ones(2, bool))
  np.testing.assert_allclose(unmasked, 0.1269280110429725, rtol=1e-6)
  np.testing.assert_allclose(all_valid, unmasked, **SAME_TOL)
  none_valid = losses.contrastive_loss(eye_2x2, eye_2x2, temperature=0.5, valid_B=np.zeros(2, bool))
  np.testing.assert_allclose(none_valid, 0.0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Compiled once per configuration, shared by the chunking, jit, mask and stop-gradient tests.

@functools.lru_cache(maxsize=None)
def _jitted_kd_by_chunk_size(mode, top_k, tail):
  """jit: (student, teacher, mask, T) -> per CHUNK_SIZES (loss, (d/d student, d/d teacher)), T traced."""

  def by_chunk_size(student_BxLxV, teacher_BxLxV, mask_BxL, temperature):
    return tuple(
        jax.value_and_grad(_kd(mode, top_k, tail, temperature=temperature, chunk_size=chunk_size), argnums=(0, 1))(
            student_BxLxV, teacher_BxLxV, mask_BxL)
        for chunk_size in CHUNK_SIZES)

  return jax.jit(by_chunk_size)


@functools.lru_cache(maxsize=None)
def _jitted_lm_by_chunk_size(label_smoothing):
  """jit: (logits, labels, mask) -> per CHUNK_SIZES (loss, d/d logits)."""

  def by_chunk_size(logits_BxLxV, labels_BxL, mask_BxL):
    return tuple(
        jax.value_and_grad(functools.partial(losses.lm_loss, label_smoothing=label_smoothing, chunk_size=chunk_size))(
            logits_BxLxV, labels_BxL, mask_BxL)
        for chunk_size in CHUNK_SIZES)

  return jax.jit(by_chunk_size)


def _kd_inputs():
  return _normal(160, (B, L, V), 2.0), _normal(161, (B, L, V), 2.0), _mask("padded"), np.float32(1.7)


def _lm_inputs():
  return _normal(162, (B, L, V), 2.0), _labels(163), _mask("padded")


@pytest.mark.parametrize("mode, top_k, tail", KD_CORE, ids=KD_CORE_IDS)
def test_kd_loss_chunked_equals_unchunked(mode, top_k, tail):
  results = _jitted_kd_by_chunk_size(mode, top_k, tail)(*_kd_inputs())
  value, (grad_BxLxV, _) = results[0]
  chex.assert_shape(grad_BxLxV, (B, L, V))
  assert value > 0.01 and np.abs(grad_BxLxV).max() > 1e-3
  for chunk_size, (chunked_value, (chunked_grad_BxLxV, _)) in zip(CHUNK_SIZES[1:], results[1:]):
    chex.assert_trees_all_close((chunked_value, chunked_grad_BxLxV), (value, grad_BxLxV), rtol=1e-6, atol=1e-6,
                                custom_message=f"chunk_size={chunk_size}")


def test_lm_loss_chunked_equals_unchunked():
  results = _jitted_lm_by_chunk_size(0.1)(*_lm_inputs())
  value, grad_BxLxV = results[0]
  assert value > 0.5 and np.abs(grad_BxLxV).max() > 1e-3
  for chunk_size, result in zip(CHUNK_SIZES[1:], results[1:]):
    chex.assert_trees_all_close(result, (value, grad_BxLxV), rtol=1e-6, atol=1e-6,
                                custom_message=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("mode, top_k, tail", KD_CORE, ids=KD_CORE_IDS)
def test_kd_loss_jit_matches_eager(mode, top_k, tail):
  student_BxLxV, teacher_BxLxV, mask_BxL, temperature = _kd_inputs()
  jitted = [value for value, _ in _jitted_kd_by_chunk_size(mode, top_k, tail)(*_kd_inputs())]
  for chunk_size in (None, 3):
    eager = _kd(mode, top_k, tail, chunk_size=chunk_size)(student_BxLxV, teacher_BxLxV, mask_BxL,
                                                          temperature=temperature)
    np.testing.assert_allclose(jitted[CHUNK_SIZES.index(chunk_size)], eager, **SAME_TOL)
  expected = ref_kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, float(temperature), mode, top_k=top_k, tail=tail)
  np.testing.assert_allclose(jitted, [expected] * len(CHUNK_SIZES), **REF_TOL)


@pytest.mark.parametrize("mode, top_k, tail", KD_CORE, ids=KD_CORE_IDS)
def test_kd_loss_teacher_and_masked_tokens_get_no_gradient(mode, top_k, tail):
  mask_BxL = _kd_inputs()[2]
  for chunk_size, (_, (grad_student_BxLxV, grad_teacher_BxLxV)) in zip(
      CHUNK_SIZES, _jitted_kd_by_chunk_size(mode, top_k, tail)(*_kd_inputs())):
    np.testing.assert_array_equal(grad_teacher_BxLxV, np.zeros((B, L, V)), err_msg=f"chunk_size={chunk_size}")
    np.testing.assert_array_equal(np.asarray(grad_student_BxLxV)[mask_BxL == 0], 0.0)
    assert np.abs(np.asarray(grad_student_BxLxV)[mask_BxL > 0]).max() > 1e-4


def test_lm_loss_jit_matches_eager_and_ignored_tokens_get_no_gradient():
  logits_BxLxV, labels_BxL, mask_BxL = _lm_inputs()
  results = _jitted_lm_by_chunk_size(0.1)(logits_BxLxV, labels_BxL, mask_BxL)
  for chunk_size in (None, 3):
    eager = losses.lm_loss(logits_BxLxV, labels_BxL, mask_BxL, label_smoothing=0.1, chunk_size=chunk_size)
    np.testing.assert_allclose(results[CHUNK_SIZES.index(chunk_size)][0], eager, **SAME_TOL)
  np.testing.assert_allclose(results[0][0], ref_lm_loss(logits_BxLxV, labels_BxL, mask_BxL, 0.1), **REF_TOL)
  ignored_BxL = (mask_BxL == 0) | (labels_BxL < 0)
  for _, grad_BxLxV in results:
    np.testing.assert_array_equal(np.asarray(grad_BxLxV)[ignored_BxL], 0.0)
    np.testing.assert_allclose(np.asarray(grad_BxLxV)[~ignored_BxL].sum(-1), 0.0, atol=1e-6)


def test_kd_loss_forward_kl_gradient_is_closed_form():
  """d/dz_s [T^2 mean_tokens KL(p || q)] = T (q - p) mask / sum(mask), at every chunk size."""
  student_BxLxV, teacher_BxLxV, mask_BxL, temperature = _kd_inputs()
  p = np.exp(np_log_softmax(teacher_BxLxV / temperature))
  q = np.exp(np_log_softmax(student_BxLxV / temperature))
  expected_BxLxV = temperature * (q - p) * mask_BxL[..., None] / mask_BxL.sum()
  for _, (grad_BxLxV, _) in _jitted_kd_by_chunk_size("forward_kl", 0, "renormalize")(*_kd_inputs()):
    np.testing.assert_allclose(grad_BxLxV, expected_BxLxV, rtol=1e-5, atol=1e-7)


def test_lm_loss_gradient_is_closed_form():
  """d/dz [mean_tokens loss] = (q - (1 - eps) onehot(label) - eps / V) valid / sum(valid), at every chunk size."""
  logits_BxLxV, labels_BxL, mask_BxL = _lm_inputs()
  valid_BxL = (mask_BxL > 0) & (labels_BxL >= 0)
  target_BxLxV = 0.9 * np.eye(V)[np.maximum(labels_BxL, 0)] + 0.1 / V
  expected_BxLxV = (np.exp(np_log_softmax(logits_BxLxV)) - target_BxLxV) * valid_BxL[..., None] / valid_BxL.sum()
  for _, grad_BxLxV in _jitted_lm_by_chunk_size(0.1)(*_lm_inputs()):
    np.testing.assert_allclose(grad_BxLxV, expected_BxLxV, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Masks: mask-0 tokens change nothing; masked equals the unmasked call on the kept tokens.

def _masking_cases():
  """name -> (loss(x, mask), x [B, L, ...]) with the other inputs closed over."""
  teacher_BxLxV, labels_BxL = _normal(101, (B, L, V), 2.0), _labels(102)
  target_BxLxD = _normal(103, (B, L, D))
  cases = {}
  for mode, top_k, tail in KD_CASES:
    kd = _kd(mode, top_k, tail, temperature=2.0)
    cases[f"kd_student-{mode}-top{top_k}-{tail}"] = (lambda x, m, kd=kd: kd(x, teacher_BxLxV, m),
                                                     _normal(100, (B, L, V), 2.0))
    cases[f"kd_teacher-{mode}-top{top_k}-{tail}"] = (lambda x, m, kd=kd: kd(teacher_BxLxV, x, m),
                                                     _normal(100, (B, L, V), 2.0))
  for eps in (0.0, 0.1):
    cases[f"lm-eps{eps}"] = (lambda x, m, eps=eps: losses.lm_loss(x, labels_BxL, m, label_smoothing=eps),
                             _normal(100, (B, L, V), 2.0))
  for distance in losses.HIDDEN_DISTANCES:
    cases[f"hidden_projected-{distance}"] = (
        lambda x, m, d=distance: losses.hidden_distance(x, target_BxLxD, m, d), _normal(104, (B, L, D)))
    cases[f"hidden_target-{distance}"] = (
        lambda x, m, d=distance: losses.hidden_distance(target_BxLxD, x, m, d), _normal(104, (B, L, D)))
  cases["masked_mean_pool"] = (losses.masked_mean_pool, _normal(105, (B, L, D)))
  return cases


MASKING_CASES = _masking_cases()


@pytest.mark.parametrize("name, scale", [(name, scale) for name in MASKING_CASES for scale in (1e4, 1e30)
                                         if scale < 1e5 or name.startswith(("kd", "lm"))])
def test_masked_tokens_do_not_count(name, scale):
  """Logits take 1e30 garbage; hidden states only 1e4 (their squares would overflow float32)."""
  fn, x = MASKING_CASES[name]
  mask_BxL = _mask("padded")
  clean = fn(x, mask_BxL)
  dirty = fn(_with_garbage(x, mask_BxL, 106, scale), mask_BxL)
  chex.assert_tree_all_finite(dirty)
  chex.assert_trees_all_close(dirty, clean, rtol=1e-6, atol=1e-7)


def test_attention_masked_tokens_do_not_count():
  mask_BxL = _mask("padded")
  student_BxHxLxL, teacher_BxHxLxL = _attention_maps(110, 2, mask_BxL), _attention_maps(111, 2, mask_BxL)
  clean = losses.attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL)
  rng = np.random.RandomState(112)
  masked_BxHxLxL = (mask_BxL == 0)[:, None, :, None] | (mask_BxL == 0)[:, None, None, :]
  dirty = [np.where(masked_BxHxLxL, np.abs(1e4 * rng.randn(*maps.shape)), maps).astype(np.float32)
           for maps in (student_BxHxLxL, teacher_BxHxLxL)]
  for s, t in [(dirty[0], teacher_BxHxLxL), (student_BxHxLxL, dirty[1]), tuple(dirty)]:
    np.testing.assert_allclose(losses.attention_kl(s, t, mask_BxL), clean, rtol=1e-6)


def test_contrastive_invalid_rows_do_not_count():
  student_BxD, teacher_BxD = _normal(120, (4, D)), _normal(121, (4, D))
  valid_B = np.array([1, 0, 1, 0], bool)
  clean = losses.contrastive_loss(student_BxD, teacher_BxD, valid_B=valid_B)
  dirty_student, dirty_teacher = student_BxD.copy(), teacher_BxD.copy()
  dirty_student[~valid_B] = 1e4 * _normal(122, (2, D))
  dirty_teacher[~valid_B] = student_BxD[valid_B]
  np.testing.assert_allclose(losses.contrastive_loss(dirty_student, dirty_teacher, valid_B=valid_B), clean, rtol=1e-6)
  np.testing.assert_allclose(losses.contrastive_loss(student_BxD[valid_B], teacher_BxD[valid_B]), clean, rtol=1e-6)
  grad_BxD = np.asarray(jax.jit(jax.grad(functools.partial(losses.contrastive_loss, valid_B=valid_B)))(student_BxD,
                                                                                                    teacher_BxD))
  np.testing.assert_array_equal(grad_BxD[~valid_B], 0.0)
  assert np.abs(grad_BxD[valid_B]).max() > 1e-3


def test_mask_dropping_a_row_equals_the_call_without_it():
  """Row 1 all mask-0 == the batch of row 0 alone with an all-ones mask."""
  mask_BxL = _mask("ones")
  mask_BxL[1] = 0
  student_BxLxV, teacher_BxLxV, labels_BxL = _normal(130, (B, L, V)), _normal(131, (B, L, V)), _labels(132)
  ones_1xL = np.ones((1, L), np.float32)
  states = [_normal(135, (B, L, D)), _normal(136, (B, L, D))]
  kd = _kd("jsd", 0, "renormalize", temperature=2.0)
  pairs = [
      (kd(student_BxLxV, teacher_BxLxV, mask_BxL), kd(student_BxLxV[:1], teacher_BxLxV[:1], ones_1xL)),
      (losses.lm_loss(student_BxLxV, labels_BxL, mask_BxL),
       losses.lm_loss(student_BxLxV[:1], labels_BxL[:1], ones_1xL)),
      (losses.hidden_distance(*states, mask_BxL), losses.hidden_distance(states[0][:1], states[1][:1], ones_1xL)),
  ]
  for masked, unmasked in pairs:
    np.testing.assert_allclose(masked, unmasked, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# jit for the other losses.

def _jit_cases():
  """name -> (function with its static options closed over, array args)."""
  mask_BxL = _mask("padded")
  s_maps, t_maps = _attention_maps(144, 2, mask_BxL), _attention_maps(145, 4, mask_BxL)
  projected_BxLxD, target_BxLxD = _normal(146, (B, L, D)), _normal(147, (B, L, D))
  student_BxLxV, teacher_BxLxV = _normal(140, (B, L, V), 2.0), _normal(141, (B, L, V), 2.0)
  cases = {
      "kd-jsd-top3-other_bucket": (lambda s, t, m, temp: _kd("jsd", 3, "other_bucket")(s, t, m, temperature=temp),
                                   (student_BxLxV, teacher_BxLxV, mask_BxL, np.float32(1.7))),
      "next_token_labels": (losses.next_token_labels, (_labels(143, ignore=False), mask_BxL.astype(np.int32))),
      "align_heads": (losses.align_heads, (s_maps, t_maps)),
      "attention_loss": (losses.attention_loss, ([s_maps, t_maps[:, :2]], [t_maps, s_maps], mask_BxL)),
      "masked_mean_pool": (losses.masked_mean_pool, (projected_BxLxD, mask_BxL)),
      "contrastive": (lambda s, t, valid: losses.contrastive_loss(s, t, temperature=0.1, valid_B=valid),
                      (_normal(148, (4, D)), _normal(149, (4, D)), np.array([1, 1, 0, 1], bool))),
  }
  for distance in losses.HIDDEN_DISTANCES:
    cases[f"layerwise-{distance}"] = (functools.partial(losses.layerwise_loss, distance=distance),
                                      ([projected_BxLxD, target_BxLxD], [target_BxLxD, projected_BxLxD], mask_BxL))
  return cases


JIT_CASES = _jit_cases()


@pytest.mark.parametrize("name", list(JIT_CASES))
def test_jit_matches_eager(name):
  fn, args = JIT_CASES[name]
  eager = fn(*args)
  jitted = jax.jit(fn)(*args)
  chex.assert_tree_all_finite(jitted)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_kd_loss_traced_temperature_scales_like_reference():
  student_BxLxV, teacher_BxLxV, mask_BxL = _normal(150, (B, L, V), 2.0), _normal(151, (B, L, V), 2.0), _mask("padded")
  kd = jax.jit(lambda temperature: losses.kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature=temperature))
  for temperature in (0.5, 1.0, 4.0):
    expected = ref_kd_loss(student_BxLxV, teacher_BxLxV, mask_BxL, temperature, "forward_kl")
    np.testing.assert_allclose(kd(jnp.float32(temperature)), expected, **REF_TOL)


# --------------------------------------------------------------------------------------------
# Gradients: finite differences, stop_gradient on the teacher.

def _grad_cases():
  """name -> (function of the student input only, float64 student input)."""
  rng = np.random.RandomState(170)
  mask_BxL = _mask("padded").astype(np.float64)
  teacher_BxLxV = 2.0 * rng.randn(B, L, V)
  cases = {}
  for mode, top_k, tail in KD_CORE + KD_TOPK:
    kd = _kd(mode, top_k, tail, temperature=2.0)
    cases[f"kd-{mode}-top{top_k}-{tail}"] = (lambda s, kd=kd: kd(s, teacher_BxLxV, mask_BxL), 2.0 * rng.randn(B, L, V))
  labels_BxL = _labels(171)
  cases["lm"] = (lambda x: losses.lm_loss(x, labels_BxL, mask_BxL, label_smoothing=0.1),
                 2.0 * rng.randn(B, L, V))
  teacher_BxHxLxL = _attention_maps(172, 2, _mask("padded")).astype(np.float64)
  cases["attention_kl"] = (lambda s: losses.attention_kl(s, teacher_BxHxLxL, mask_BxL),
                           _attention_maps(173, 2, _mask("padded")).astype(np.float64))
  target_BxLxD = rng.randn(B, L, D)
  for distance in losses.HIDDEN_DISTANCES:
    cases[f"hidden-{distance}"] = (lambda p, d=distance: losses.hidden_distance(p, target_BxLxD, mask_BxL, d),
                                   rng.randn(B, L, D))
  teacher_BxD, valid_B = rng.randn(4, D), np.array([1, 1, 0, 1], bool)
  cases["contrastive"] = (lambda s: losses.contrastive_loss(s, teacher_BxD, temperature=0.2, valid_B=valid_B),
                          rng.randn(4, D))
  return cases


GRAD_CASES = _grad_cases()


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_finite_differences(name):
  """float64 inputs; the losses compute in float32 inside, hence eps = 1e-3 and float32 tolerances."""
  fn, x = GRAD_CASES[name]
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    assert x.dtype == jnp.float64
    check_grads(jax.jit(fn), (x,), order=1, modes=["rev"], eps=1e-3)


def _teacher_grad_cases():
  """name -> (loss(student, teacher), student, teacher)."""
  mask_BxL = _mask("padded")
  cases = {
      "attention_kl": (lambda s, t: losses.attention_kl(s, t, mask_BxL),
                       _attention_maps(182, 2, mask_BxL), _attention_maps(183, 2, mask_BxL)),
      "attention_loss": (lambda s, t: losses.attention_loss([s], [t], mask_BxL),
                         _attention_maps(184, 2, mask_BxL), _attention_maps(185, 4, mask_BxL)),
      "contrastive": (lambda s, t: losses.contrastive_loss(s, t, valid_B=np.array([1, 0, 1, 1], bool)),
                      _normal(190, (4, D)), _normal(191, (4, D))),
  }
  for (mode, top_k, tail), chunk_size in zip(KD_TOPK, (3, None)):
    cases[f"kd-{mode}-top{top_k}-{tail}-chunk{chunk_size}"] = (
        lambda s, t, kd=_kd(mode, top_k, tail, temperature=2.0, chunk_size=chunk_size): kd(s, t, mask_BxL),
        _normal(180, (B, L, V)), _normal(181, (B, L, V)))
  for distance in losses.HIDDEN_DISTANCES:
    cases[f"hidden-{distance}"] = (lambda s, t, d=distance: losses.hidden_distance(s, t, mask_BxL, d),
                                   _normal(186, (B, L, D)), _normal(187, (B, L, D)))
  return cases


TEACHER_GRAD_CASES = _teacher_grad_cases()


@pytest.mark.parametrize("name", list(TEACHER_GRAD_CASES))
def test_teacher_and_masked_tokens_get_no_gradient(name):
  fn, student, teacher = TEACHER_GRAD_CASES[name]
  grad_student, grad_teacher = jax.jit(jax.grad(fn, argnums=(0, 1)))(student, teacher)
  chex.assert_trees_all_equal_shapes((grad_student, grad_teacher), (student, teacher))
  np.testing.assert_array_equal(grad_teacher, np.zeros_like(teacher))
  assert np.abs(grad_student).max() > 1e-4
  masked_BxL = _mask("padded") == 0
  grad_student = np.asarray(grad_student)
  if name.startswith(("kd", "hidden")):
    np.testing.assert_array_equal(grad_student[masked_BxL], 0.0)
  elif name.startswith("attention"):
    np.testing.assert_array_equal(grad_student.transpose(0, 2, 1, 3)[masked_BxL], 0.0)
    np.testing.assert_array_equal(grad_student.transpose(0, 3, 1, 2)[masked_BxL], 0.0)


# --------------------------------------------------------------------------------------------
# O(1) in B, L and heads: repeating tokens, sequences or heads leaves every mean unchanged.

def _tile(x, batch_reps, length_reps):
  return np.tile(x, (batch_reps, length_reps) + (1,) * (np.ndim(x) - 2))


def test_token_means_do_not_grow_with_batch_or_length():
  """The batch repeated twice and each sequence three times over (iid repeated tokens): same means."""
  student_BxLxV, teacher_BxLxV = _normal(200, (B, L, V), 2.0), _normal(201, (B, L, V), 2.0)
  labels_BxL, mask_BxL = _labels(202), _mask("padded")
  projected_BxLxD, target_BxLxD = _normal(203, (B, L, D)), _normal(204, (B, L, D))

  @jax.jit
  def all_losses(student, teacher, labels, projected, target, mask):
    values = {mode: losses.kd_loss(student, teacher, mask, temperature=2.0, mode=mode) for mode in losses.KD_MODES}
    values["top_k"] = losses.kd_loss(student, teacher, mask, temperature=2.0, top_k=3, topk_tail="other_bucket")
    values["lm"] = losses.lm_loss(student, labels, mask, label_smoothing=0.1)
    for distance in losses.HIDDEN_DISTANCES:
      values[distance] = losses.hidden_distance(projected, target, mask, distance)
    return values

  inputs = (student_BxLxV, teacher_BxLxV, labels_BxL, projected_BxLxD, target_BxLxD, mask_BxL)
  base = all_losses(*inputs)
  tiled = all_losses(*[_tile(x, 2, 3) for x in inputs])
  assert min(float(v) for v in base.values()) > 0.05
  chex.assert_trees_all_close(tiled, base, rtol=1e-5)
  kd = ref_kd_loss(_tile(student_BxLxV, 2, 3), _tile(teacher_BxLxV, 2, 3), _tile(mask_BxL, 2, 3), 2.0, "forward_kl")
  np.testing.assert_allclose(tiled["forward_kl"], kd, **REF_TOL)


def test_attention_kl_does_not_grow_with_heads():
  mask_BxL = _mask("padded")
  student_BxHxLxL, teacher_BxHxLxL = _attention_maps(210, 2, mask_BxL), _attention_maps(211, 2, mask_BxL)
  base = losses.attention_kl(student_BxHxLxL, teacher_BxHxLxL, mask_BxL)
  repeated = losses.attention_kl(np.tile(student_BxHxLxL, (1, 3, 1, 1)), np.tile(teacher_BxHxLxL, (1, 3, 1, 1)),
                                 mask_BxL)
  np.testing.assert_allclose(repeated, base, rtol=1e-6)
