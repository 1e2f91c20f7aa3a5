"""llama.cpp GGUF files in: a model's config, weights and tokenizer, in transformers' terms.

A `.gguf` file holds what a Hugging Face checkpoint directory holds, under llama.cpp's names: the config as
`{arch}.*` metadata, the tokenizer as `tokenizer.ggml.*` metadata and the weights as tensors `token_embd`,
`blk.N.attn_q`, ..., most often quantised. `open_gguf` reads a file's metadata into a transformers `config.json`
dict; `GgufFile.state_dict` dequantises its tensors (with the `gguf` package) into a state dict under
transformers' tensor names, so `hf_io` loads it like any checkpoint and exports it as safetensors;
`gguf_tokenizer` builds its tokenizer without torch.

Three llama.cpp conventions are undone here:
  * GGUF lists a tensor's dimensions fastest first; `gguf.GGUFReader` reverses them, so a linear weight reads
    [out, in] as in PyTorch.
  * llama.cpp's converter permutes the rows of Llama's q and k projections (its rotary embedding rotates
    adjacent pairs, transformers' rotates the two halves of a head); `_unpermute_rows` puts them back. Qwen2 and
    Qwen3 files rotate halves already and are left alone.
  * Llama 3.1 rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors rather than metadata;
    `_llama3_rope_scaling` recovers transformers' `llama3` rope_scaling from it.
"""

import dataclasses
import math
import os
import re
from typing import Any

import numpy as np

from jaxdistill.errors import ModelLoadError, first_line

# GGUF `general.architecture` -> transformers' model_type (a family of models/families/).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
# The ggml tensor types read: the float ones, the legacy block quants and the k-quants (all of llama.cpp's
# Q*_K_M / Q*_K_S / Q8_0 / F16 mixes). The i-quants (IQ*) and ternary types are left out.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K")
_MAGIC = b"GGUF"

# GGUF tensor names -> transformers' (the Llama block of models/families/llama_like.py).
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
}
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}  # [E, ...]
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling: read into the config, not a weight
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# tokenizer.ggml.* -> the keys of transformers' GGUF tokenizer dict (`convert_gguf_tokenizer`).
_TOKENIZER_KEYS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
                   "token_type": "token_type", "merges": "merges", "bos_token_id": "bos_token_id",
                   "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
                   "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


