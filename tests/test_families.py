"""The family registry: every family module is registered, and each maps its config both ways."""

import importlib
import pathlib
import pkgutil
import re

import pytest
import transformers

from jaxdistill import models
from jaxdistill.config import arch_group
from jaxdistill.errors import ConfigError, ModelLoadError
from jaxdistill.models import families

PACKAGE = pathlib.Path(families.__file__).parent


def test_every_family_a_module_declares_is_registered_under_its_model_type():
  modules = [importlib.import_module(f"{families.__name__}.{m.name}") for m in pkgutil.iter_modules([str(PACKAGE)])]
  declared = {v for m in modules for v in vars(m).values() if isinstance(v, families.Family)}
  assert declared == set(families.FAMILIES.values())
  assert {"llama", "qwen2", "qwen3", "gpt2", "qwen3_moe", "mixtral", "mistral", "phi3"} <= set(families.FAMILIES)
  for name, family in families.FAMILIES.items():
    assert family.name == name and hasattr(transformers, family.architecture), name


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_each_random_arch_survives_config_json(name):
  family = families.FAMILIES[name]
  arch = arch_group(family=name, vocab_size=97, num_experts=4 if family.moe else 0,
                    sliding_window=8 if family.windowed else 0)
  cfg = families.from_arch(arch)
  hf = models.to_hf_config(cfg)
  assert (hf["model_type"], hf["architectures"]) == (name, [family.architecture])
  assert models.from_hf_config(hf) == cfg
  assert (cfg.num_experts, cfg.sliding_window) == (4 if family.moe else 0, 8 if family.windowed else 0)


def test_an_unknown_model_type_is_one_line_naming_the_supported_families():
  with pytest.raises(ModelLoadError) as error:
    models.from_hf_config({"model_type": "mamba"}, "ckpt/config.json")
  assert str(error.value) == ("ckpt/config.json: model_type 'mamba' is not supported; supported families: "
                              + ", ".join(families.FAMILIES))
  assert "llama, qwen2, qwen3, gpt2, qwen3_moe, mixtral, mistral, phi3" in str(error.value)


def test_capabilities_refuse_arch_values_by_field_value_and_allowed():
  with pytest.raises(ConfigError) as error:
    families.from_arch(arch_group(family="qwen3", sliding_window=4), "teacher.arch")
  assert (error.value.field, error.value.value) == ("teacher.arch.sliding_window", 4)
  windowed = sorted(name for name, family in families.FAMILIES.items() if family.windowed)   # a new family too
  assert error.value.allowed.startswith(f"0 for family qwen3 (sliding windows: {', '.join(windowed)}")
  assert {"mistral", "mixtral", "phi3"} <= set(windowed)
  with pytest.raises(ConfigError) as error:   # ModelConfig's own check, named in the config group
    families.from_arch(arch_group(family="qwen3_moe", num_experts=2, num_experts_per_tok=3), "student.arch")
  assert str(error.value) == ("config field 'student.arch.num_experts_per_tok' = 3 is not allowed: an integer in "
                              "1..num_experts=2")


def test_no_module_outside_the_families_tests_a_family_name():
  """The transformer and the trainer read capabilities; only models/families/ knows which family is which."""
  name_test = re.compile(r"family\s*(==|!=|\bin\b|\bnot in\b)|MOE_FAMILIES|WINDOWED_FAMILIES")
  sources = [p for p in PACKAGE.parent.parent.rglob("*.py") if PACKAGE not in p.parents]
  offenders = [f"{p.name}:{i}" for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
               if name_test.search(line)]
  assert offenders == []
