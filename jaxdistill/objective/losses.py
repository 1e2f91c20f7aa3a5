"""Distillation losses: pure functions with explicit masks, each O(1) whatever B, L, D or depth.

Conventions: `mask_BxL` is 1 for tokens that count and 0 otherwise; a "masked token mean" is
sum(mask * value) / max(sum(mask), 1). Logit losses are computed in float32 over chunks of tokens
(`chunk_size`), so the float32 probabilities of both models never exist for the whole batch at
once: each chunk is rematerialised in the backward pass instead of stored.
"""

from typing import Callable

import jax
import jax.numpy as jnp

KD_MODES = ("forward_kl", "reverse_kl", "jsd")
TOPK_TAILS = ("renormalize", "other_bucket")
HIDDEN_DISTANCES = ("nmse", "cosine")
_EPS = 1e-12


def masked_mean(value_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """sum(mask * value) / max(sum(mask), 1); masked values are selected away, so an Inf there cannot leak."""
  mask = mask_BxL.astype(bool)
  return jnp.sum(jnp.where(mask, value_BxL, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def token_chunks(per_token: Callable, arrays: tuple[jax.Array, ...], chunk_size: int | None):
  """Applies `per_token` (arrays [N, ...] -> values [N, ...], or a tuple of them) chunk by chunk over
  the flattened tokens.

  Returns the values for all B*L tokens, shaped [B, L, ...]. Each chunk is wrapped in
  `jax.checkpoint`, so the backward pass recomputes a chunk's float32 intermediates rather than
  keeping them all.
  """
  batch, length = arrays[0].shape[:2]
  flat = [a.reshape((batch * length,) + a.shape[2:]) for a in arrays]
  tokens = batch * length
  if not chunk_size or chunk_size >= tokens:
    return jax.tree.map(lambda v: v.reshape((batch, length) + v.shape[1:]), per_token(*flat))
  num_chunks = -(-tokens // chunk_size)
  pad = num_chunks * chunk_size - tokens
  chunked = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((num_chunks, chunk_size) + a.shape[1:])
             for a in flat]
  body = jax.checkpoint(lambda _, xs: (None, per_token(*xs)))
  _, values = jax.lax.scan(body, None, chunked)
  return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:])[:tokens].reshape((batch, length) + v.shape[2:]),
                      values)


# --------------------------------------------------------------------------------------------
# Logit distillation.