@dataclasses.dataclass
class GgufFile:
  """An open GGUF file of a supported architecture; tensors are read only by `state_dict`."""
  path: str
  architecture: str           # GGUF's `general.architecture`
  hf_config: dict[str, Any]   # transformers' config.json for it
  reader: Any                 # gguf.GGUFReader (a memory map of the file)

  def state_dict(self, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every weight dequantised to `dtype` (one tensor at a time), under transformers' names, unpermuted.

    Linear weights are [out, in]; a MoE layer's experts (one [E, out, in] tensor in GGUF) come one per expert.
    """
    permuted_heads = {}  # llama.cpp permutes Llama's q and k rows, per head
    if self.architecture == "llama":
      permuted_heads = {"attn_q": self.hf_config["num_attention_heads"],
                        "attn_k": self.hf_config["num_key_value_heads"]}
    state = {}
    for tensor in self.reader.tensors:
      if tensor.name == _ROPE_FREQS:
        continue
      array = _dequantize(tensor, self.path).astype(dtype)
      block = _BLOCK_NAME.fullmatch(tensor.name)
      if block and block[2] in _EXPERT_TENSORS:
        layer, projection, kind = block[1], _EXPERT_TENSORS[block[2]], block[3]
        state.update({f"model.layers.{layer}.mlp.experts.{e}.{projection}.{kind}": array[e] for e in range(len(array))})
        continue
      if block and block[2] in permuted_heads:
        array = _unpermute_rows(array, permuted_heads[block[2]])
      state[_hf_name(tensor.name)] = array
    return state


def open_gguf(name_or_path: str) -> GgufFile:
  """Opens a GGUF file and reads its config; ModelLoadError for a missing, foreign or unsupported file.

  Checks the architecture and every tensor's name and type before any tensor is read.
  """
  path, reader = _open_reader(name_or_path)
  architecture = _value(reader, "general.architecture", None)
  if architecture not in ARCHITECTURES:
    raise ModelLoadError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
  _check_tensors(reader, path)
  return GgufFile(path=path, architecture=architecture, hf_config=_hf_config(reader, architecture, path),
                  reader=reader)


def _open_reader(name_or_path: str):
  """(the expanded path, a `gguf.GGUFReader` of it); ModelLoadError for a missing, foreign or split file."""
  import gguf

  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    raise ModelLoadError(f"'{name_or_path}' is a directory, not a GGUF file")
  if not os.path.isfile(path):
    raise ModelLoadError(f"GGUF file '{name_or_path}' does not exist")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # truncated or corrupt: gguf raises ValueError, IndexError, ...
    raise ModelLoadError(f"{path}: unreadable GGUF file ({type(e).__name__}: {first_line(e)})") from None
  splits = _value(reader, "split.count", 1)
  if splits > 1:
    raise ModelLoadError(f"{path}: one of {splits} parts of a split GGUF; merge them first with "
                         "`llama-gguf-split --merge FIRST_PART OUT.gguf`")
  return path, reader


def read_gguf(name_or_path: str, dtype=np.float32) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(transformers' config.json dict, state dict under transformers' names in `dtype`) of a GGUF file."""
  file = open_gguf(name_or_path)
  return file.hf_config, file.state_dict(dtype)


# ---------------------------------------------------------------------------------------------
# Metadata.

def _scalar(part: np.ndarray, kind) -> Any:
  """One metadata value; a float32 becomes its shortest decimal (1e-06, not 9.999999974752427e-07)."""
  import gguf

  if kind == gguf.GGUFValueType.STRING:
    return bytes(part).decode("utf-8")
  value = part.tolist()[0]
  return float(str(np.float32(value))) if kind == gguf.GGUFValueType.FLOAT32 else value


def _value(reader, key: str, default: Any) -> Any:
  """The metadata value under `key` (a list for an array), or `default` where the file has none."""
  import gguf

  field = reader.fields.get(key)
  if field is None:
    return default
  if field.types[0] == gguf.GGUFValueType.ARRAY:
    return [_scalar(field.parts[i], field.types[-1]) for i in field.data]
  return _scalar(field.parts[field.data[0]], field.types[0])


def _hf_config(reader, arch: str, path: str) -> dict[str, Any]:
  """transformers' config.json for the file's `{arch}.*` metadata and tensor names."""
  from jaxdistill.models import families

  def required(name: str):
    value = _value(reader, f"{arch}.{name}", None)
    if value is None:
      raise ModelLoadError(f"{path}: GGUF metadata has no '{arch}.{name}', which the {arch} architecture needs")
    return value

  names = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise ModelLoadError(f"{path}: no token_embd.weight tensor, which every {arch} model has")
  model_type = ARCHITECTURES[arch]
  hidden = required("embedding_length")
  heads = _one_per_model(required("attention.head_count"), "attention.head_count", path)
  kv_heads = _one_per_model(_value(reader, f"{arch}.attention.head_count_kv", heads), "attention.head_count_kv", path)
  head_dim = _value(reader, f"{arch}.attention.key_length", hidden // heads)
  value_dim = _value(reader, f"{arch}.attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ModelLoadError(f"{path}: attention.key_length {head_dim} != attention.value_length {value_dim}; only "
                         "equal key and value head sizes are supported")
  ffn = _value(reader, f"{arch}.feed_forward_length", None)
  if ffn is None:  # a MoE file whose every layer is sparse may leave the dense width out
    ffn = required("expert_feed_forward_length" if model_type == "qwen3_moe" else "feed_forward_length")
  theta = _value(reader, f"{arch}.rope.freq_base", 10000.0)
  hf = {
      "model_type": model_type,
      "architectures": [families.get(model_type, path).architecture],
      "vocab_size": int(names["token_embd.weight"].shape[-1]),  # GGUF dims run fastest first: (hidden, vocab)
      "hidden_size": hidden,
      "intermediate_size": _one_per_model(ffn, "feed_forward_length", path),
      "num_hidden_layers": required("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "max_position_embeddings": required("context_length"),
      "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
      "hidden_act": "silu",
      "rope_theta": theta,
      "rope_scaling": _rope_scaling(reader, arch, names, theta, head_dim, path),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "mlp_bias": "blk.0.ffn_up.bias" in names,
      "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id", None),
      "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id", None),
      "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id", None),
  }
  rotary = _value(reader, f"{arch}.rope.dimension_count", head_dim)
  if rotary != head_dim:  # the family refuses it by name
    hf["partial_rotary_factor"] = rotary / head_dim
  experts = _value(reader, f"{arch}.expert_count", 0)
  if experts and model_type != "qwen3_moe":  # llama.cpp writes Mixtral as a llama with experts
    raise ModelLoadError(f"{path}: a {arch} GGUF with {experts} experts (Mixtral) is not supported; the supported "
                         "mixture-of-experts architecture is qwen3moe")
  if model_type == "qwen3_moe":
    hf.update(num_experts=required("expert_count"), num_experts_per_tok=required("expert_used_count"),
              moe_intermediate_size=required("expert_feed_forward_length"),
              # llama.cpp's qwen3moe graph always renormalises the top-k weights
              norm_topk_prob=bool(_value(reader, f"{arch}.expert_weights_norm", True)),
              decoder_sparse_step=1, mlp_only_layers=[])
  return hf


