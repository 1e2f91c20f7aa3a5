"""Loading Hugging Face checkpoints into Flax params, and exporting Flax params as one.

A checkpoint is a directory with `config.json` and safetensors weights (`model.safetensors`, or
shards listed by `model.safetensors.index.json`). A name that is not a local directory is a hub id
('name' or 'owner/name'), fetched through the Hugging Face cache; any other name is a missing local path.
A name ending in `.gguf` is a llama.cpp file instead, read by `gguf_io` (and exported as safetensors).
"""

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxdistill.errors import ModelLoadError
from jaxdistill.models import config as config_lib
from jaxdistill.models import gguf_io, transformer, weights
from jaxdistill.paths import is_gguf, looks_like_local_path, missing_local_path

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_NAME, "generation_config.json", "tokenizer*",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "chat_template*"]


@dataclasses.dataclass
class Pretrained:
  """A loaded checkpoint: its architecture, its params and the raw `config.json` it came from."""
  config: config_lib.ModelConfig
  params: Any
  hf_config: dict[str, Any]
  path: str


def resolve(name_or_path: str, revision: str = "main", local_files_only: bool = False) -> str:
  """A local directory for `name_or_path`: the directory itself, or the hub snapshot in the HF cache.

  `local_files_only`: the cache alone, never the network (as under HF_HUB_OFFLINE=1).
  """
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise ModelLoadError(f"'{name_or_path}' is a file, not a directory")
  if looks_like_local_path(name_or_path):
    raise ModelLoadError(missing_local_path(name_or_path))
  from huggingface_hub import snapshot_download  # a transformers dependency
  try:
    return snapshot_download(repo_id=name_or_path, revision=revision, allow_patterns=_HUB_PATTERNS,
                             local_files_only=local_files_only)
  except Exception as e:  # offline, unknown repo, gated repo, bad revision: all end the same way
    raise ModelLoadError(
        f"could not get '{name_or_path}' (revision {revision}) from the Hugging Face hub or its cache "
        f"({type(e).__name__}). Offline, download it on a connected machine with "
        f"`hf download {name_or_path} --local-dir DIR`, copy DIR here and set name_or_path=DIR") from None


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise ModelLoadError(f"{path}: no config.json; a checkpoint directory needs config.json and safetensors weights")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"{file}: unreadable ({e})") from None


def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, s) for s in shards]
    absent = [s for s, f in zip(shards, files) if not os.path.isfile(f)]
    if absent:
      raise ModelLoadError(f"{path}: {INDEX_NAME} lists shard(s) that are missing: {', '.join(absent)}")
    return files
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))]
  hint = (f" It has {', '.join(sorted(other))}: re-save it with `save_pretrained(DIR, safe_serialization=True)`"
          if other else "")
  raise ModelLoadError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}.{hint}")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as numpy arrays (bf16 via ml_dtypes)."""
  state = {}
  for file in _weight_files(path):
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          state[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
      raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from None
  return state


def load_pretrained(name_or_path: str, revision: str = "main", param_dtype: str = "float32",
                    dtype: str = "float32") -> Pretrained:
  """Reads a checkpoint into a Flax params pytree (numpy leaves in `param_dtype`).

  `name_or_path` ending in `.gguf` is a llama.cpp file (`gguf_io`); `revision` applies to hub ids only.
  """
  if is_gguf(name_or_path):
    return _load_gguf(name_or_path, param_dtype, dtype)
  path = resolve(name_or_path, revision)
  hf_config = read_config(path)
  cfg = config_lib.from_hf_config(hf_config, where=path).with_dtypes(param_dtype, dtype)
  params = weights.hf_to_flax(read_state_dict(path), cfg, transformer.param_shapes(cfg), where=path)
  return Pretrained(config=cfg, params=params, hf_config=hf_config, path=path)


def _load_gguf(name_or_path: str, param_dtype: str, dtype: str) -> Pretrained:
  """`load_pretrained` of a GGUF file: dequantised straight to `param_dtype` (half float32's memory in bf16)."""
  file = gguf_io.open_gguf(name_or_path)
  cfg = config_lib.from_hf_config(file.hf_config, where=file.path).with_dtypes(param_dtype, dtype)
  state = file.state_dict(dtype=getattr(jax.numpy, cfg.param_dtype))
  params = weights.hf_to_flax(state, cfg, transformer.param_shapes(cfg), where=file.path)
  return Pretrained(config=cfg, params=params, hf_config=file.hf_config, path=file.path)


def _default_file_mode() -> int:
  """The mode `open()` gives a new file under the process's umask (0644 under the usual 022)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def save_pretrained(params, cfg: config_lib.ModelConfig, out_dir: str, *, hf_config: dict | None = None,
                    tokenizer=None, dtype: str = "float32") -> str:
  """Writes `out_dir/{config.json, model.safetensors}` (and the tokenizer's files) for transformers.

  Args:
    params: the params pytree of `CausalLM(cfg)` (device or host arrays).
    cfg: its architecture.
    out_dir: created if needed; existing files of the same names are replaced.
    hf_config: the `config.json` the model was loaded from; its other fields are kept.
    tokenizer: a transformers tokenizer to save beside the weights; its special token ids go into
      config.json.
    dtype: storage dtype of the written weights, one of float32, bfloat16, float16.
  """
  if dtype not in config_lib.DTYPES:
    raise ModelLoadError(f"export dtype {dtype!r} is not one of {', '.join(config_lib.DTYPES)}")
  if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
    raise ModelLoadError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only "
                         f"{cfg.vocab_size}: they do not belong together")
  params = jax.device_get(params)
  if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
    raise ModelLoadError(f"not exporting to {out_dir}: the weights hold non-finite values (a diverged run); "
                         "nothing was written")
  os.makedirs(out_dir, exist_ok=True)
  np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}[dtype]
  state = weights.flax_to_hf(params, cfg, dtype=np_dtype)
  weights_file = os.path.join(out_dir, WEIGHTS_NAME)
  save_file(state, weights_file, metadata={"format": "pt"})
  os.chmod(weights_file, _default_file_mode())  # safetensors writes 0600; transformers' files follow the umask
  base = dict(hf_config or {})
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the tokenizer shipped with it decides
      value = getattr(tokenizer, key, None)
      if value is not None:
        base[key] = value
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_lib.to_hf_config(cfg, base, torch_dtype=dtype), f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
