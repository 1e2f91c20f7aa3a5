"""What a model family is: the one place that knows a transformers `model_type`.

A `Family` maps its `config.json` to and from `ModelConfig`, builds a random architecture from the config
file's `arch` group with the defaults transformers gives that family, refuses arch values the family cannot
take, and names its checkpoint tensors. The shared transformer never asks which family it runs: it reads
capabilities off `ModelConfig` (`qk_norm`, `sliding_window`, `num_experts`...).
"""

import dataclasses
from typing import Any, Callable, Mapping

from jaxdistill.errors import ConfigError
from jaxdistill.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """Ties one transformers tensor (or one per expert, stacked) to one or more Flax leaves (models/weights.py)."""
  hf_name: str          # with `stack`: a pattern whose '{e}' is the expert index
  flax_paths: tuple[Path, ...]
  transpose: bool = False  # swap the last two axes (PyTorch [out, in] -> Flax [in, out])
  split_axis: int = -1  # axis of the (transposed) tensor split across `flax_paths`, at their expected widths
  stack: int = 0        # > 0: this many tensors `hf_name.format(e=...)`, stacked on a new axis 0

  @property
  def hf_names(self) -> tuple[str, ...]:
    if not self.stack:
      return (self.hf_name,)
    return tuple(self.hf_name.format(e=e) for e in range(self.stack))


def linear(hf_prefix: str, flax_path: Path, bias: bool) -> list[Rule]:
  """A PyTorch `nn.Linear` ([out, in], transposed) and its optional bias."""
  rules = [Rule(f"{hf_prefix}.weight", (flax_path + ("kernel",),), transpose=True)]
  if bias:
    rules.append(Rule(f"{hf_prefix}.bias", (flax_path + ("bias",),)))
  return rules


def norm(hf_prefix: str, flax_path: Path, with_bias: bool) -> list[Rule]:
  rules = [Rule(f"{hf_prefix}.weight", (flax_path + ("scale",),))]
  if with_bias:
    rules.append(Rule(f"{hf_prefix}.bias", (flax_path + ("bias",),)))
  return rules


def attention_rules(hf_layer: str, flax_layer: Path, cfg: ModelConfig) -> list[Rule]:
  """A Llama-style attention's q/k/v/o projections (`self_attn.*_proj`) and, with `cfg.qk_norm`, its q/k norms."""
  rules = []
  for name in ("q", "k", "v"):
    rules += linear(f"{hf_layer}.self_attn.{name}_proj", flax_layer + ("attn", name), cfg.qkv_bias)
  rules += linear(f"{hf_layer}.self_attn.o_proj", flax_layer + ("attn", "o"), cfg.o_bias)
  if cfg.qk_norm:
    rules += norm(f"{hf_layer}.self_attn.q_norm", flax_layer + ("attn", "q_norm"), False)
    rules += norm(f"{hf_layer}.self_attn.k_norm", flax_layer + ("attn", "k_norm"), False)
  return rules


def check(ok: bool, where: str, field: str, value, allowed: str) -> None:
  """ConfigError for `where.field` (an arch group of the config file) unless `ok`."""
  if not ok:
    raise ConfigError(f"{where}.{field}", value, allowed)


@dataclasses.dataclass(frozen=True)
class Family:
  """One transformers `model_type`: everything that differs between families, behind one interface."""
  name: str          # transformers' model_type, also ModelConfig.family
  architecture: str  # transformers' class, written to config.json `architectures`
  # config.json dict, where (names the file in ModelLoadError) -> ModelConfig.
  from_hf: Callable[[dict[str, Any], str], ModelConfig]
  # ModelConfig -> this family's config.json keys (models/config.py `to_hf_config` adds the common ones).
  to_hf: Callable[[ModelConfig], dict[str, Any]]
  # The config file's arch group (its keys are ModelConfig field names) -> ModelConfig, with transformers'
  # defaults for this family for everything the group does not size.
  from_arch: Callable[[Mapping[str, Any]], ModelConfig]
  # arch group, where ('student.arch') -> None; ConfigError for values this family cannot take.
  check_arch: Callable[[Mapping[str, Any], str], None]
  # ModelConfig, fused_experts (the in-memory MoE layout, models/weights.py) -> the checkpoint's tensor rules.
  weight_rules: Callable[[ModelConfig, bool], list[Rule]]
  moe: bool = False       # blocks may route tokens to experts (num_experts > 0)
  windowed: bool = False  # config.json's `sliding_window` is read (on every layer, or on those the family marks)