def _one_per_model(value, name: str, path: str):
  """A size GGUF may give per layer (a list) as the one value transformers' config wants."""
  if not isinstance(value, list):
    return value
  if len(set(value)) != 1:
    raise ModelLoadError(f"{path}: {name} differs between layers ({sorted(set(value))}); only one value per "
                         "model is supported")
  return value[0]


def _rope_scaling(reader, arch: str, names: dict, theta: float, head_dim: int, path: str) -> dict | None:
  """transformers' rope_scaling of the file: its `rope.scaling.*` metadata, or Llama 3.1's `rope_freqs` tensor."""
  import gguf

  if _ROPE_FREQS in names:
    divisors = gguf.quants.dequantize(names[_ROPE_FREQS].data, names[_ROPE_FREQS].tensor_type).reshape(-1)
    return _llama3_rope_scaling(divisors, theta, head_dim, path)
  kind = _value(reader, f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  scaling = {"rope_type": kind, "factor": _value(reader, f"{arch}.rope.scaling.factor", 1.0)}
  original = _value(reader, f"{arch}.rope.scaling.original_context_length", None)
  if original is not None and kind != "linear":
    scaling["original_max_position_embeddings"] = original
  return scaling  # a type other than linear is refused by the family (config.rope_from_hf) with the supported ones


def _llama3_rope_scaling(divisors: np.ndarray, theta: float, head_dim: int, path: str) -> dict | None:
  """transformers' `llama3` rope_scaling whose per-frequency divisors are `divisors` (None if all are 1).

  llama.cpp divides frequency i by divisors[i]: 1 for short wavelengths, `factor` for long ones and a smooth
  ramp between (`rope.inverse_frequencies`). The ramp fixes low_freq_factor and high_freq_factor relative to
  original_max_position_embeddings only, so that is taken as 8192, as llama.cpp's converter does; the
  Llama 3.1 values (1, 4) are tried first, else the ramp is fitted, and the result must give `divisors` back.
  """
  if np.allclose(divisors, 1.0):
    return None
  factor, original = float(divisors.max()), 8192
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  candidates = [(1.0, 4.0)]
  ramp = (divisors > 1.0 + 1e-6) & (divisors < factor * (1 - 1e-6))
  if ramp.sum() >= 2:  # smooth = (original / wavelength - low) / (high - low): a line in 1 / wavelength
    smooth = (1.0 / divisors[ramp] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(original * inv_freq[ramp] / (2 * math.pi), smooth, 1)
    candidates.append((-intercept / slope, (1.0 - intercept) / slope))
  for low, high in candidates:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 6),
               "high_freq_factor": round(float(high), 6), "original_max_position_embeddings": original}
    if np.allclose(_llama3_divisors(scaling, theta, head_dim), divisors, rtol=1e-4):
      return scaling
  raise ModelLoadError(f"{path}: its {_ROPE_FREQS} (per-frequency rope factors) is not Llama 3.1's rope scaling; "
                       "other rope factors are not supported")


def _llama3_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
  """What llama.cpp's converter writes to `rope_freqs` for a `llama3` rope_scaling: plain over scaled frequencies."""
  from jaxdistill.models.config import RopeConfig
  from jaxdistill.models.rope import inverse_frequencies

  scaled = inverse_frequencies(RopeConfig(theta=theta, **scaling), head_dim)
  return inverse_frequencies(RopeConfig(theta=theta), head_dim) / scaled


# ---------------------------------------------------------------------------------------------
# Tensors.

def _hf_name(gguf_name: str) -> str:
  """transformers' name of a (non-expert) GGUF tensor; `_check_tensors` has ruled out unknown names."""
  stem, suffix = gguf_name.rsplit(".", 1)
  if stem in _MODEL_TENSORS:
    return f"{_MODEL_TENSORS[stem]}.{suffix}"
  match = _BLOCK_NAME.fullmatch(gguf_name)
  return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.{suffix}"


