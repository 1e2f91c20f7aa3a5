"""Flax causal LMs against transformers' PyTorch models, plus the forward's contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FAMILY_CONFIGS, ROPE_LLAMA3, padded_batch
from jaxdistill import models
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
  with pytest.raises(ValueError, match="remat"):
    dataclasses.replace(cfg, remat="some")
