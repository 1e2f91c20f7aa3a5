"""Tensor-name mapping between transformers state dicts and the Flax params pytree.

A rule ties one transformers tensor to one or more Flax leaves. PyTorch `nn.Linear` stores
[out, in] and is transposed; GPT-2's `Conv1D` already stores [in, out]; GPT-2's fused
`c_attn` is split evenly into the q, k and v kernels (and joined again on export).
"""

import dataclasses

import numpy as np

from jaxdistill.errors import ModelLoadError
from jaxdistill.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str
  flax_paths: tuple[Path, ...]
  transpose: bool = False
  split_axis: int = -1  # axis of the (transposed) tensor split across `flax_paths`


def _linear(hf_prefix: str, flax_path: Path, bias: bool) -> list[Rule]:
  rules = [Rule(f"{hf_prefix}.weight", (flax_path + ("kernel",),), transpose=True)]
  if bias:
    rules.append(Rule(f"{hf_prefix}.bias", (flax_path + ("bias",),)))
  return rules


def _norm(hf_prefix: str, flax_path: Path, with_bias: bool) -> list[Rule]:
  rules = [Rule(f"{hf_prefix}.weight", (flax_path + ("scale",),))]
  if with_bias:
    rules.append(Rule(f"{hf_prefix}.bias", (flax_path + ("bias",),)))
  return rules


def _llama_like_rules(cfg: ModelConfig) -> list[Rule]:
  rules = [Rule("model.embed_tokens.weight", (("embed", "embedding"),))]
  for i in range(cfg.num_layers):
    hf, fx = f"model.layers.{i}", (f"layers_{i}",)
    rules += _norm(f"{hf}.input_layernorm", fx + ("attn_norm",), False)
    rules += _norm(f"{hf}.post_attention_layernorm", fx + ("mlp_norm",), False)
    for name in ("q", "k", "v"):
      rules += _linear(f"{hf}.self_attn.{name}_proj", fx + ("attn", name), cfg.qkv_bias)
    rules += _linear(f"{hf}.self_attn.o_proj", fx + ("attn", "o"), cfg.o_bias)
    if cfg.qk_norm:
      rules += _norm(f"{hf}.self_attn.q_norm", fx + ("attn", "q_norm"), False)
      rules += _norm(f"{hf}.self_attn.k_norm", fx + ("attn", "k_norm"), False)
    for name in ("gate", "up", "down"):
      rules += _linear(f"{hf}.mlp.{name}_proj", fx + ("mlp", name), cfg.mlp_bias)
  rules += _norm("model.norm", ("final_norm",), False)
  if not cfg.tie_word_embeddings:
    rules += _linear("lm_head", ("lm_head",), False)
  return rules


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
  rules = [Rule("transformer.wte.weight", (("embed", "embedding"),)),
           Rule("transformer.wpe.weight", (("pos_embed", "embedding"),))]
  for i in range(cfg.num_layers):
    hf, fx = f"transformer.h.{i}", (f"layers_{i}",)
    qkv = tuple(fx + ("attn", name) for name in ("q", "k", "v"))
    rules += [Rule(f"{hf}.attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), split_axis=1),
              Rule(f"{hf}.attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), split_axis=0)]
    for hf_name, flax_path in (("attn.c_proj", ("attn", "o")), ("mlp.c_fc", ("mlp", "fc")),
                               ("mlp.c_proj", ("mlp", "proj"))):
      rules += [Rule(f"{hf}.{hf_name}.weight", (fx + flax_path + ("kernel",),)),
                Rule(f"{hf}.{hf_name}.bias", (fx + flax_path + ("bias",),))]
    rules += _norm(f"{hf}.ln_1", fx + ("attn_norm",), True)
    rules += _norm(f"{hf}.ln_2", fx + ("mlp_norm",), True)
  rules += _norm("transformer.ln_f", ("final_norm",), True)
  if not cfg.tie_word_embeddings:
    rules += _linear("lm_head", ("lm_head",), False)
  return rules


def rules_for(cfg: ModelConfig) -> list[Rule]:
  return _gpt2_rules(cfg) if cfg.family == "gpt2" else _llama_like_rules(cfg)


def _is_ignorable(name: str, cfg: ModelConfig) -> bool:
  """Tensors checkpoints carry that are not weights (buffers) or that tying makes redundant."""
  if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
    return True
  return cfg.tie_word_embeddings and name == "lm_head.weight"


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def hf_to_flax(state: dict[str, np.ndarray], cfg: ModelConfig, expected, where: str) -> dict:
  """Builds the params pytree from a transformers state dict (numpy arrays, any float dtype).

  `expected` is the pytree of `ShapeDtypeStruct`s the model wants; every shape is checked and
  the arrays are cast to `cfg.param_dtype`. Raises ModelLoadError on missing, unexpected or
  mis-shaped tensors, naming them.
  """
  rules = rules_for(cfg)
  missing = [r.hf_name for r in rules if r.hf_name not in state]
  if missing:
    raise ModelLoadError(
        f"{where}: checkpoint lacks {len(missing)} tensor(s) the {cfg.family} config needs, e.g. "
        f"{', '.join(missing[:3])}")
  known = {r.hf_name for r in rules}
  unexpected = sorted(n for n in state if n not in known and not _is_ignorable(n, cfg))
  if unexpected:
    raise ModelLoadError(
        f"{where}: checkpoint has {len(unexpected)} tensor(s) this {cfg.family} config does not use, "
        f"e.g. {', '.join(unexpected[:3])}: config.json and weights disagree")
  params: dict = {}
  for rule in rules:
    array = np.asarray(state[rule.hf_name])
    if rule.transpose:
      array = array.T
    parts = np.split(array, len(rule.flax_paths), axis=rule.split_axis) if len(rule.flax_paths) > 1 else [array]
    for path, part in zip(rule.flax_paths, parts):
      want = _get(expected, path)
      if tuple(part.shape) != tuple(want.shape):
        shown = tuple(array.T.shape) if rule.transpose else tuple(array.shape)
        raise ModelLoadError(
            f"{where}: tensor '{rule.hf_name}' has shape {shown}, but config.json implies a shape "
            f"that gives {tuple(want.shape)} for {'/'.join(path)}")
      _set(params, path, part.astype(want.dtype))
  return params


def flax_to_hf(params, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """The transformers state dict of `params` (numpy, contiguous), optionally cast to `dtype`."""
  state = {}
  for rule in rules_for(cfg):
    parts = [np.asarray(_get(params, p)) for p in rule.flax_paths]
    array = np.concatenate(parts, axis=rule.split_axis) if len(parts) > 1 else parts[0]
    if rule.transpose:
      array = array.T
    if dtype is not None:
      array = array.astype(dtype)
    state[rule.hf_name] = np.ascontiguousarray(array)
  return state