def _is_known(name: str) -> bool:
  if name == _ROPE_FREQS or name.rsplit(".", 1)[0] in _MODEL_TENSORS:
    return True
  match = _BLOCK_NAME.fullmatch(name)
  return bool(match) and (match[2] in _BLOCK_TENSORS or match[2] in _EXPERT_TENSORS)


def _check_tensors(reader, path: str) -> None:
  """ModelLoadError naming the first tensor of an unsupported type, or the tensors with no transformers name."""
  for tensor in reader.tensors:
    if tensor.tensor_type.name not in TENSOR_TYPES:
      raise ModelLoadError(f"{path}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which is not "
                           f"supported; supported types: {', '.join(TENSOR_TYPES)}")
  unknown = [t.name for t in reader.tensors if not _is_known(t.name)]
  if unknown:
    raise ModelLoadError(f"{path}: {len(unknown)} tensor(s) that no Llama/Qwen block has, e.g. "
                         f"{', '.join(unknown[:3])}")


def _dequantize(tensor, path: str) -> np.ndarray:
  """A tensor's values as float32 in numpy order ([out, in] for a linear weight)."""
  import gguf

  shape = tuple(reversed([int(d) for d in tensor.shape]))
  try:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:  # `TENSOR_TYPES` lists only what the gguf package dequantises
    raise ModelLoadError(f"{path}: tensor '{tensor.name}': this gguf package cannot dequantise "
                         f"{tensor.tensor_type.name}") from None
  return np.asarray(array, np.float32).reshape(shape)


def _unpermute_rows(projection: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's permutation of a Llama q or k projection's rows (a [heads * head_dim, in] weight or a bias).

  The converter regroups each head's rows (first half, second half) into adjacent pairs: row 2j of a head
  holds what was row j, row 2j + 1 what was row head_dim / 2 + j.
  """
  rows = projection.shape[0]
  per_head = projection.reshape(heads, rows // heads // 2, 2, *projection.shape[1:])
  return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(projection.shape))


# ---------------------------------------------------------------------------------------------
# Tokenizer.

def gguf_tokenizer(name_or_path: str):
  """The transformers tokenizer a GGUF file describes (`PreTrainedTokenizerFast`), built without torch.

  transformers' own `AutoTokenizer.from_pretrained(dir, gguf_file=...)` imports torch; this reads the
  `tokenizer.ggml.*` metadata with the gguf package and hands it to the same converter.
  """
  from transformers import PreTrainedTokenizerFast

  path, reader = _open_reader(name_or_path)  # any architecture: the converter knows which it can build
  tokenizer_dict = {name: _value(reader, f"tokenizer.ggml.{key}", None) for key, name in _TOKENIZER_KEYS.items()}
  tokenizer_dict = {name: value for name, value in tokenizer_dict.items() if value is not None}
  if "tokens" not in tokenizer_dict:
    raise ModelLoadError(f"{path}: the file holds no tokenizer (no tokenizer.ggml.tokens); name one with the "
                         "`tokenizer` config field")
  special_ids = {name: _value(reader, f"tokenizer.ggml.{key}", None) for name, key in _SPECIAL_TOKENS.items()}
  kwargs = {name: tokenizer_dict["tokens"][i] for name, i in special_ids.items() if i is not None}
  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise (as transformers' reader does)
  kwargs["add_bos_token"] = _value(reader, "tokenizer.ggml.add_bos_token",
                                   tokenizer_dict.get("tokenizer_type") == "llama")
  kwargs["add_eos_token"] = _value(reader, "tokenizer.ggml.add_eos_token", False)
  chat_template = _value(reader, "tokenizer.chat_template", None)
  if chat_template is not None:
    kwargs["chat_template"] = chat_template
  try:
    backend, extra = _tokenizer_converter()(_value(reader, "general.architecture", ""), tokenizer_dict)
  except Exception as e:  # an unknown tokenizer.ggml.model, or a transformers version without this converter
    raise ModelLoadError(f"{path}: transformers cannot build its tokenizer (tokenizer.ggml.model="
                         f"{tokenizer_dict.get('tokenizer_type')!r}; {type(e).__name__}: {first_line(e)})") from None
  return PreTrainedTokenizerFast(tokenizer_object=backend, **{**kwargs, **extra})


def _tokenizer_converter():
  """transformers' `convert_gguf_tokenizer(architecture, tokenizer_dict) -> (tokenizers.Tokenizer, kwargs)`."""
  try:
    from transformers.integrations.gguf import convert_gguf_tokenizer  # transformers >= 5
  except ImportError:
    from transformers.integrations.ggml import convert_gguf_tokenizer  # transformers 4
  return convert_gguf_tokenizer
