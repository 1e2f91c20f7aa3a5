"""models/attention.py: every implementation against float64 numpy, gradients, and the memory they keep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch
from jaxdistill.models import attention

B, L, N, G, K = 3, 9, 4, 2, 8   # padded_batch is 3 x 9; 4 query heads over 2 key/value heads


def _qkv(seed=0):
  rng = np.random.RandomState(seed)
  return (rng.normal(size=(B, L, N, K)).astype(np.float32), rng.normal(size=(B, L, G, K)).astype(np.float32),
          rng.normal(size=(B, L, G, K)).astype(np.float32))


def _reference(q, k, v, mask_BxL, scale, window=0):
  """float64: softmax over keys j <= i with mask 1 and, with a window W, i - j < W (and i itself); query head
  h reads key head h // 2."""
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  out = np.zeros((B, L, N, K))
  for b in range(B):
    for h in range(N):
      scores = q[b, :, h] @ k[b, :, h // (N // G)].T * scale
      causal = np.tril(np.ones((L, L), bool)) & ~np.tril(np.ones((L, L), bool), -window) if window else \
          np.tril(np.ones((L, L), bool))
      allowed = (causal & mask_BxL[b].astype(bool)[None]) | np.eye(L, dtype=bool)
      scores = np.where(allowed, scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, h // (N // G)]
  return out


@pytest.mark.parametrize("window", [0, 3])   # 3: each query sees itself and the 2 keys before it
@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_every_implementation_matches_float64_on_real_tokens(side, window):
  q, k, v = _qkv()
  _, mask_BxL = padded_batch(side)
  expected = _reference(q, k, v, mask_BxL, K ** -0.5 / 3, window)
  real = mask_BxL.astype(bool)
  cases = [("blockwise", block, False) for block in (2, 4, 9, 512)] + [("xla", 0, False)]
  if side != "left":  # the promise right_padded makes: padding only at the end
    cases += [("xla", 0, True)]
  for implementation, block, right_padded in cases:
    out = jax.jit(lambda q, k, v, m, factor: attention.attend(
        q, k, v, m, head_scale=K ** -0.5, layer_factor=factor, implementation=implementation, block=block,
        right_padded=right_padded, window=window))(q, k, v, mask_BxL, jnp.float32(1 / 3))  # a traced factor
    err = np.abs(np.asarray(out) - expected)[real].max()
    assert err < 1e-5, (implementation, block, right_padded, window, err)
    assert np.isfinite(np.asarray(out)).all()   # padded rows too: they feed nothing, but must not be NaN


def test_blockwise_gradients_equal_the_materialised_path():
  q, k, v = _qkv(1)
  _, mask_BxL = padded_batch("left")
  weights = np.random.RandomState(2).normal(size=(B, L, N, K)).astype(np.float32) * mask_BxL[:, :, None, None]

  def loss(q, k, v, implementation, block):
    out = attention.attend(q, k, v, mask_BxL, head_scale=K ** -0.5, layer_factor=None,
                           implementation=implementation, block=block, right_padded=False)
    return jnp.sum(out * weights)

  grads = {(impl, block): jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))(q, k, v, impl, block)
           for impl, block in (("xla", 0), ("blockwise", 2), ("blockwise", 4), ("blockwise", 512))}
  reference = grads[("xla", 0)]
  for key, value in grads.items():
    for ours, theirs in zip(value, reference):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_attention_probs_are_the_rows_of_the_whole_map():
  q, k, _ = _qkv(3)
  _, mask_BxL = padded_batch("left")
  qk = attention.QueriesKeys(jnp.asarray(q), jnp.asarray(k), jnp.float32(K ** -0.5))
  maps_BxNxLxL = np.asarray(attention.full_maps(qk, jnp.asarray(mask_BxL)))
  np.testing.assert_allclose(maps_BxNxLxL.sum(-1), 1.0, atol=1e-6)
  index_BxQ = np.array([[8, 2], [0, 5], [7, 7]], np.int32)
  rows = attention.attention_probs(jnp.take_along_axis(jnp.asarray(q), index_BxQ[:, :, None, None], axis=1),
                                   jnp.asarray(k), index_BxQ, mask_BxL, K ** -0.5)
  expected = np.stack([maps_BxNxLxL[b][:, index_BxQ[b]] for b in range(B)])
  np.testing.assert_allclose(np.asarray(rows), expected, rtol=1e-6, atol=1e-6)


def test_auto_is_blockwise_without_a_cudnn_gpu_and_a_forced_choice_stays():
  assert attention.resolve_implementation("auto", "bfloat16", 64) == "blockwise"   # this machine: a CPU
  assert attention.resolve_implementation("xla", "float32", 64) == "xla"
  with pytest.raises(ValueError, match="not one of auto, cudnn, blockwise, xla"):
    attention.attend(*_qkv(), np.ones((B, L)), head_scale=1.0, layer_factor=None, implementation="flash",
                     block=4, right_padded=False)


