"""The config layer: config files and overrides (files.py), their validation into frozen dataclasses
(schema.py), and a run's fingerprint (fingerprint.py). `from jaxdistill import config` gives what the
entry points, configs/ and the tests use."""

from jaxdistill.config.files import (arch_group, base_config, config_module, define_config_flag, load, loaded_config,
                                     model_group, seed_recipe)
from jaxdistill.config.schema import Config, DebugSpec, ModelSpec, StagesSpec, parse

__all__ = ["Config", "DebugSpec", "ModelSpec", "StagesSpec", "arch_group", "base_config", "config_module",
           "define_config_flag", "load", "loaded_config", "model_group", "parse", "seed_recipe"]
