"""The model families, one module each, and the checks every family shares.

Adding a family: write `families/<model_type>.py` defining `FAMILY` (a `base.Family`; a Llama-like block is
`llama_like.family(...)` with its quirks), import it here and add it to `FAMILIES`. Whatever the
transformer must do differently is a capability field of ModelConfig, never a test of the family's name.
"""

from typing import Any, Mapping

from jaxdistill.errors import ConfigError, ModelLoadError
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.families import gemma2, gemma3_text, gpt2, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe
from jaxdistill.models.families.base import Family, check

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gpt2.FAMILY,
                                                   qwen3_moe.FAMILY, mixtral.FAMILY, mistral.FAMILY, phi3.FAMILY,
                                                   gemma2.FAMILY, gemma3_text.FAMILY)}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def get(model_type, where: str) -> Family:
  """The family of `model_type`; ModelLoadError naming `where` and the supported families otherwise."""
  if model_type not in FAMILIES:
    raise ModelLoadError(f"{where}: model_type {model_type!r} is not supported; supported families: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
  return FAMILIES[model_type]


def _names(capability: str, joiner: str = ", ") -> str:
  """The families that have `capability` (a Family field), for messages."""
  return joiner.join(sorted(name for name, f in FAMILIES.items() if getattr(f, capability)))


def from_arch(arch: Mapping[str, Any], where: str = "arch") -> ModelConfig:
  """The ModelConfig of a config file's arch group (`config.arch_group`: ModelConfig field names, sizes only).

  The family fills in transformers' defaults for the rest. Values no family or not this one can take raise
  ConfigError naming `where.field`, the value and what is allowed.
  """
  name = arch["family"]
  check(name in FAMILIES, where, "family", name, f"one of {', '.join(SUPPORTED_FAMILIES)}")
  family = FAMILIES[name]
  check(arch["sliding_window"] == 0 or family.windowed, where, "sliding_window", arch["sliding_window"],
        f"0 for family {name} (sliding windows: {_names('windowed')})")
  check(arch["hidden_size"] % arch["num_heads"] == 0, where, "num_heads", arch["num_heads"],
        f"a divisor of hidden_size={arch['hidden_size']}")
  _check_experts(family, arch, where)
  family.check_arch(arch, where)
  try:
    return family.from_arch(arch)
  except ConfigError as e:  # ModelConfig's own checks name its bare field
    raise ConfigError(f"{where}.{e.field}", e.value, e.allowed) from None


def _check_experts(family: Family, arch: Mapping[str, Any], where: str) -> None:
  """Experts for the MoE families only, and at least one sparse block."""
  experts = arch["num_experts"]
  if not family.moe:
    check(experts == 0, where, "num_experts", experts,
          f"0 for the dense family {family.name} (experts need family {_names('moe', ' or ')})")
    return
  check(experts >= 1, where, "num_experts", experts, f"an integer >= 1 for the MoE family {family.name}")
  check(arch["decoder_sparse_step"] <= arch["num_layers"], where, "decoder_sparse_step", arch["decoder_sparse_step"],
        f"an integer in 1..num_layers={arch['num_layers']} (a larger step leaves no sparse block)")
