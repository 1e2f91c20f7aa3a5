"""Flax causal LMs against transformers' PyTorch models, plus the forward's contract."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FAMILY_CONFIGS, ROPE_LLAMA3, padded_batch
from jaxdistill import models
from jaxdistill.errors import ConfigError
from jaxdistill.models.rope import inverse_frequencies

TOLERANCE = 1e-4


def _torch_outputs(model, ids_BxL, mask_BxL):
  positions = np.asarray(models.default_positions(jnp.asarray(mask_BxL)))
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                 position_ids=torch.from_numpy(positions.astype(np.int64)),
                 output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_parity_with_transformers(hf_checkpoints, name, side):
  path, torch_model = hf_checkpoints[name]
  loaded = models.load_pretrained(path)
  ids_BxL, mask_BxL = padded_batch(side)
  out = models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL, output_hidden_states=True,
                       attention_layers=(0, 1))
  ref = _torch_outputs(torch_model, ids_BxL, mask_BxL)
  real = mask_BxL.astype(bool)  # padded positions are undefined in both implementations

  logits_err = np.abs(np.asarray(out.logits_BxLxV) - ref.logits.numpy())[real].max()
  assert logits_err < TOLERANCE, f"{name} logits max abs error {logits_err:.2e}"
  assert len(out.hidden_states) == len(ref.hidden_states) == loaded.config.num_layers + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    err = np.abs(np.asarray(ours) - theirs.numpy())[real].max()
    assert err < TOLERANCE, f"{name} hidden state {i} max abs error {err:.2e}"
  for i, (ours, theirs) in enumerate(zip(out.attentions, ref.attentions)):
    err = np.abs(np.asarray(ours) - theirs.numpy()).transpose(0, 2, 1, 3)[real].max()
    assert err < TOLERANCE, f"{name} attention {i} max abs error {err:.2e}"


def test_only_requested_outputs_are_returned(hf_checkpoints):
  path, _ = hf_checkpoints["llama_gqa_untied"]
  loaded = models.load_pretrained(path)
  ids_BxL, mask_BxL = padded_batch("left")
  plain = models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL)
  assert plain.hidden_states is None and plain.attentions == ()
  one = models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL, attention_layers=(1,))
  chex.assert_shape(one.attentions, [(3, 6, 9, 9)])
  probs = np.asarray(one.attentions[0])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)   # rows are distributions
  assert np.all(np.triu(probs, k=1) == 0)                      # causal
  assert np.all(probs[1][:, 2:, :2] == 0)                      # row 1: real queries skip 2 pad keys
  assert np.all(probs[2][:, 4:, :4] == 0)                      # row 2: real queries skip 4 pad keys
  # The jaxpr without requested attentions holds no [B, H, L, L] output: nothing is materialised.
  jaxpr = jax.make_jaxpr(lambda p: models.forward(p, loaded.config, ids_BxL, mask_BxL).logits_BxLxV)(
      loaded.params)
  assert len(jaxpr.out_avals) == 1


def test_logits_match_unembed_of_final_hidden(hf_checkpoints):
  path, _ = hf_checkpoints["qwen3"]
  loaded = models.load_pretrained(path)
  ids_BxL, mask_BxL = padded_batch("none")
  out = models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL)
  headless = models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL, compute_logits=False)
  assert headless.logits_BxLxV is None
  chex.assert_trees_all_close(models.unembed(loaded.params, loaded.config, headless.final_hidden_BxLxD),
                              out.logits_BxLxV, atol=1e-6)


def test_default_positions_count_real_tokens_only():
  mask_BxL = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(models.default_positions(mask_BxL), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def test_llama3_rope_frequencies_match_transformers():
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_scaling=dict(ROPE_LLAMA3), rope_theta=500000.0)
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  ours = inverse_frequencies(models.from_hf_config(hf.to_dict()).rope, head_dim=32)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  # Not a no-op here: wavelengths beyond 8 / low_freq_factor = 8 tokens are divided by `factor` (8),
  # and the highest frequency (wavelength 2*pi, between 8/4 and 8) is interpolated:
  # smooth = (8 / (2*pi) - 1) / (4 - 1) = 0.0911, 1 * ((1 - smooth) / 8 + smooth) = 0.2047.
  plain = inverse_frequencies(models.RopeConfig(theta=500000.0), head_dim=32)
  np.testing.assert_allclose(ours[-1], plain[-1] / 8.0, rtol=1e-6)
  np.testing.assert_allclose(ours[0], 0.204695, rtol=1e-5)


def test_dtype_policy_fp32_master_weights_bf16_compute(hf_checkpoints):
  path, _ = hf_checkpoints["llama_gqa_untied"]
  full = models.load_pretrained(path)
  mixed = models.load_pretrained(path, param_dtype="float32", dtype="bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(mixed.params))
  ids_BxL, mask_BxL = padded_batch("left")
  out = models.forward(mixed.params, mixed.config, ids_BxL, mask_BxL, output_hidden_states=True,
                       attention_layers=(0,))
  assert out.logits_BxLxV.dtype == jnp.bfloat16
  assert all(h.dtype == jnp.bfloat16 for h in out.hidden_states)
  assert out.attentions[0].dtype == jnp.float32  # softmax stays in fp32
  reference = models.forward(full.params, full.config, ids_BxL, mask_BxL).logits_BxLxV
  real = mask_BxL.astype(bool)
  err = np.abs(np.asarray(out.logits_BxLxV, np.float32) - np.asarray(reference))[real].max()
  assert 0 < err < 0.1  # bf16 rounding, not a different model

  half = models.load_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")  # a bf16 teacher
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))
  out16 = models.forward(half.params, half.config, ids_BxL, mask_BxL)
  err16 = np.abs(np.asarray(out16.logits_BxLxV, np.float32) - np.asarray(reference))[real].max()
  assert err16 < 0.1


def test_forward_compiles_once_per_config(hf_checkpoints):
  path, _ = hf_checkpoints["gpt2"]
  loaded = models.load_pretrained(path)
  ids_BxL, mask_BxL = padded_batch("right")
  models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL)
  before = models.forward._cache_size()
  for seed in range(3):
    ids_BxL, mask_BxL = padded_batch("left", seed=seed)
    models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL)
  assert models.forward._cache_size() == before


def test_remat_keeps_the_params_and_the_gradients():
  """Recomputing blocks in the backward pass (models/config.py REMAT_POLICIES) changes memory, not maths."""
  import dataclasses

  cfg = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64)
  policies = ("full", "dots_no_batch")
  params = models.init_params(cfg, jax.random.key(0))
  for policy in policies:
    chex.assert_trees_all_equal_shapes_and_dtypes(params, models.param_shapes(dataclasses.replace(cfg, remat=policy)))
  ids_BxL, mask_BxL = padded_batch("right")

  @jax.jit
  def gradients(params):
    def loss(params, c):  # logits, every hidden state and one attention map all reach the loss
      out = models.forward(params, c, ids_BxL, mask_BxL, output_hidden_states=True, attention_layers=(1,))
      return (jnp.mean(jax.nn.log_softmax(out.logits_BxLxV)) + sum(jnp.mean(h ** 2) for h in out.hidden_states)
              + jnp.mean(out.attentions[0] ** 2))
    return [jax.grad(loss)(params, dataclasses.replace(cfg, remat=p)) for p in ("none",) + policies]

  plain, *recomputed = gradients(params)
  for policy, grads in zip(policies, recomputed):
    chex.assert_trees_all_close(grads, plain, atol=1e-7, rtol=1e-6, custom_message=policy)
  assert float(jnp.abs(plain["blocks"]["attn"]["q"]["kernel"][0]).max()) > 0  # gradients reach the first block
  with pytest.raises(ConfigError, match="'remat' = 'some' is not allowed: one of none, full, dots"):
    dataclasses.replace(cfg, remat="some")


def _gemma_like(**changes) -> models.ModelConfig:
  """Every optional block capability on: layers 0 and 2 windowed (3 keys, their own RoPE base), 1 and 3 full."""
  fields = dict(family="llama", vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=64, max_position_embeddings=64, activation="gelu_pytorch_tanh", qk_norm=True,
                sliding_window=3, full_attention_layers=(1, 3), local_rope=models.RopeConfig(theta=10.0),
                attn_logit_softcap=2.0, final_logit_softcap=3.0, query_pre_attn_scalar=12, norm_unit_offset=True,
                post_norms=True, scale_embeddings=True, tie_word_embeddings=True)
  return models.ModelConfig(**{**fields, **changes})


def _perturbed_params(cfg, seed=0):
  """Random params with the (1 + w) norm weights moved off 0 and the embeddings large enough to saturate caps."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32),
                      jax.device_get(models.init_params(cfg, jax.random.key(seed))))


