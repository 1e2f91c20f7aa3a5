"""Tensor-name mapping between transformers state dicts and the Flax params pytree.

Each family names its tensors (`Family.weight_rules`, models/families/); this module applies the rules.
A rule ties one transformers tensor (or one per expert, stacked) to one or more Flax leaves.
PyTorch `nn.Linear` stores [out, in] and is transposed; GPT-2's `Conv1D` already stores [in, out];
GPT-2's fused `c_attn` and Phi-3's fused `qkv_proj` are split into the q, k and v kernels at the widths
the model expects (uneven under GQA), Phi-3's `gate_up_proj` into gate and up; export joins them again.

The Flax params stack each kind of block on a leading layer axis (`ModelConfig.stacks`); the rules
name one block at a time (`layers_{i}`), and `unstack_layers` / `stack_layers` convert between the two.

MoE experts live in one Flax kernel per projection with a leading expert axis, [E, in, out].
Checkpoints store them in one of two layouts, both read:
- per expert, as on the hub and as transformers' `save_pretrained` writes them (and as exported):
  Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral
  `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`, stacked on load and unstacked on export;
- fused, as transformers >= 5 holds them in memory (`model.state_dict()`):
  `mlp.experts.gate_up_proj` [E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I].
"""

import jax
import numpy as np

from jaxdistill.errors import ModelLoadError
from jaxdistill.models import families
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.families.base import Path, Rule


def rules_for(cfg: ModelConfig, fused_experts: bool = False) -> list[Rule]:
  """The rules of `cfg`'s checkpoint (its family's); `fused_experts` picks the in-memory MoE layout (above)."""
  return families.get(cfg.family, "ModelConfig").weight_rules(cfg, fused_experts)


def has_fused_experts(state: dict) -> bool:
  """Whether a state dict stores MoE experts fused ([E, ...] tensors) rather than one tensor per expert."""
  return any(name.endswith((".experts.gate_up_proj", ".experts.down_proj")) for name in state)


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


def _layer_of(leaf, index: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[index]


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """The params with each stack split into one subtree per block, `layers_{i}` (arrays or ShapeDtypeStructs)."""
  out = {k: v for k, v in params.items() if k not in cfg.stacks}
  for stack, layers in cfg.stacks.items():
    for index, layer in enumerate(layers):
      out[f"layers_{layer}"] = jax.tree.map(lambda leaf, index=index: _layer_of(leaf, index), params[stack])
  return out


def stack_layers(per_layer: dict, cfg: ModelConfig) -> dict:
  """The inverse of `unstack_layers`: each stack's blocks stacked on a new leading axis (numpy)."""
  out = {k: v for k, v in per_layer.items() if not k.startswith("layers_")}
  for stack, layers in cfg.stacks.items():
    out[stack] = jax.tree.map(lambda *blocks: np.stack(blocks), *[per_layer[f"layers_{i}"] for i in layers])
  return out


def hf_to_flax(state: dict[str, np.ndarray], cfg: ModelConfig, expected, where: str) -> dict:
  """Builds the (stacked) params pytree from a transformers state dict (numpy arrays, any float dtype).

  `expected` is the pytree of `ShapeDtypeStruct`s the model wants; every shape is checked and
  the arrays are cast to `cfg.param_dtype`. Raises ModelLoadError on missing, unexpected or
  mis-shaped tensors, naming them.
  """
  expected = unstack_layers(expected, cfg)
  rules = rules_for(cfg, fused_experts=has_fused_experts(state))
  missing = [n for r in rules for n in r.hf_names if n not in state]
  if missing:
    raise ModelLoadError(
        f"{where}: checkpoint lacks {len(missing)} tensor(s) the {cfg.family} config needs, e.g. "
        f"{', '.join(missing[:3])}")
  known = {n for r in rules for n in r.hf_names}
  unexpected = sorted(n for n in state if n not in known and not _is_ignorable(n, cfg))
  if unexpected:
    raise ModelLoadError(
        f"{where}: checkpoint has {len(unexpected)} tensor(s) this {cfg.family} config does not use, "
        f"e.g. {', '.join(unexpected[:3])}: config.json and weights disagree")
  params: dict = {}
  for rule in rules:
    tensors = [np.asarray(state[n]) for n in rule.hf_names]
    if len({t.shape for t in tensors}) > 1:
      raise ModelLoadError(f"{where}: the {rule.stack} tensors '{rule.hf_name}' differ in shape")
    array = np.stack(tensors) if rule.stack else tensors[0]
    if rule.transpose:
      array = np.swapaxes(array, -1, -2)
    widths = [_get(expected, path).shape[rule.split_axis] for path in rule.flax_paths]
    parts = np.split(array, np.cumsum(widths)[:-1], axis=rule.split_axis) if len(widths) > 1 else [array]
    for path, part in zip(rule.flax_paths, parts):
      want = _get(expected, path)
      if tuple(part.shape) != tuple(want.shape):
        raise ModelLoadError(
            f"{where}: tensor '{rule.hf_names[0]}' has shape {tuple(tensors[0].shape)}, but config.json "
            f"implies a shape that gives {tuple(want.shape)} for {'/'.join(path)}")
      _set(params, path, part.astype(want.dtype))
  return stack_layers(params, cfg)


def flax_to_hf(params, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """The transformers state dict of `params` (numpy, contiguous, per-expert MoE layout), optionally cast."""
  state = {}
  params = unstack_layers(params, cfg)
  for rule in rules_for(cfg):
    parts = [np.asarray(_get(params, p)) for p in rule.flax_paths]
    array = np.concatenate(parts, axis=rule.split_axis) if len(parts) > 1 else parts[0]
    if rule.transpose:
      array = np.swapaxes(array, -1, -2)
    if dtype is not None:
      array = array.astype(dtype)
    tensors = list(array) if rule.stack else [array]
    for name, tensor in zip(rule.hf_names, tensors):
      state[name] = np.ascontiguousarray(tensor)
  return state
