"""Mixture-of-experts teachers (Qwen3-MoE, Mixtral) against transformers, their outputs and their weights."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import VOCAB, padded_batch, save_torch_models
from jaxdistill import models
from jaxdistill.errors import ModelLoadError
from jaxdistill.models import moe, transformer

TOLERANCE = 1e-4
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
# name -> (transformers config class, kwargs, sparse layers)
MOE_CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        _BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
        attention_bias=True), (0, 1)),
    "qwen3_moe_normed_dense0": ("Qwen3MoeConfig", dict(  # layer 0 is a dense MLP
        _BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        mlp_only_layers=[0], tie_word_embeddings=True), (1,)),
    "mixtral": ("MixtralConfig", dict(_BASE, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
                (0, 1)),
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
  """name -> (directory written by transformers' save_pretrained, the transformers model)."""
  return save_torch_models(tmp_path_factory, MOE_CONFIGS)


def _torch_reference(model, ids_BxL, mask_BxL):
  """transformers' outputs (hidden states, router logits) and each sparse layer's MoE block output."""
  moe_out = {}
  hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: moe_out.__setitem__(i, out.numpy()))
           for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
  positions = np.asarray(models.default_positions(jnp.asarray(mask_BxL)))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64)),
                output_hidden_states=True, output_router_logits=True)
  for hook in hooks:
    hook.remove()
  return ref, moe_out


def _route_np(logits_TxE, top_k, renormalise):
  """float64 reference routing: softmax, the k largest, optionally renormalised."""
  logits = logits_TxE.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen_TxK = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  weights_TxK = np.take_along_axis(probs, chosen_TxK, -1)
  if renormalise:
    weights_TxK /= weights_TxK.sum(-1, keepdims=True)
  return weights_TxK, chosen_TxK


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_parity_with_transformers(moe_checkpoints, name, side):
  path, torch_model = moe_checkpoints[name]
  loaded = models.load_pretrained(path)
  cfg = loaded.config
  assert cfg.sparse_layers == MOE_CONFIGS[name][2]
  ids_BxL, mask_BxL = padded_batch(side)
  last = cfg.sparse_layers[-1]
  out = models.forward(loaded.params, cfg, ids_BxL, mask_BxL, output_hidden_states=True,
                       output_router_logits=True, expert_layers=(last,))
  ref, ref_moe = _torch_reference(torch_model, ids_BxL, mask_BxL)
  real = mask_BxL.astype(bool)  # padded positions are undefined in both implementations

  logits_err = np.abs(np.asarray(out.logits_BxLxV) - ref.logits.numpy())[real].max()
  assert logits_err < TOLERANCE, f"{name} logits max abs error {logits_err:.2e}"
  assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_layers + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    err = np.abs(np.asarray(ours) - theirs.numpy())[real].max()
    assert err < TOLERANCE, f"{name} hidden state {i} max abs error {err:.2e}"

  # transformers: one [B*L, E] array per sparse layer; ours: [B, L, E] float32.
  assert len(out.router_logits) == len(ref.router_logits) == len(cfg.sparse_layers)
  for ours, theirs in zip(out.router_logits, ref.router_logits):
    assert ours.shape == (3, 9, 4) and ours.dtype == jnp.float32
    theirs_BxLxE = theirs.numpy().reshape(ours.shape)
    err = np.abs(np.asarray(ours) - theirs_BxLxE)[real].max()
    assert err < TOLERANCE, f"{name} router logits max abs error {err:.2e}"
    _, ours_k = moe.route(jnp.asarray(ours)[real], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    theirs_k = torch.topk(torch.softmax(torch.from_numpy(theirs_BxLxE[real]), -1), cfg.num_experts_per_tok).indices
    np.testing.assert_array_equal(np.sort(np.asarray(ours_k), -1), np.sort(theirs_k.numpy(), -1))

  # The requested layer's per-expert outputs, mixed with its router's top-k weights, are its MoE output.
  (experts_BxLxExD,) = out.expert_outputs
  assert experts_BxLxExD.shape == (3, 9, 4, 32)
  weights_TxK, chosen_TxK = _route_np(np.asarray(out.router_logits[-1])[real], cfg.num_experts_per_tok,
                                      cfg.norm_topk_prob)
  chosen_outputs_TxKxD = np.take_along_axis(np.asarray(experts_BxLxExD, np.float64)[real], chosen_TxK[..., None], 1)
  mixed_TxD = np.einsum("tkd,tk->td", chosen_outputs_TxKxD, weights_TxK)
  err = np.abs(mixed_TxD - ref_moe[last][real]).max()
  assert err < TOLERANCE, f"{name} recombined expert outputs max abs error {err:.2e}"


def test_expert_outputs_are_the_unweighted_experts_by_hand(moe_checkpoints):
  """The MoE block on random inputs against numpy float64: router, top-k, each expert's SwiGLU, the mix."""
  loaded = models.load_pretrained(moe_checkpoints["qwen3_moe_normed_dense0"][0])
  cfg = loaded.config
  stack, index = cfg.stack_of(1)
  p = jax.tree.map(lambda leaf: leaf[index], loaded.params[stack]["mlp"])
  x_BxLxD = np.random.RandomState(1).normal(size=(2, 5, 32)).astype(np.float32)
  block = transformer.SparseMoE(cfg)
  buffer_1xBxLxExD = jnp.zeros((1, 2, 5, 4, 32), jnp.float32)
  dense_out, logits_BxLxE, captured = jax.jit(
      lambda x, slot: block.apply({"params": p}, x, (buffer_1xBxLxExD, slot)))(x_BxLxD, 0)   # traced slot: cond
  experts_BxLxExD = captured[0]
  sparse_out, _, none = jax.jit(lambda x: block.apply({"params": p}, x, None))(x_BxLxD)
  assert none is None
  _, _, untouched = jax.jit(lambda x, slot: block.apply({"params": p}, x, (buffer_1xBxLxExD, slot)))(x_BxLxD, -1)
  assert not np.asarray(untouched).any()   # slot -1: the sparse path, the buffer left as it was

  x_TxD = x_BxLxD.reshape(10, 32).astype(np.float64)
  logits_TxE = x_TxD @ p["router"]["kernel"]
  silu = lambda z: z / (1 + np.exp(-z))
  experts_TxExD = np.stack([(silu(x_TxD @ p["gate"][e]) * (x_TxD @ p["up"][e])) @ p["down"][e] for e in range(4)], 1)
  weights_TxK, chosen_TxK = _route_np(logits_TxE, 2, renormalise=True)
  np.testing.assert_allclose(weights_TxK.sum(-1), 1.0)
  expected_TxD = np.einsum("tkd,tk->td", np.take_along_axis(experts_TxExD, chosen_TxK[..., None], 1), weights_TxK)
  np.testing.assert_allclose(np.asarray(logits_BxLxE).reshape(10, 4), logits_TxE, atol=1e-6)
  np.testing.assert_allclose(np.asarray(experts_BxLxExD).reshape(10, 4, 32), experts_TxExD, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dense_out).reshape(10, 32), expected_TxD, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sparse_out).reshape(10, 32), expected_TxD, atol=1e-6)