def test_unit_offset_rms_norm_scales_by_one_plus_the_weight():
  from jaxdistill.models.transformer import Norm

  cfg = _gemma_like(norm_eps=0.0)
  x_1x2 = jnp.array([[3.0, 4.0]])   # rms = sqrt((9 + 16) / 2) = sqrt(12.5)
  out = Norm(cfg).apply({"params": {"scale": jnp.array([0.5, -1.0])}}, x_1x2)
  np.testing.assert_allclose(out, [[3 / np.sqrt(12.5) * 1.5, 0.0]], rtol=1e-6)
  initial = Norm(cfg).init(jax.random.key(0), x_1x2)
  np.testing.assert_array_equal(initial["params"]["scale"], [0.0, 0.0])   # (1 + 0): the plain RMS norm at init
  np.testing.assert_allclose(Norm(cfg).apply(initial, x_1x2), x_1x2 / np.sqrt(12.5), rtol=1e-6)


def test_final_logit_softcap_and_embedding_scale():
  cfg = _gemma_like(final_logit_softcap=0.5)
  params = _perturbed_params(cfg)
  ids_BxL, mask_BxL = padded_batch("none")
  out = models.forward(params, cfg, ids_BxL, mask_BxL, output_hidden_states=True)
  plain = models.forward(params, dataclasses.replace(cfg, final_logit_softcap=0.0), ids_BxL, mask_BxL).logits_BxLxV
  assert float(jnp.abs(plain).max()) > 2.0 and float(jnp.abs(out.logits_BxLxV).max()) <= 0.5   # saturated
  np.testing.assert_allclose(out.logits_BxLxV, 0.5 * np.tanh(np.asarray(plain, np.float64) / 0.5), atol=1e-6)
  embeddings_BxLxD = np.asarray(params["embed"]["embedding"])[ids_BxL] * np.float32(np.sqrt(32))
  np.testing.assert_allclose(out.hidden_states[0], embeddings_BxLxD, rtol=1e-6)