def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) along the last axis; terms with p = 0 contribute 0."""
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def divergence(log_p: jax.Array, log_q: jax.Array, mode: str, jsd_beta: float) -> jax.Array:
  """teacher p, student q -> per-token divergence.

  'jsd' at beta 0 and 1 is the forward and the reverse KL (TRL's generalized JSD does the same): the
  mixture formula itself vanishes at both ends (m = q or m = p), a silent zero loss.
  """
  if mode == "forward_kl" or (mode == "jsd" and jsd_beta == 0):
    return _kl(log_p, log_q)
  if mode == "reverse_kl" or (mode == "jsd" and jsd_beta == 1):
    return _kl(log_q, log_p)
  log_m = jnp.logaddexp(jnp.log(jsd_beta) + log_p, jnp.log1p(-jsd_beta) + log_q)
  return jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)


def _topk_log_probs(log_p_NxV, log_q_NxV, top_k: int, tail: str):
  """Teacher and student log-probabilities on the teacher's top-k tokens (+ a tail bucket)."""
  top_log_p, index_NxK = jax.lax.top_k(log_p_NxV, top_k)
  return sparse_log_probs(top_log_p, jnp.take_along_axis(log_q_NxV, index_NxK, axis=-1), tail)


def sparse_log_probs(top_log_p: jax.Array, top_log_q: jax.Array, tail: str):
  """Both models' log-probabilities on a subset of tokens, as distributions over K (or K + 1) outcomes.

  'renormalize': each renormalised over the K tokens; 'other_bucket': a (K+1)-th outcome holds each
  model's remaining mass.
  """
  if tail == "renormalize":
    return (top_log_p - jax.nn.logsumexp(top_log_p, axis=-1, keepdims=True),
            top_log_q - jax.nn.logsumexp(top_log_q, axis=-1, keepdims=True))

  def with_tail(top):  # log(1 - sum(exp(top))) computed stably, clamped away from log(0)
    mass = jnp.minimum(jnp.sum(jnp.exp(top), axis=-1, keepdims=True), 1.0 - 1e-7)
    return jnp.concatenate([top, jnp.log1p(-mass)], axis=-1)

  return with_tail(top_log_p), with_tail(top_log_q)


def kd_loss(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, mask_BxL: jax.Array, *,
            temperature: jax.Array | float, mode: str = "forward_kl", jsd_beta: float = 0.5,
            top_k: int = 0, topk_tail: str = "renormalize", chunk_size: int | None = None) -> jax.Array:
  """Logit distillation at temperature T, scaled by T^2, as a masked token mean.

  With p = softmax(z_t / T) (teacher, no gradient) and q = softmax(z_s / T) (student):
    forward_kl: KL(p || q) = sum_v p_v (log p_v - log q_v)
    reverse_kl: KL(q || p)
    jsd:        beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q, for 0 < beta < 1;
                KL(p || q) at beta = 0 and KL(q || p) at beta = 1 (TRL's GKD `beta`)
  loss = T^2 * sum_tokens(mask * divergence) / sum(mask).

  With `top_k > 0` the divergence is taken over the teacher's k most likely tokens only:
  'renormalize' renormalises p and q over those k tokens; 'other_bucket' adds a (k+1)-th outcome
  holding each model's remaining probability mass.

  Args:
    student_logits_BxLxV, teacher_logits_BxLxV: logits over the same vocabulary (any float dtype;
      computed in float32).
    mask_BxL: which tokens count.
    temperature: T > 0 (a traced scalar is fine: the curriculum schedules it).
    mode: one of KD_MODES. jsd_beta: beta in [0, 1] for 'jsd' (a Python float: it picks the formula).
    top_k: 0 for the full vocabulary. topk_tail: one of TOPK_TAILS.
    chunk_size: tokens per float32 chunk; None computes all tokens at once.

  References:
    Hinton et al., Distilling the Knowledge in a Neural Network, 2015.
    Agarwal et al., On-Policy Distillation of Language Models (generalised JSD), 2024.
    Hugging Face TRL, `GKDTrainer.generalized_jsd_loss` (the beta = 0 / 1 ends).
  """
  temperature = jnp.asarray(temperature, jnp.float32)

  def per_token(student_NxV, teacher_NxV):
    log_q = jax.nn.log_softmax(student_NxV.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_NxV).astype(jnp.float32) / temperature, axis=-1)
    if top_k:
      log_p, log_q = _topk_log_probs(log_p, log_q, top_k, topk_tail)
    return divergence(log_p, log_q, mode, jsd_beta)

  per_token_BxL = token_chunks(per_token, (student_logits_BxLxV, teacher_logits_BxLxV), chunk_size)
  return temperature ** 2 * masked_mean(per_token_BxL, mask_BxL)


def lm_loss(logits_BxLxV: jax.Array, labels_BxL: jax.Array, mask_BxL: jax.Array, *,
            label_smoothing: float = 0.0, chunk_size: int | None = None) -> jax.Array:
  """Cross-entropy of `labels` under `logits`, a masked token mean.

  loss_token = (1 - eps) * (-log q_label) + eps * mean_v(-log q_v),  q = softmax(logits)
  Tokens with mask 0 or a negative label (e.g. -100, transformers' ignore index) do not count.
  The caller aligns labels with logits (labels[t] is the token after position t).
  """
  valid_BxL = mask_BxL.astype(bool) & (labels_BxL >= 0)

  def per_token(logits_NxV, labels_N):
    log_q = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_q, jnp.maximum(labels_N, 0)[:, None], axis=-1)[:, 0]
    if label_smoothing:
      nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_q, axis=-1)
    return nll

  per_token_BxL = token_chunks(per_token, (logits_BxLxV, labels_BxL), chunk_size)
  return masked_mean(per_token_BxL, valid_BxL)


