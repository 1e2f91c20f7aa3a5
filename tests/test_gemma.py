"""Gemma 2 and Gemma 3 (text) against transformers: parity, export, config.json mapping, a random student."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from test_hf_io import _torch_logits
from test_models import TOLERANCE, _torch_outputs

from conftest import VOCAB, padded_batch, save_torch_models
from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.errors import ModelLoadError

# Windows of 3 keys on the 9-token rows of padded_batch; caps, a query scale and RoPE bases that bite (each is
# checked to matter below).
CONFIGS = {
    # Layers 0 and 2 windowed, 1 global (every other layer); tied embeddings.
    "gemma2": ("Gemma2Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0)),
    # Global every second layer (1, 3); a local RoPE base of 10 against 1M with linear scaling; q/k norms;
    # untied embeddings and attention biases.
    "gemma3_text": ("Gemma3TextConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=3, sliding_window_pattern=2, query_pre_attn_scalar=24,
        rope_theta=1e6, rope_local_base_freq=10.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        final_logit_softcapping=2.0, tie_word_embeddings=False, attention_bias=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  return save_torch_models(tmp_path_factory, CONFIGS)


def _parity_errors(loaded, torch_model, side):
  """Max abs errors on real tokens: logits, every hidden state, every layer's attention map; and our outputs."""
  cfg = loaded.config
  ids_BxL, mask_BxL = padded_batch(side)
  out = models.forward(loaded.params, cfg, ids_BxL, mask_BxL, output_hidden_states=True,
                       attention_layers=tuple(range(cfg.num_layers)))
  ref = _torch_outputs(torch_model, ids_BxL, mask_BxL)
  real = mask_BxL.astype(bool)
  return (np.abs(np.asarray(out.logits_BxLxV) - ref.logits.numpy())[real].max(),
          [np.abs(np.asarray(a) - b.numpy())[real].max() for a, b in zip(out.hidden_states, ref.hidden_states)],
          [np.abs(np.asarray(a) - b.numpy()).transpose(0, 2, 1, 3)[real].max()
           for a, b in zip(out.attentions, ref.attentions)], out)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(checkpoints, name, side):
  path, torch_model = checkpoints[name]
  loaded = models.load_pretrained(path)
  logits_err, hidden_errs, attention_errs, out = _parity_errors(loaded, torch_model, side)
  assert logits_err < TOLERANCE, f"{name} logits max abs error {logits_err:.2e}"
  assert len(hidden_errs) == loaded.config.num_layers + 1 and max(hidden_errs) < TOLERANCE, hidden_errs
  assert len(attention_errs) == loaded.config.num_layers and max(attention_errs) < TOLERANCE, attention_errs
  # The windowed layers (0 and 2) see 3 keys from the last query of row 0 (no padding), the global ones all 9.
  seen = [int((np.asarray(m)[0, :, 8] > 0).sum(-1).max()) for m in out.attentions]
  assert seen == [3, 9, 3, 9][:loaded.config.num_layers], seen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_gemma_capability_is_exercised(checkpoints, name):
  """Turning any one capability off breaks parity: the tiny models test each of them."""
  path, torch_model = checkpoints[name]
  loaded = models.load_pretrained(path)
  cfg = loaded.config
  changes = dict(full_attention_layers=(), final_logit_softcap=0.0, query_pre_attn_scalar=0, norm_unit_offset=False,
                 post_norms=False, scale_embeddings=False)
  changes.update(dict(local_rope=None, qk_norm=False) if name == "gemma3_text" else dict(attn_logit_softcap=0.0))
  blocks = loaded.params["blocks"]
  # Without the post norms or the q/k norms, their params go too.
  unused = {"post_norms": {k: v for k, v in blocks.items() if k not in ("attn_post_norm", "mlp_post_norm")},
            "qk_norm": {**blocks, "attn": {k: v for k, v in blocks["attn"].items() if k not in ("q_norm", "k_norm")}}}
  ids_BxL, mask_BxL = padded_batch("left")
  reference_BxLxV = _torch_outputs(torch_model, ids_BxL, mask_BxL).logits.numpy()
  for field, value in changes.items():
    params = {**loaded.params, "blocks": unused.get(field, blocks)}
    logits_BxLxV = models.forward(params, dataclasses.replace(cfg, **{field: value}), ids_BxL, mask_BxL).logits_BxLxV
    logits_err = np.abs(np.asarray(logits_BxLxV) - reference_BxLxV)[mask_BxL.astype(bool)].max()
    assert logits_err > 10 * TOLERANCE, f"{name}: {field}={value!r} leaves logits within {logits_err:.1e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip_loads_in_transformers(checkpoints, tmp_path, name):
  """Random Flax params -> export -> transformers -> the same logits; and back into Flax unchanged."""
  cfg = models.load_pretrained(checkpoints[name][0]).config
  params = models.init_params(cfg, jax.random.key(7))
  out_dir = models.save_pretrained(params, cfg, str(tmp_path / "export"))
  assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
  for side in ("left", "right"):
    ids_BxL, mask_BxL = padded_batch(side)
    ours = np.asarray(models.forward(params, cfg, ids_BxL, mask_BxL).logits_BxLxV)
    theirs = _torch_logits(out_dir, ids_BxL, mask_BxL)
    assert np.abs(ours - theirs)[mask_BxL.astype(bool)].max() < TOLERANCE, side
  reloaded = models.load_pretrained(out_dir)
  assert reloaded.config == cfg
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, jax.device_get(params))