def test_sorted_dispatch_matches_all_experts_with_uneven_groups():
  """Empty experts, a group spanning several tiles, one-row tiles: every (token, choice) gets its expert."""
  rng = np.random.RandomState(0)
  x_TxD = jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)
  kernels = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 6, 3), (5, 6, 3), (5, 3, 6))]
  # Expert 4 takes 9 of the 22 choices, experts 0 and 2 none.
  chosen_TxK = jnp.asarray([[4, 1], [4, 3], [1, 4], [3, 4], [4, 1], [1, 3], [4, 3], [3, 1], [4, 1], [1, 4],
                            [3, 4]], jnp.int32)
  all_TxExD = moe.all_expert_outputs(x_TxD, *kernels, jax.nn.silu)
  expected_TxKxD = np.take_along_axis(np.asarray(all_TxExD), np.asarray(chosen_TxK)[..., None], 1)
  for tile in (1, 4, 64):  # one-row tiles; expert 4 over three tiles; one tile larger than any group
    got = jax.jit(moe.chosen_expert_outputs, static_argnums=(5, 6))(x_TxD, chosen_TxK, *kernels, jax.nn.silu, tile)
    np.testing.assert_allclose(got, expected_TxKxD, rtol=1e-5, atol=1e-6, err_msg=f"tile {tile}")


