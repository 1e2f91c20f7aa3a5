"""Rotary position embeddings with the scalings Llama-family checkpoints use."""

import math

import jax.numpy as jnp
import numpy as np

from jaxdistill.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Per-pair rotation frequencies [head_dim // 2], float32, with `rope.rope_type` scaling applied."""
  inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if rope.rope_type == "linear":
    inv_freq = inv_freq / rope.factor
  elif rope.rope_type == "llama3":
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_BxLxHxK: jnp.ndarray, positions_BxL: jnp.ndarray, inv_freq_K2: np.ndarray) -> jnp.ndarray:
  """Rotates the two halves of each head vector (the `rotate_half` layout of transformers)."""
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_K2)
  cos_BxLx1xK = jnp.cos(jnp.concatenate([angles_BxLxK2] * 2, axis=-1))[:, :, None, :]
  sin_BxLx1xK = jnp.sin(jnp.concatenate([angles_BxLxK2] * 2, axis=-1))[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  dtype = x_BxLxHxK.dtype
  return (x_BxLxHxK * cos_BxLx1xK.astype(dtype) + rotated * sin_BxLx1xK.astype(dtype)).astype(dtype)