def test_a_random_gemma_pair_distills_through_the_config():
  """Random Gemma 2 teacher and Gemma 3 student from the arch groups of a config file, every loss component on
  (the attention losses read the windowed and global layers' maps), rows of 16 tokens over windows of 8."""
  from test_steps import ALL_ON, OPTIM
  from test_steps import VOCAB as STEPS_VOCAB
  from test_steps import _batch, _train

  from jaxdistill.objective import DistillSpec, ResolvedObjective, init_heads
  from jaxdistill.training import build, steps
  from jaxdistill.training.optim import make_optimizer
  from jaxdistill.training.state import create_train_state

  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "teacher.arch.family": "gemma2", "teacher.arch.sliding_window": 8,
      "student.arch.family": "gemma3_text", "student.arch.sliding_window": 8}))
  keys = jax.random.split(jax.random.key(0), 3)
  teacher = build.build_model(cfg.teacher, STEPS_VOCAB, keys[0], "teacher")
  student = build.build_model(cfg.student, STEPS_VOCAB, keys[1], "student")
  assert (teacher.config.sliding_window, teacher.config.full_attention_layers) == (8, (1,))   # every other layer
  assert (teacher.config.attn_logit_softcap, teacher.config.final_logit_softcap) == (50.0, 30.0)
  assert (student.config.sliding_window, student.config.full_attention_layers) == (8, ())    # every sixth of 2
  assert (student.config.rope.theta, student.config.local_rope.theta, student.config.qk_norm) == (1e6, 1e4, True)
  for model in (teacher, student):
    assert models.from_hf_config(model.hf_config) == model.config   # its export describes the same model

  objective = ResolvedObjective(distill=DistillSpec(chunk_size=16), curriculum=ALL_ON, total_steps=OPTIM.total_steps)
  setup = steps.StepSetup(objective.resolve_layers(student.config, teacher.config), student.config, teacher.config,
                          OPTIM)
  tx, _ = make_optimizer(OPTIM)
  state = create_train_state(student.params, init_heads(setup.objective, student.config, teacher.config, keys[2]), tx)
  losses = []
  for _ in range(4):
    state, metrics = _train(state, _batch(), teacher.params, setup=setup)
    losses.append(float(metrics["loss"]))
  assert all(float(metrics[f"raw/{c}"]) > 0 for c in ("kd", "attention")), metrics
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_config_json_as_the_hub_writes_it():
  """The keys of Gemma 2 and Gemma 3 1B's hub files (no layer_types): transformers' layer pattern and defaults."""
  import transformers

  sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16)
  gemma2 = models.from_hf_config(dict(sizes, model_type="gemma2", hidden_act="gelu_pytorch_tanh", rope_theta=10000.0,
                                      query_pre_attn_scalar=16, sliding_window=4096))
  assert gemma2.full_attention_layers == (1, 3, 5, 7, 9, 11) and gemma2.sliding_window == 4096
  assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.local_rope) == (50.0, 30.0, None)
  gemma3 = models.from_hf_config(dict(sizes, model_type="gemma3_text", rope_theta=1000000.0,
                                      rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                      sliding_window=512, sliding_window_pattern=6, attn_logit_softcapping=None,
                                      final_logit_softcapping=None))
  assert gemma3.full_attention_layers == (5, 11) and gemma3.sliding_window == 512
  assert gemma3.rope == models.RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
  assert gemma3.local_rope == models.RopeConfig(theta=1e4)
  assert (gemma3.attn_logit_softcap, gemma3.final_logit_softcap, gemma3.query_pre_attn_scalar) == (0.0, 0.0, 256)
  for cfg, hf_class in ((gemma2, transformers.Gemma2Config), (gemma3, transformers.Gemma3TextConfig)):
    written = models.to_hf_config(cfg)
    theirs = hf_class(**written)
    assert [i for i, t in enumerate(theirs.layer_types) if t == "full_attention"] == list(cfg.full_attention_layers)
    assert models.from_hf_config(theirs.to_dict()) == models.from_hf_config(written) == cfg
  assert models.to_hf_config(gemma3)["rope_local_base_freq"] == 10000.0
  # No windowed layer: plain causal attention, and transformers still gets a window for its mask.
  unwindowed = models.from_hf_config(dict(models.to_hf_config(gemma2), layer_types=["full_attention"] * 12))
  assert (unwindowed.sliding_window, unwindowed.full_attention_layers) == (0, ())
  assert models.to_hf_config(unwindowed)["sliding_window"] == unwindowed.max_position_embeddings


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma3"), r"model_type 'gemma3' is not supported; supported families: .*gemma3_text"),
    (dict(use_bidirectional_attention=True), r"use_bidirectional_attention=true is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), r"layer_types must give one of sliding_attention, "
                                                                   r"full_attention for each of the 2 layers"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     r"a 'linear' scaled RoPE on the sliding-window layers is not supported"),
])
def test_what_gemma_refuses_is_one_line(change, message):
  hf = {**dict(model_type="gemma3_text", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4), **change}
  with pytest.raises(ModelLoadError, match=f"^ckpt/config.json: {message}") as error:
    models.from_hf_config(hf, "ckpt/config.json")
  assert "\n" not in str(error.value)