def test_only_requested_moe_outputs_are_materialised(moe_checkpoints):
  loaded = models.load_pretrained(moe_checkpoints["mixtral"][0])
  cfg = loaded.config
  ids_BxL, mask_BxL = padded_batch("left")
  plain = jax.eval_shape(lambda p: models.forward(p, cfg, ids_BxL, mask_BxL), loaded.params)
  assert plain.router_logits == () and plain.expert_outputs == ()
  # No [T, E, ...] all-experts intermediate unless a layer is requested (T = 27 tokens, E = 4 experts).
  jaxpr = lambda layers: str(jax.make_jaxpr(
      lambda p: models.forward(p, cfg, ids_BxL, mask_BxL, expert_layers=layers).logits_BxLxV)(loaded.params))
  assert "[27,4," not in jaxpr(())
  assert "[27,4,16]" in jaxpr((1,)) and "[27,4,32]" in jaxpr((1,))
  dense0 = models.load_pretrained(moe_checkpoints["qwen3_moe_normed_dense0"][0])
  with pytest.raises(ValueError, match=r"expert layer 0 is not a sparse \(MoE\) layer; those are \(1,\)"):
    models.forward(dense0.params, dense0.config, ids_BxL, mask_BxL, expert_layers=(0,))

  # Dense families ignore MoE requests.
  dense_cfg = models.ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                 num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64)
  out = jax.eval_shape(lambda p: models.forward(p, dense_cfg, ids_BxL, mask_BxL, output_router_logits=True,
                                                 expert_layers=(0,)), models.param_shapes(dense_cfg))
  assert out.router_logits == () and out.expert_outputs == ()


def test_bf16_compute_keeps_routing_in_float32(moe_checkpoints):
  path = moe_checkpoints["qwen3_moe"][0]
  full, half = models.load_pretrained(path), models.load_pretrained(path, dtype="bfloat16")
  ids_BxL, mask_BxL = padded_batch("right")
  requests = dict(output_hidden_states=True, output_router_logits=True, expert_layers=(1,))  # as in the parity test
  out = models.forward(half.params, half.config, ids_BxL, mask_BxL, **requests)
  assert out.logits_BxLxV.dtype == out.expert_outputs[0].dtype == jnp.bfloat16
  assert all(r.dtype == jnp.float32 for r in out.router_logits)
  reference = models.forward(full.params, full.config, ids_BxL, mask_BxL, **requests).logits_BxLxV
  err = np.abs(np.asarray(out.logits_BxLxV, np.float32) - np.asarray(reference))[mask_BxL.astype(bool)].max()
  assert 0 < err < 0.1  # bf16 rounding, not a different model


# --- weights: both checkpoint layouts in, the hub layout out -------------------------------------

def _per_expert_state(model) -> dict[str, np.ndarray]:
  """The hub layout, written by hand from transformers' fused in-memory tensors."""
  mixtral = model.config.model_type == "mixtral"
  state = {}
  for name, tensor in model.state_dict().items():
    array = tensor.numpy()
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
      continue
    if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
      state[name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else name] = array
      continue
    prefix = name.rsplit(".", 1)[0].replace(".mlp.", ".block_sparse_moe.") if mixtral else name.rsplit(".", 1)[0]
    for e, expert in enumerate(array):
      if name.endswith("down_proj"):
        state[f"{prefix}.{e}.{'w2' if mixtral else 'down_proj'}.weight"] = expert
      else:
        gate, up = np.split(expert, 2, axis=0)
        state[f"{prefix}.{e}.{'w1' if mixtral else 'gate_proj'}.weight"] = gate
        state[f"{prefix}.{e}.{'w3' if mixtral else 'up_proj'}.weight"] = up
  return state


@pytest.mark.parametrize("name", ["qwen3_moe_normed_dense0", "mixtral"])
def test_both_expert_layouts_load_identically(moe_checkpoints, tmp_path, name):
  path, model = moe_checkpoints[name]
  saved = load_file(os.path.join(path, "model.safetensors"))
  by_hand = _per_expert_state(model)
  assert sorted(saved) == sorted(by_hand)  # save_pretrained writes the hub's per-expert layout
  fused = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in fused
  reference = models.load_pretrained(path).params
  for layout, state in (("per_expert", by_hand), ("fused", fused)):
    directory = tmp_path / layout
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), directory)
    jax.tree.map(np.testing.assert_array_equal, models.load_pretrained(str(directory)).params, reference)