def test_blockwise_keeps_no_whole_map_for_the_backward_pass():
  """XLA's memory analysis of value-and-grad: the materialised path holds B x H x L x L float32 maps,
  the blockwise one a block of rows at a time."""
  batch, length, heads, dim = 2, 1024, 4, 16
  q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32)
  kv = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  one_map = batch * heads * length * length * 4   # 32 MiB

  def temp_bytes(implementation, block):
    def loss(q, k, v, m):
      return jnp.sum(attention.attend(q, k, v, m, head_scale=0.25, layer_factor=None, implementation=implementation,
                                      block=block, right_padded=False))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  materialised = temp_bytes("xla", 0)
  block_64, block_128 = temp_bytes("blockwise", 64), temp_bytes("blockwise", 128)
  assert materialised >= 2 * one_map                       # measured: 97 MiB, three maps
  assert block_64 < one_map / 3, (block_64, one_map)      # measured: 9.5 MiB
  assert 1.6 < block_128 / block_64 < 2.4                  # linear in the block, not in L x L


def test_a_window_restricts_the_rows_of_the_map():
  q, k, _ = _qkv(4)
  _, mask_BxL = padded_batch("none")
  qk = attention.QueriesKeys(jnp.asarray(q), jnp.asarray(k), jnp.float32(K ** -0.5), window=3)
  maps_BxNxLxL = np.asarray(attention.full_maps(qk, jnp.asarray(mask_BxL)))
  np.testing.assert_allclose(maps_BxNxLxL.sum(-1), 1.0, atol=1e-6)
  seen = maps_BxNxLxL > 0
  assert seen[:, :, 8].sum(-1).tolist() == [[3] * N] * B and seen[:, :, 8, 6:].all()   # keys 6, 7, 8 only
  assert seen[:, :, 1].sum(-1).tolist() == [[2] * N] * B                               # keys 0, 1


def _capped_reference(q, k, v, mask_BxL, scale, window, softcap):
  """float64 like `_reference`, the scores soft-capped: softcap * tanh(scores / softcap) before the mask."""
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  out = np.zeros((B, L, N, K))
  index = np.arange(L)
  allowed_LxL = (index[None] <= index[:, None]) & ((index[:, None] - index[None] < window) if window else True)
  for b in range(B):
    allowed = (allowed_LxL & mask_BxL[b].astype(bool)[None]) | np.eye(L, dtype=bool)
    for h in range(N):
      scores = np.tanh(q[b, :, h] @ k[b, :, h // (N // G)].T * scale / softcap) * softcap
      probs = np.exp(np.where(allowed, scores, -np.inf) - scores.max(-1, keepdims=True))
      out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, h // (N // G)]
  return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_soft_capped_scores_match_float64(side):
  """Gemma 2's tanh soft-cap at 1.0 (the scores here reach ~4): blockwise and the materialised xla path agree."""
  q, k, v = _qkv(5)
  q = q * 2.0
  _, mask_BxL = padded_batch(side)
  expected = _capped_reference(q, k, v, mask_BxL, K ** -0.5, 3, 1.0)
  uncapped = _reference(q, k, v, mask_BxL, K ** -0.5, 3)
  real = mask_BxL.astype(bool)
  assert np.abs(expected - uncapped)[real].max() > 0.1   # the cap changes the result
  for implementation, block in (("blockwise", 4), ("blockwise", 512), ("xla", 0)):
    out = attention.attend(q, k, v, mask_BxL, head_scale=K ** -0.5, layer_factor=None, implementation=implementation,
                           block=block, right_padded=side == "right", window=3, softcap=1.0)
    err = np.abs(np.asarray(out) - expected)[real].max()
    assert err < 1e-5, (implementation, block, err)
  with pytest.raises(ValueError, match=r"cuDNN attention cannot soft-cap the scores \(softcap=1.0\)"):
    attention.attend(q, k, v, mask_BxL, head_scale=K ** -0.5, layer_factor=None, implementation="cudnn", block=4,
                     right_padded=False, softcap=1.0)


def test_auto_avoids_cudnn_where_it_cannot_soft_cap(monkeypatch):
  class Hopper:
    platform, compute_capability = "gpu", "9.0"

  monkeypatch.setattr(jax, "devices", lambda *args: [Hopper()])
  assert attention.resolve_implementation("auto", "bfloat16", 64) == "cudnn"
  assert attention.resolve_implementation("auto", "bfloat16", 64, softcap=50.0) == "blockwise"


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_traced_window_is_the_static_one(side):
  """A scanned stack mixing windowed and full layers passes each layer's window traced: 3, or 0 for none."""
  q, k, v = _qkv(6)
  _, mask_BxL = padded_batch(side)
  real = mask_BxL.astype(bool)
  cases = [("blockwise", 4, False), ("xla", 0, False)] + ([("xla", 0, True)] if side == "right" else [])
  for implementation, block, right_padded in cases:
    traced = jax.jit(lambda q, k, v, m, w: attention.attend(
        q, k, v, m, head_scale=K ** -0.5, layer_factor=None, implementation=implementation, block=block,
        right_padded=right_padded, window=w, windows=(3, 0)))
    for window in (3, 0):
      err = np.abs(np.asarray(traced(q, k, v, mask_BxL, jnp.int32(window)))
                   - _reference(q, k, v, mask_BxL, K ** -0.5, window))[real].max()
      assert err < 1e-5, (implementation, right_padded, window, err)
