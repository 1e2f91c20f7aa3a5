"""Loading Hugging Face checkpoints, exporting Flax params as one, and the loader's errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch

from conftest import FAMILY_CONFIGS, make_torch_model, padded_batch
from jaxdistill import models
from jaxdistill.data.tokenizer import byte_tokenizer
from jaxdistill.errors import ModelLoadError


def _torch_logits(path_or_model, ids_BxL, mask_BxL):
  from transformers import AutoModelForCausalLM

  model = (AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
           if isinstance(path_or_model, str) else path_or_model)
  positions = np.maximum(np.cumsum(mask_BxL, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                 position_ids=torch.from_numpy(positions)).logits.numpy()


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_export_round_trip_loads_in_transformers(hf_checkpoints, tmp_path, name):
  """Random Flax params -> export -> transformers -> the same logits; and back into Flax unchanged."""
  path, _ = hf_checkpoints[name]
  cfg = models.load_pretrained(path).config
  params = models.init_params(cfg, jax.random.key(7))
  out_dir = models.save_pretrained(params, cfg, str(tmp_path / "export"))
  assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
  umask = os.umask(0)
  os.umask(umask)
  # Readable by others, as save_pretrained's files are: 0644 under the usual umask 022.
  assert {f: os.stat(os.path.join(out_dir, f)).st_mode & 0o777 for f in os.listdir(out_dir)} == {
      "config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}

  ids_BxL, mask_BxL = padded_batch("left")
  ours = np.asarray(models.forward(params, cfg, ids_BxL, mask_BxL).logits_BxLxV)
  theirs = _torch_logits(out_dir, ids_BxL, mask_BxL)
  real = mask_BxL.astype(bool)
  assert np.abs(ours - theirs)[real].max() < 1e-4

  reloaded = models.load_pretrained(out_dir)
  assert reloaded.config == cfg
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, jax.device_get(params))


def test_export_keeps_source_config_fields_and_tokenizer(hf_checkpoints, tmp_path):
  from transformers import AutoTokenizer

  path, _ = hf_checkpoints["llama3_rope_tied"]
  loaded = models.load_pretrained(path)
  tokenizer = byte_tokenizer()
  with pytest.raises(ModelLoadError, match="the tokenizer has 257 tokens but the model's vocabulary has only 97"):
    models.save_pretrained(loaded.params, loaded.config, str(tmp_path / "bad"), tokenizer=tokenizer)

  poisoned = jax.tree.map(np.array, loaded.params)  # copies
  poisoned["final_norm"]["scale"][3] = np.nan
  with pytest.raises(ModelLoadError, match=r"not exporting to .*/nan: the weights hold non-finite values \(a diverged "
                                           r"run\); nothing was written"):
    models.save_pretrained(poisoned, loaded.config, str(tmp_path / "nan"))
  assert not os.path.exists(tmp_path / "nan")

  cfg = dataclasses.replace(loaded.config, vocab_size=len(tokenizer))
  source = dict(loaded.hf_config, my_custom_field=123)
  out_dir = models.save_pretrained(models.init_params(cfg, jax.random.key(0)), cfg, str(tmp_path / "e"),
                                   hf_config=source, tokenizer=tokenizer, dtype="bfloat16")
  with open(os.path.join(out_dir, "config.json")) as f:
    written = json.load(f)
  assert written["my_custom_field"] == 123
  assert written["architectures"] == ["LlamaForCausalLM"]
  assert written["rope_scaling"]["rope_type"] == "llama3" and written["rope_theta"] == 500000.0
  assert str(load_file(os.path.join(out_dir, "model.safetensors"))["model.norm.weight"].dtype) == "bfloat16"
  assert "lm_head.weight" not in load_file(os.path.join(out_dir, "model.safetensors"))  # tied
  assert written["eos_token_id"] == written["pad_token_id"] == 256 and written["vocab_size"] == 257
  assert AutoTokenizer.from_pretrained(out_dir)("hi")["input_ids"] == [104, 105]
  assert models.load_pretrained(out_dir).config == cfg


def test_sharded_and_bf16_checkpoints_load(tmp_path):
  sharded = str(tmp_path / "sharded")
  make_torch_model("qwen2").to(torch.bfloat16).save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
  loaded = models.load_pretrained(sharded)  # bf16 on disk -> fp32 params
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded.params))
  ids_BxL, mask_BxL = padded_batch("right")
  ours = np.asarray(models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL).logits_BxLxV)
  theirs = _torch_logits(sharded, ids_BxL, mask_BxL)
  assert np.abs(ours - theirs)[mask_BxL.astype(bool)].max() < 1e-4


# --- errors: one clear message each -----------------------------------------------------------

def _copy(hf_checkpoints, tmp_path, name="llama_gqa_untied") -> str:
  return shutil.copytree(hf_checkpoints[name][0], str(tmp_path / "ckpt"))


def test_missing_config_json(hf_checkpoints, tmp_path):
  path = _copy(hf_checkpoints, tmp_path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(ModelLoadError, match=r"no config.json"):
    models.load_pretrained(path)


def test_missing_weights_names_other_formats(hf_checkpoints, tmp_path):
  path = _copy(hf_checkpoints, tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  open(os.path.join(path, "pytorch_model.bin"), "w").close()
  with pytest.raises(ModelLoadError, match=r"no model.safetensors .*pytorch_model.bin.*safe_serialization"):
    models.load_pretrained(path)


def test_missing_shard(hf_checkpoints, tmp_path):
  path = str(tmp_path / "sharded")
  hf_checkpoints["qwen3"][1].save_pretrained(path, max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
  os.remove(os.path.join(path, shard))
  with pytest.raises(ModelLoadError, match=f"missing: {shard}"):
    models.load_pretrained(path)


def test_corrupt_weights_file(hf_checkpoints, tmp_path):
  path = _copy(hf_checkpoints, tmp_path)
  with open(os.path.join(path, "model.safetensors"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
    models.load_pretrained(path)


def test_unsupported_family_lists_supported(hf_checkpoints, tmp_path):
  path = _copy(hf_checkpoints, tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf["model_type"] = "mamba"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  with pytest.raises(ModelLoadError, match=r"model_type 'mamba' is not supported; supported families: "
                                           r"llama, qwen2, qwen3, gpt2"):
    models.load_pretrained(path)


def test_mismatched_shapes_name_the_tensor(hf_checkpoints, tmp_path):
  path = _copy(hf_checkpoints, tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  hf["intermediate_size"] = 96  # weights were saved with 80
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                           r"\(80, 48\).*\(48, 96\)"):
    models.load_pretrained(path)


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_missing_or_unexpected_tensors(hf_checkpoints, tmp_path, change):
  path = _copy(hf_checkpoints, tmp_path)
  file = os.path.join(path, "model.safetensors")
  state = load_file(file)
  if change == "drop":
    del state["model.layers.1.self_attn.k_proj.weight"]
    expected = r"lacks 1 tensor\(s\).*model.layers.1.self_attn.k_proj.weight"
  else:
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    expected = r"1 tensor\(s\) this llama config does not use.*q_proj.bias"
  save_file(state, file, metadata={"format": "pt"})
  with pytest.raises(ModelLoadError, match=expected):
    models.load_pretrained(path)


def test_offline_hub_id_says_how_to_use_a_local_directory():
  with pytest.raises(ModelLoadError, match=r"could not get 'HuggingFaceTB/SmolLM-135M'.*name_or_path=DIR"):
    models.load_pretrained("HuggingFaceTB/SmolLM-135M")


@pytest.mark.parametrize("path", ["./no/such/dir", "/no/such/dir", "~/no/such/dir", "runs/no/student_hf"])
def test_nonexistent_local_path_is_not_looked_up_on_the_hub(path):
  with pytest.raises(ModelLoadError, match=rf"^directory '{path}' does not exist \(a local path: hub ids are 'name' "
                                           r"or 'owner/name'\)$"):
    models.load_pretrained(path)


def test_unsupported_rope_scaling(hf_checkpoints):
  hf = dict(make_torch_model("llama_gqa_untied").config.to_dict())
  hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
  with pytest.raises(ModelLoadError, match=r"rope_type 'yarn' is not supported; supported: default, linear, llama3"):
    models.from_hf_config(hf)


def test_a_teacher_checkpoint_with_another_tokenizer_brings_it(hf_checkpoints, tmp_path):
  from tokenizers import Tokenizer
  from tokenizers import models as tok_models
  from transformers import PreTrainedTokenizerFast

  from jaxdistill import config as config_lib
  from jaxdistill.errors import ConfigError
  from jaxdistill.training.build import build_teacher_tokenizer, check_cross_vocab_objective

  teacher_dir = shutil.copytree(hf_checkpoints["llama_gqa_untied"][0], str(tmp_path / "teacher"))
  other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, "[UNK]")))
  other.save_pretrained(teacher_dir)
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {"teacher.name_or_path": teacher_dir,
                                                                         "stages.teacher_steps": 0}))
  assert build_teacher_tokenizer(cfg, byte_tokenizer()).get_vocab() == {"a": 0, "b": 1, "[UNK]": 2}
  with pytest.raises(ConfigError, match=r"'distill.kd_mode' = 'jsd' .* forward_kl when the teacher's tokenizer"):
    jsd = dataclasses.replace(cfg.objective.distill, kd_mode="jsd")
    check_cross_vocab_objective(dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, distill=jsd)))
  # `teacher_tokenizer` overrides the checkpoint's; one equal to the run's means a single tokenizer.
  assert build_teacher_tokenizer(dataclasses.replace(cfg, teacher_tokenizer="byte"), byte_tokenizer()) is None
  byte_tokenizer().save_pretrained(teacher_dir)  # the same vocabulary
  assert build_teacher_tokenizer(cfg, byte_tokenizer()) is None
