"""llama.cpp GGUF files as teachers and students: config, weights (every dequantised type), tokenizer, errors.

Each tiny transformers model is saved as safetensors and written again as GGUF by `gguf_files.write_gguf`, the
tests' own small converter: gguf-py's name map, llama.cpp's q/k row permutation for Llama and its `rope_freqs` for
Llama 3.1 scaling. transformers' own GGUF reader loading those files checks the converter follows llama.cpp.
"""

import dataclasses
import json
import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
import torch

from conftest import padded_batch, save_torch_models
from gguf_files import END_OF_TEXT, TEXTS, VOCAB, Q, byte_level_bpe, llama3_rope_freqs, write_gguf
from jaxdistill import models
from jaxdistill.data.tokenizer import load_tokenizer
from jaxdistill.errors import ModelLoadError
from jaxdistill.models import gguf_io, hf_io, weights


@pytest.fixture(scope="module")
def tokenizer():
  return byte_level_bpe()


_BASE = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128)
CONFIGS = {
    # in-dims 64 and 256 hold whole blocks of every type (ffn_down: 256, a k-quant super-block)
    "llama_gqa_untied": ("LlamaConfig", dict(_BASE, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                             num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_tied": ("LlamaConfig", dict(_BASE, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                                             max_position_embeddings=16384,
                                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2Config", dict(_BASE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_BASE, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_BASE, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
}
ARCH = {"llama_gqa_untied": "llama", "llama3_rope_tied": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (safetensors directory written by transformers, the transformers model)."""
  return save_torch_models(tmp_path_factory, CONFIGS)


@pytest.fixture(scope="module")
def f32_files(checkpoints, tokenizer, tmp_path_factory):
  """name -> the F32 GGUF file of that checkpoint."""
  root = tmp_path_factory.mktemp("gguf")
  return {name: write_gguf(root / f"{name}.gguf", path, tokenizer, ARCH[name])
          for name, (path, _) in checkpoints.items()}


def _logits(loaded, ids_BxL, mask_BxL) -> np.ndarray:
  return np.asarray(models.forward(loaded.params, loaded.config, ids_BxL, mask_BxL).logits_BxLxV)


def _torch_logits(model, ids_BxL, mask_BxL) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask_BxL, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                 position_ids=torch.from_numpy(positions)).logits.float().numpy()


# ---------------------------------------------------------------------------------------------
# Weights and config.

@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_gguf_loads_as_its_safetensors_checkpoint(checkpoints, f32_files, name):
  """Same config, bit-identical params (GGUF's reversed dims, llama's permutation and rope_freqs undone)."""
  from_safetensors = models.load_pretrained(checkpoints[name][0])
  from_gguf = models.load_pretrained(f32_files[name])
  assert from_gguf.config == from_safetensors.config
  assert from_gguf.path == f32_files[name]
  jax.tree.map(np.testing.assert_array_equal, from_gguf.params, from_safetensors.params)
  ids_BxL, mask_BxL = padded_batch("left")
  real = mask_BxL.astype(bool)
  assert np.abs(_logits(from_gguf, ids_BxL, mask_BxL) - _logits(from_safetensors, ids_BxL, mask_BxL))[real].max() < 1e-5


def test_gguf_config_reads_llama_cpp_metadata(f32_files):
  from transformers import AutoConfig

  hf = gguf_io.open_gguf(f32_files["llama3_rope_tied"]).hf_config
  assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
  assert (hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]) == (300, 32, 64, 2)
  assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (2, 1, 16)
  assert hf["rms_norm_eps"] == 1e-6 and hf["rope_theta"] == 500000.0 and hf["max_position_embeddings"] == 16384
  assert hf["tie_word_embeddings"] is True  # no output.weight in the file
  assert hf["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}
  assert hf["bos_token_id"] == hf["eos_token_id"] == 0
  config = AutoConfig.for_model(**hf)  # a config.json transformers takes as it is
  assert config.rope_parameters["rope_type"] == "llama3" and config.num_key_value_heads == 1
  moe = gguf_io.open_gguf(f32_files["qwen3_moe"]).hf_config
  assert (moe["model_type"], moe["num_experts"], moe["num_experts_per_tok"], moe["moe_intermediate_size"]) == \
      ("qwen3_moe", 4, 2, 32)
  assert moe["norm_topk_prob"] is True and moe["tie_word_embeddings"] is False


def test_llama3_rope_scaling_from_rope_freqs():
  """Llama 3.1 8B's rope_freqs give its rope_scaling back; another ramp is fitted; other factors are refused."""
  llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  divisors = llama3_rope_freqs(dict(llama31, rope_theta=500000.0), 128)
  assert gguf_io._llama3_rope_scaling(divisors, 500000.0, 128, "f") == llama31
  other = dict(llama31, factor=32.0, low_freq_factor=2.0, high_freq_factor=16.0)
  divisors = llama3_rope_freqs(dict(other, rope_theta=500000.0), 128)
  assert gguf_io._llama3_rope_scaling(divisors, 500000.0, 128, "f") == other
  assert gguf_io._llama3_rope_scaling(np.ones(64, np.float32), 500000.0, 128, "f") is None
  with pytest.raises(ModelLoadError, match=r"^f: its rope_freqs.weight \(per-frequency rope factors\) is not Llama "
                                           r"3.1's rope scaling; other rope factors are not supported$"):
    gguf_io._llama3_rope_scaling(np.linspace(1.0, 3.0, 64, dtype=np.float32) ** 2, 500000.0, 128, "f")


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen3"])
def test_our_gguf_writer_follows_llama_cpp(checkpoints, f32_files, name):
  """transformers' own GGUF reader (its reverse permutation, gguf-py's names) gives this converter's input back."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path, model = checkpoints[name]
  theirs = load_gguf_checkpoint(f32_files[name], return_tensors=True, model_to_load=model)["tensors"]
  original = hf_io.read_state_dict(path)
  assert sorted(theirs) == sorted(original)
  for tensor_name, tensor in theirs.items():
    np.testing.assert_array_equal(tensor.numpy(), original[tensor_name], err_msg=tensor_name)


# The loaded weights are exactly gguf's dequantisation of what was written; the logits' RMS error relative to
# their spread stays under these bounds (measured: F16 0.0005, BF16 0.005, Q8_0 0.013, Q5_0/Q5_1 0.12/0.11,
# Q4_0/Q4_1 0.23/0.21; random weights, every matrix quantised, embeddings and output included).
QUANTIZED = {"F16": 2e-3, "BF16": 1e-2, "Q8_0": 3e-2, "Q5_0": 0.2, "Q5_1": 0.2, "Q4_0": 0.35, "Q4_1": 0.35}


@pytest.fixture(scope="module")
def float_llama(checkpoints):
  return models.load_pretrained(checkpoints["llama_gqa_untied"][0])


@pytest.mark.parametrize("tensor_type", list(QUANTIZED))
def test_quantized_gguf_is_the_dequantised_weights(checkpoints, tokenizer, float_llama, tmp_path, tensor_type):
  path = write_gguf(tmp_path / "model.gguf", checkpoints["llama_gqa_untied"][0], tokenizer, "llama", tensor_type)
  loaded = models.load_pretrained(path)
  assert loaded.config == float_llama.config
  original = hf_io.read_state_dict(checkpoints["llama_gqa_untied"][0])
  quantized = {name: gguf.quants.dequantize(gguf.quants.quantize(w, Q[tensor_type]), Q[tensor_type])
               if w.ndim == 2 else w for name, w in original.items()}
  if tensor_type in ("F16", "BF16"):  # exactly the dtype's round-to-nearest-even
    rounded = original["lm_head.weight"].astype(np.float16 if tensor_type == "F16" else jax.numpy.bfloat16)
    np.testing.assert_array_equal(quantized["lm_head.weight"], rounded.astype(np.float32))
  expected = weights.hf_to_flax(quantized, loaded.config, models.param_shapes(loaded.config), where="")
  jax.tree.map(np.testing.assert_array_equal, loaded.params, expected)
  ids_BxL, mask_BxL = padded_batch("none")
  float_logits = _logits(float_llama, ids_BxL, mask_BxL)
  error = np.sqrt(np.mean((_logits(loaded, ids_BxL, mask_BxL) - float_logits) ** 2) / np.var(float_logits))
  assert 0 < error < QUANTIZED[tensor_type]


K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(tensor_type: str, rows: int, columns: int, seed: int) -> np.ndarray:
  """Random bytes of `rows` x `columns` values in `tensor_type`: bytes < 0x38 keep every fp16 scale finite."""
  values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[Q[tensor_type]]
  return np.random.default_rng(seed).integers(0, 0x38, (rows, columns // values_per_block * bytes_per_block),
                                              dtype=np.uint8)


@pytest.mark.parametrize("tensor_type", K_QUANTS)
def test_k_quants_dequantise_as_gguf_and_transformers_do(checkpoints, tokenizer, tmp_path, tensor_type):
  """gguf cannot quantise to k-quants: the ffn_down weights (256 inputs, one super-block a row) are random blocks.

  The loaded weights are gguf's dequantisation of those bytes, [out, in] = (64, 256), which transformers' own
  torch kernels (an independent implementation) agree on.
  """
  from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

  blocks = {f"blk.{i}.ffn_down.weight": (random_blocks(tensor_type, 64, 256, seed=i), Q[tensor_type]) for i in (0, 1)}
  path = write_gguf(tmp_path / "model.gguf", checkpoints["llama_gqa_untied"][0], tokenizer, "llama", raw=blocks)
  loaded = models.load_pretrained(path)
  _, state = gguf_io.read_gguf(path)
  for i in (0, 1):
    data, qtype = blocks[f"blk.{i}.ffn_down.weight"]
    down_64x256 = gguf.quants.dequantize(data, qtype)
    assert down_64x256.shape == (64, 256) and np.isfinite(down_64x256).all() and np.abs(down_64x256).max() > 0
    theirs = torch_dequantize(torch.from_numpy(data.reshape(-1)), int(qtype)).numpy().reshape(64, 256)
    np.testing.assert_allclose(down_64x256, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state[f"model.layers.{i}.mlp.down_proj.weight"], down_64x256)
    np.testing.assert_array_equal(loaded.params["blocks"]["mlp"]["down"]["kernel"][i], down_64x256.T)


# ---------------------------------------------------------------------------------------------
# Tokenizer and export.

def test_tokenizer_from_gguf_encodes_as_the_original(tokenizer, f32_files):
  from transformers import AutoTokenizer

  path = f32_files["qwen2"]
  ours = load_tokenizer(path)
  transformers_own = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  for text in TEXTS:
    expected = tokenizer(text)["input_ids"]
    assert ours(text)["input_ids"] == expected == transformers_own(text)["input_ids"]
  assert ours.decode(ours(TEXTS[0])["input_ids"]) == TEXTS[0]
  assert ours.get_vocab() == tokenizer.get_vocab()
  assert (ours.eos_token, ours.bos_token, ours.pad_token) == (END_OF_TEXT,) * 3  # pad: eos where the file has none
  assert ours(END_OF_TEXT)["input_ids"] == [0]  # a CONTROL token stays whole


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
  """A Llama-2-style vocabulary (tokenizer.ggml.model 'llama': scores, no merges, byte pieces) without torch."""
  from transformers import AutoTokenizer

  pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list("▁abcdehlorTw") + \
      ["▁a", "he", "ll", "▁he", "hell", "▁hell", "lo", "▁T", "▁Th", "▁The"]
  types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
      [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(pieces) - 259)
  writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list(pieces)
  writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)])
  writer.add_token_types(types)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  ours = load_tokenizer(str(tmp_path / "sp.gguf"))
  transformers_own = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
  for text in ["The hello world", "a hell of a café", "  Tab\there"]:
    assert ours(text)["input_ids"] == transformers_own(text)["input_ids"]
  assert ours("The hello")["input_ids"][:2] == [1, pieces.index("▁The")]  # BOS added, as llama.cpp does
  assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == ("<s>", "</s>", "<unk>", "</s>")


def test_gguf_loads_without_torch(f32_files):
  """torch is no dependency of jaxdistill: a GGUF model and its tokenizer load in a process that cannot import it."""
  script = (f"import sys; sys.modules['torch'] = None\n"
            f"from jaxdistill import models; from jaxdistill.data.tokenizer import load_tokenizer\n"
            f"print(len(load_tokenizer({f32_files['qwen2']!r})), "
            f"models.load_pretrained({f32_files['llama3_rope_tied']!r}).config.rope.rope_type)")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == [str(VOCAB), "llama3"]


def test_gguf_model_exports_for_transformers(checkpoints, f32_files, tokenizer, tmp_path):
  """The point of loading GGUF here: transformers cannot save a GGUF-loaded model; this export loads in it."""
  from transformers import AutoModelForCausalLM, AutoTokenizer

  path = f32_files["llama_gqa_untied"]
  loaded = models.load_pretrained(path)
  out_dir = models.save_pretrained(loaded.params, loaded.config, str(tmp_path / "export"), hf_config=loaded.hf_config,
                                   tokenizer=load_tokenizer(path))
  written = json.load(open(os.path.join(out_dir, "config.json")))
  assert written["architectures"] == ["LlamaForCausalLM"] and written["num_key_value_heads"] == 2
  exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
  ids_BxL, mask_BxL = padded_batch("left")
  real = mask_BxL.astype(bool)
  expected = _torch_logits(checkpoints["llama_gqa_untied"][1], ids_BxL, mask_BxL)
  assert np.abs(_torch_logits(exported, ids_BxL, mask_BxL) - expected)[real].max() < 1e-4
  assert AutoTokenizer.from_pretrained(out_dir)(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


def test_build_takes_gguf_student_and_teacher(f32_files, checkpoints):
  from jaxdistill import config as config_lib
  from jaxdistill.training.build import build_model, build_teacher_tokenizer, build_tokenizer

  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "tokenizer": "", "student.name_or_path": f32_files["qwen3"],
      "teacher.name_or_path": f32_files["llama3_rope_tied"], "stages.teacher_steps": 0}))
  tokenizer = build_tokenizer(cfg)
  assert len(tokenizer) == VOCAB and tokenizer.eos_token == END_OF_TEXT
  assert build_teacher_tokenizer(cfg, tokenizer) is None  # both files hold the same vocabulary
  student = build_model(cfg.student, len(tokenizer), jax.random.key(0), "student")
  teacher = build_model(cfg.teacher, len(tokenizer), jax.random.key(1), "teacher")
  assert student.config == models.load_pretrained(checkpoints["qwen3"][0]).config
  assert teacher.config.rope.rope_type == "llama3" and teacher.config.tie_word_embeddings
  missing = dataclasses.replace(cfg.student, name_or_path="/no/such/student.gguf")
  with pytest.raises(ModelLoadError, match=r"^student.name_or_path: GGUF file '/no/such/student.gguf' does not exist$"):
    build_model(missing, VOCAB, jax.random.key(0), "student")


# ---------------------------------------------------------------------------------------------
# Names and errors.

def test_gguf_names_are_case_insensitive_and_expand_home(f32_files, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  os.symlink(f32_files["qwen3"], tmp_path / "Model.GGUF")
  assert models.load_pretrained("~/Model.GGUF", revision="no-such-revision").path == str(tmp_path / "Model.GGUF")
  assert len(load_tokenizer("~/Model.GGUF")) == VOCAB


def test_missing_and_foreign_files(tmp_path):
  for load in (models.load_pretrained, load_tokenizer):
    with pytest.raises(ModelLoadError, match=r"^GGUF file '/no/such/model.gguf' does not exist$"):
      load("/no/such/model.gguf")
  os.mkdir(tmp_path / "dir.gguf")
  with pytest.raises(ModelLoadError, match=rf"^'{tmp_path}/dir.gguf' is a directory, not a GGUF file$"):
    models.load_pretrained(str(tmp_path / "dir.gguf"))
  (tmp_path / "model.gguf").write_text("{}")
  with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/model.gguf: not a GGUF file \(it does not start with the "
                                           r"bytes 'GGUF'\)$"):
    models.load_pretrained(str(tmp_path / "model.gguf"))
  (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
  with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/cut.gguf: unreadable GGUF file \("):
    models.load_pretrained(str(tmp_path / "cut.gguf"))


def test_unsupported_architecture(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ModelLoadError, match=rf"^{tmp_path}/mamba.gguf: GGUF architecture 'mamba' is not supported; "
                                           r"supported: llama, qwen2, qwen3, qwen3moe$"):
    models.load_pretrained(str(tmp_path / "mamba.gguf"))


def test_llama_with_experts_is_refused(checkpoints, tokenizer, tmp_path):
  """llama.cpp writes Mixtral as general.architecture 'llama' with experts."""
  path = write_gguf(tmp_path / "mixtral.gguf", checkpoints["qwen3_moe"][0], tokenizer, "qwen3moe", architecture="llama")
  with pytest.raises(ModelLoadError, match=rf"^{path}: a llama GGUF with 4 experts \(Mixtral\) is not supported; the "
                                           r"supported mixture-of-experts architecture is qwen3moe$"):
    models.load_pretrained(path)


def test_unsupported_tensor_type(checkpoints, tokenizer, tmp_path):
  raw = {"blk.1.ffn_down.weight": (random_blocks("IQ2_XXS", 64, 256, seed=0), Q.IQ2_XXS)}
  path = write_gguf(tmp_path / "iq.gguf", checkpoints["llama_gqa_untied"][0], tokenizer, "llama", raw=raw)
  with pytest.raises(ModelLoadError, match=rf"^{path}: tensor 'blk.1.ffn_down.weight' is stored as IQ2_XXS, which is "
                                           r"not supported; supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                                           r"Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K$"):
    models.load_pretrained(path)
  assert len(load_tokenizer(path)) == VOCAB  # its tokenizer is still usable
