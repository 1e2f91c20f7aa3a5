"""Flax causal LMs and their Hugging Face checkpoint I/O."""

from jaxdistill.models.config import ModelConfig, RopeConfig, from_hf_config, to_hf_config
from jaxdistill.models.families import SUPPORTED_FAMILIES
from jaxdistill.models.hf_io import Pretrained, load_pretrained, save_pretrained
from jaxdistill.models.transformer import LMOutput, default_positions, forward, init_params, param_shapes, unembed

__all__ = ["SUPPORTED_FAMILIES", "LMOutput", "ModelConfig", "Pretrained", "RopeConfig", "default_positions", "forward",
           "from_hf_config", "init_params", "load_pretrained", "param_shapes", "save_pretrained", "to_hf_config",
           "unembed"]