def test_per_layer_windows_in_a_scanned_stack_equal_the_unrolled_stack():
  """Windowed and full layers share one scanned stack (the window rides along as a traced int, picking the
  layer's mask, RoPE, and for the fused kernel's mask-free path the kernel); the unrolled stack sees static
  windows. Outputs and gradients agree."""
  cfg = _gemma_like(attn_logit_softcap=0.0)   # no cap: the xla path is the fused kernel's
  params = _perturbed_params(cfg)
  ids_BxL, mask_BxL = padded_batch("right")
  real = mask_BxL.astype(bool)

  @functools.partial(jax.jit, static_argnums=0)
  def run(c, params):
    def loss(params):
      out = models.forward(params, c, ids_BxL, mask_BxL, output_hidden_states=True, attention_layers=(0, 1),
                           right_padded=True)
      return jnp.mean(jnp.where(real[..., None], out.logits_BxLxV, 0.0) ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, reference), grads = run(dataclasses.replace(cfg, scan_layers=False, attention="blockwise"), params)
  for remat, implementation in (("full", "blockwise"), ("none", "xla")):
    (_, out), other = run(dataclasses.replace(cfg, remat=remat, attention=implementation), params)
    for ours, theirs in zip((out.logits_BxLxV, *out.hidden_states, *[m.transpose(0, 2, 1, 3) for m in out.attentions]),
                            (reference.logits_BxLxV, *reference.hidden_states,
                             *[m.transpose(0, 2, 1, 3) for m in reference.attentions])):
      assert np.abs(np.asarray(ours) - np.asarray(theirs))[real].max() < 1e-5, (remat, implementation)
    chex.assert_trees_all_close(other, grads, atol=1e-6, rtol=1e-4, custom_message=f"{remat} {implementation}")
  window_map, full_map = (np.asarray(m) for m in reference.attentions)
  assert (window_map[0, :, 8, :6] == 0).all() and (window_map[0, :, 8, 6:] > 0).all()   # layer 0: keys 6..8
  assert (full_map[0, :, 8] > 0).all()                                                  # layer 1: every key