def next_token_labels(input_ids_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Labels for causal LM: position t predicts token t+1; the last position and pads do not count."""
  labels_BxL = jnp.concatenate([input_ids_BxL[:, 1:], jnp.zeros_like(input_ids_BxL[:, :1])], axis=1)
  next_mask = jnp.concatenate([mask_BxL[:, 1:], jnp.zeros_like(mask_BxL[:, :1])], axis=1)
  return labels_BxL, mask_BxL * next_mask


# --------------------------------------------------------------------------------------------
# Attention transfer.

def align_heads(student_BxHsxLxL: jax.Array, teacher_BxHtxLxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Brings two attention maps to the same head count by averaging heads (rows stay distributions).

  Works on any rows [B, H, Q, K] (whole maps or a block of queries).
  Equal counts: unchanged. Teacher heads a multiple of student heads: each student head is paired
  with the mean of its group of Ht/Hs consecutive teacher heads (and the reverse). Otherwise both
  are averaged over all heads.
  """
  hs, ht = student_BxHsxLxL.shape[1], teacher_BxHtxLxL.shape[1]

  def group_mean(x, groups):
    b, h, lq, lk = x.shape
    return x.reshape(b, groups, h // groups, lq, lk).mean(axis=2)

  if hs == ht:
    return student_BxHsxLxL, teacher_BxHtxLxL
  if ht % hs == 0:
    return student_BxHsxLxL, group_mean(teacher_BxHtxLxL, hs)
  if hs % ht == 0:
    return group_mean(student_BxHsxLxL, ht), teacher_BxHtxLxL
  return student_BxHsxLxL.mean(1, keepdims=True), teacher_BxHtxLxL.mean(1, keepdims=True)


def attention_rows_kl(target_BxHxLxL: jax.Array, student_BxHxLxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean over heads and real query tokens of KL(target row || student row) over unmasked keys.

  Keys a query may not see (future or padding) have probability 0 in both maps and are excluded;
  student probabilities are clamped at 1e-12 inside the log. Gradients reach both arguments.
  """
  return masked_mean(rows_kl(target_BxHxLxL, student_BxHxLxL, mask_BxL), mask_BxL)


def rows_kl(target_BxHxQxK: jax.Array, student_BxHxQxK: jax.Array, key_mask_BxK: jax.Array) -> jax.Array:
  """Per query [B, Q]: mean over heads of KL(target row || student row) over the keys with mask 1.

  The per-query terms of `attention_rows_kl`, for any set of rows (a block of queries).
  """
  p = target_BxHxQxK.astype(jnp.float32)
  q = student_BxHxQxK.astype(jnp.float32)
  keys_Bx1x1xK = key_mask_BxK.astype(bool)[:, None, None, :]
  terms = jnp.where(keys_Bx1x1xK & (p > 0), p * (jnp.log(jnp.maximum(p, _EPS)) - jnp.log(jnp.maximum(q, _EPS))), 0.0)
  return jnp.mean(jnp.sum(terms, axis=-1), axis=1)


def attention_kl(student_BxHxLxL: jax.Array, teacher_BxHxLxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """`attention_rows_kl` with the teacher as the target (no gradient into the teacher)."""
  return attention_rows_kl(jax.lax.stop_gradient(teacher_BxHxLxL), student_BxHxLxL, mask_BxL)


def attention_loss(student_maps, teacher_maps, mask_BxL: jax.Array) -> jax.Array:
  """Mean of `attention_kl` over matched layer pairs, heads aligned with `align_heads`.

  The definition on whole maps; training computes it from q and k a block of queries at a time
  (`attention_maps.attention_loss`), with equal values and gradients.
  """
  values = [attention_kl(*align_heads(s, t), mask_BxL) for s, t in zip(student_maps, teacher_maps)]
  return jnp.mean(jnp.stack(values))


# --------------------------------------------------------------------------------------------
# Hidden states.

def hidden_distance(projected_BxLxD: jax.Array, target_BxLxD: jax.Array, mask_BxL: jax.Array,
                    distance: str = "nmse") -> jax.Array:
  """Masked token mean of a scale-free distance between projected student and teacher states.

    nmse:   ||p - t||^2 / max(||t||^2, 1e-12)   (1 for p = 0, whatever the teacher's scale)
    cosine: 1 - <p, t> / max(||p|| ||t||, 1e-12)
  """
  p = projected_BxLxD.astype(jnp.float32)
  t = jax.lax.stop_gradient(target_BxLxD).astype(jnp.float32)
  # The floors only guard exact zeros: any teacher scale above ~1e-6 is compared scale-free.
  if distance == "nmse":
    per_token = jnp.sum(jnp.square(p - t), -1) / jnp.maximum(jnp.sum(jnp.square(t), -1), _EPS)
  else:
    norms = jnp.sqrt(jnp.maximum(jnp.sum(p * p, -1) * jnp.sum(t * t, -1), _EPS * _EPS))
    per_token = 1.0 - jnp.sum(p * t, -1) / norms
  return masked_mean(per_token, mask_BxL)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
  """Pairs student block i (1..Ns) with teacher block max(1, round(i * Nt / Ns)): hidden_states indices.

  Index 0 (the embeddings) is never a target, even for a student deeper than its teacher.
  """
  return tuple((i, max(1, round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1))


def layerwise_loss(projected_states, teacher_states, mask_BxL: jax.Array, distance: str = "nmse") -> jax.Array:
  """Mean of `hidden_distance` over the mapped layer pairs (projections already applied)."""
  values = [hidden_distance(p, t, mask_BxL, distance) for p, t in zip(projected_states, teacher_states)]
  return jnp.mean(jnp.stack(values))


# --------------------------------------------------------------------------------------------
# Sequence-level contrastive.

def masked_mean_pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  mask = mask_BxL.astype(jnp.float32)[..., None]
  return jnp.sum(hidden_BxLxD.astype(jnp.float32) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def contrastive_loss(student_BxD: jax.Array, teacher_BxD: jax.Array, *, temperature: float = 0.07,
                     valid_B: jax.Array | None = None) -> jax.Array:
  """InfoNCE with in-batch negatives: each student sequence must pick its own teacher sequence.

    s_b = student_b / ||student_b||,  t_c = teacher_c / ||teacher_c||
    loss = mean_b [ -log softmax_c(<s_b, t_c> / tau)[b] ]
  Rows with `valid_B` 0 (e.g. all-padding sequences) are neither anchors nor negatives.

  References:
    van den Oord et al., Representation Learning with Contrastive Predictive Coding, 2018.
  """
  s = student_BxD.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_BxD).astype(jnp.float32)
  s = s / jnp.sqrt(jnp.sum(s * s, -1, keepdims=True) + _EPS)
  t = t / jnp.sqrt(jnp.sum(t * t, -1, keepdims=True) + _EPS)
  logits_BxB = s @ t.T / temperature
  valid_B = jnp.ones(s.shape[0], bool) if valid_B is None else valid_B.astype(bool)
  logits_BxB = jnp.where(valid_B[None, :], logits_BxB, -1e9)
  log_probs = jax.nn.log_softmax(logits_BxB, axis=-1)
  nll_B = -jnp.diagonal(log_probs)
  return jnp.sum(jnp.where(valid_B, nll_B, 0.0)) / jnp.maximum(jnp.sum(valid_B), 1)