@pytest.mark.parametrize("name", ["qwen3_moe_normed_dense0", "mixtral"])
def test_export_round_trip_loads_in_transformers(moe_checkpoints, tmp_path, name):
  from transformers import AutoModelForCausalLM

  cfg = models.load_pretrained(moe_checkpoints[name][0]).config
  rng = np.random.RandomState(3)  # random Flax params, without compiling `init_params`
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: ((path[-1].key == "scale") + rng.normal(0, 0.1, leaf.shape)).astype(leaf.dtype),
      models.param_shapes(cfg))
  out_dir = models.save_pretrained(params, cfg, str(tmp_path / "export"))
  written = load_file(os.path.join(out_dir, "model.safetensors"))
  expert_name = ("model.layers.0.block_sparse_moe.experts.3.w2.weight" if name == "mixtral"
                 else "model.layers.1.mlp.experts.3.down_proj.weight")
  assert written[expert_name].shape == (32, 16)

  ids_BxL, mask_BxL = padded_batch("left")
  ours = np.asarray(models.forward(params, cfg, ids_BxL, mask_BxL).logits_BxLxV)
  model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
  positions = np.maximum(np.cumsum(mask_BxL, axis=1) - 1, 0)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                   position_ids=torch.from_numpy(positions)).logits.numpy()
  assert np.abs(ours - theirs)[mask_BxL.astype(bool)].max() < 1e-4

  reloaded = models.load_pretrained(out_dir)
  assert reloaded.config == cfg
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, jax.device_get(params))


# --- config.json: transformers' layer rule and clear errors ------------------------------------

def test_sparse_layer_rule_matches_transformers():
  import transformers

  hf = transformers.Qwen3MoeConfig(**dict(_BASE, num_hidden_layers=6, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3]))
  # (i + 1) % 2 == 0 -> 1, 3, 5; 3 is listed as MLP-only.
  assert models.from_hf_config(hf.to_dict()).sparse_layers == (1, 5)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf)
  assert tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")) == (1, 5)


def _hf_config(name: str, **changes) -> dict:
  import transformers

  class_name, kwargs, _ = MOE_CONFIGS[name]
  return {**getattr(transformers, class_name)(**kwargs).to_dict(), **changes}


def test_expert_count_is_read_from_either_key():
  hub = _hf_config("qwen3_moe")
  hub["num_experts"] = hub.pop("num_local_experts")  # how Qwen/Qwen3-30B-A3B's config.json says it
  assert models.from_hf_config(hub).num_experts == 4
  with pytest.raises(ModelLoadError, match=r"num_experts and num_local_experts disagree"):
    models.from_hf_config({**hub, "num_local_experts": 8})


@pytest.mark.parametrize("changes, message", [
    (dict(mlp_only_layers=[1, 5]), r"mlp_only_layers=\(1, 5\) is not allowed: layer indices in 0..1 \(num_layers=2; "
                                   r"\[5\] are outside\)"),
    (dict(num_experts_per_tok=5), r"num_experts_per_tok=5 is not allowed: an integer in 1..num_experts=4$"),
    (dict(decoder_sparse_step=0), r"decoder_sparse_step=0 is not allowed: an integer >= 1$"),
    (dict(use_sliding_window=True), r"use_sliding_window=true is not supported"),
])
def test_unsupported_qwen3_moe_options(changes, message):
  with pytest.raises(ModelLoadError, match=r"config.json: " + message):
    models.from_hf_config(_hf_config("qwen3_moe", **changes))


def test_a_mixtral_sliding_window_is_read_and_written(moe_checkpoints):
  path = moe_checkpoints["mixtral"][0]
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  assert models.from_hf_config(hf).sliding_window == 0  # null: full attention
  windowed = models.from_hf_config({**hf, "sliding_window": 4096})
  assert windowed.sliding_window == 4096 and models.to_hf_config(windowed)["sliding_window"] == 4096


def test_checkpoint_missing_one_expert_names_it(moe_checkpoints, tmp_path):
  path, _ = moe_checkpoints["qwen3_moe"]
  state = load_file(os.path.join(path, "model.safetensors"))
  del state["model.layers.1.mlp.experts.3.up_proj.weight"]
  os.makedirs(tmp_path / "ckpt")
  save_file(state, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "ckpt")
  with pytest.raises(ModelLoadError, match=r"lacks 1 tensor\(s\).*model.layers.1.mlp.experts.3.up_proj.weight"):
    models.load_pretrained(str(tmp_path / "ckpt"))
