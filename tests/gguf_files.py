"""Tiny GGUF files for the tests: a small HF -> GGUF converter after llama.cpp's convert_hf_to_gguf.py.

`write_gguf` writes a transformers checkpoint as llama.cpp would (gguf-py's name map, llama.cpp's q/k row
permutation for Llama, its `rope_freqs` for Llama 3.1 scaling, a byte-level BPE's `tokenizer.ggml.*` keys).
tests/test_gguf.py checks it against transformers' own GGUF reader; tests/test_readme.py uses it for the
README's GGUF teacher.
"""

import json
import math
import os

import gguf
import numpy as np

from jaxdistill.models import hf_io

Q = gguf.GGMLQuantizationType
END_OF_TEXT = "<|endoftext|>"
CORPUS = ["The quick brown fox jumps over the lazy dog, then the dog sleeps.",
          "def add(x, y):\n    return x + y  # 12 + 34 = 46",
          "Distillation trains a small student on a large teacher's outputs.",
          "Über naïve café owners: 3.14159 and 2,718 are numbers."] * 3
TEXTS = ["The lazy fox returns 1234 naps.", "  def  café(x):\n\treturn 46<|endoftext|>", "ünïcödé 🙂 ok"]
VOCAB = 300  # the tokenizer's size and every model's vocabulary


def byte_level_bpe():
  """A Qwen2-style byte-level BPE of `VOCAB` tokens (Qwen2's split regex), `<|endoftext|>` id 0."""
  from tokenizers import Regex, Tokenizer, decoders
  from tokenizers import models as tok_models
  from tokenizers import pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

  tok = Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[END_OF_TEXT],
      show_progress=False))
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)
  assert len(wrapped) == VOCAB
  return wrapped


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py `LlamaModel.permute`: each head's two halves of rows become adjacent pairs."""
  return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama3_rope_freqs(scaling: dict, head_dim: int) -> np.ndarray:
  """convert_hf_to_gguf.py's `rope_freqs` of a llama3 rope scaling: the divisor of each rotary frequency."""
  old_context = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_context / scaling["low_freq_factor"], old_context / scaling["high_freq_factor"]
  divisors = []
  for freq in 1.0 / scaling["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      divisors.append(1.0)
    elif wavelen > low_wavelen:
      divisors.append(scaling["factor"])
    else:
      smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"]
                                                                      - scaling["low_freq_factor"])
      divisors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
  return np.asarray(divisors, np.float32)


def gguf_state(checkpoint_dir: str, arch: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors under GGUF names (gguf-py's map), experts stacked, Llama's q/k rows permuted."""
  hf = json.load(open(os.path.join(checkpoint_dir, "config.json")))
  name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                      hf["num_hidden_layers"])
  state = {k: v.astype(np.float32) for k, v in hf_io.read_state_dict(checkpoint_dir).items()}
  experts = sorted(k for k in state if ".experts." in k)
  for name in {k.split(".experts.")[0] + ".experts." + k.rsplit(".", 2)[1] + ".weight" for k in experts}:
    layer, projection = name.split(".experts.")[0], name.rsplit(".", 2)[1]
    state[name] = np.stack([state.pop(f"{layer}.experts.{e}.{projection}.weight")
                            for e in range(hf["num_local_experts"])])
  out = {}
  for name, array in state.items():
    if arch == "llama" and ".self_attn.q_proj." in name:
      array = llama_cpp_permute(array, hf["num_attention_heads"])
    elif arch == "llama" and ".self_attn.k_proj." in name:
      array = llama_cpp_permute(array, hf["num_key_value_heads"])
    out[name_map.get_name(name, try_suffixes=(".weight", ".bias"))] = array
  if hf["rope_parameters"]["rope_type"] == "llama3":
    out["rope_freqs.weight"] = llama3_rope_freqs(hf["rope_parameters"], _head_dim(hf))
  return out


def _head_dim(hf: dict) -> int:
  return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer) -> None:
  """`tokenizer.ggml.*` of a byte-level BPE, as llama.cpp writes them (model gpt2, pre qwen2)."""
  model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("qwen2")
  writer.add_token_list(tokens)
  writer.add_token_types([gguf.TokenType.CONTROL if t == END_OF_TEXT else gguf.TokenType.NORMAL for t in tokens])
  writer.add_token_merges([" ".join(merge) for merge in model["merges"]])
  writer.add_bos_token_id(tokenizer.bos_token_id)
  writer.add_eos_token_id(tokenizer.eos_token_id)


def write_gguf(path, checkpoint_dir: str, tokenizer, arch: str, tensor_type: str = "F32", raw=None,
               architecture: str | None = None) -> str:
  """The checkpoint as llama.cpp would write it: matrices in `tensor_type`, norms and biases F32.

  `raw`: GGUF name -> (bytes, type) stored instead of the checkpoint's tensor; `architecture`: the
  `general.architecture` written (default `arch`).
  """
  hf = json.load(open(os.path.join(checkpoint_dir, "config.json")))
  writer = gguf.GGUFWriter(str(path), architecture or arch)
  writer.add_context_length(hf["max_position_embeddings"])
  writer.add_embedding_length(hf["hidden_size"])
  writer.add_block_count(hf["num_hidden_layers"])
  writer.add_feed_forward_length(hf["intermediate_size"])
  writer.add_head_count(hf["num_attention_heads"])
  writer.add_head_count_kv(hf["num_key_value_heads"])
  head_dim = _head_dim(hf)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_dimension_count(head_dim)
  writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
  writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  if "num_local_experts" in hf:
    writer.add_expert_count(hf["num_local_experts"])
    writer.add_expert_used_count(hf["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
  tokenizer_metadata(writer, tokenizer)
  for name, array in gguf_state(checkpoint_dir, arch).items():
    if raw and name in raw:
      data, qtype = raw[name]
      writer.add_tensor(name, data, raw_dtype=qtype)
    elif array.ndim == 1 or tensor_type == "F32":
      writer.add_tensor(name, array)
    elif tensor_type == "F16":
      writer.add_tensor(name, array.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(array, Q[tensor_type]), raw_dtype=Q[tensor_type])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)
