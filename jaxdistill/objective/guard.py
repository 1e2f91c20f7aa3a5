"""The non-finite guard every loss component passes through."""

import jax
import jax.numpy as jnp
from jax import dtypes


def guard(fn):
  """Wraps a scalar loss `fn(*args)`: returns (value or 0 if non-finite, 1.0 if it was non-finite).

  The replacement happens inside jit, and the backward pass sends zero cotangents into `args`
  when the value was non-finite, so a NaN in one component cannot leak NaN gradients into the
  parameters through the shared forward (a bare `jnp.where` would: 0 * NaN = NaN).
  """
  @jax.custom_vjp
  def guarded(*args):
    value = fn(*args)
    ok = jnp.isfinite(value)
    return jnp.where(ok, value, 0.0), (~ok).astype(jnp.float32)

  def guarded_fwd(*args):
    value, vjp = jax.vjp(fn, *args)
    ok = jnp.isfinite(value)
    return (jnp.where(ok, value, 0.0), (~ok).astype(jnp.float32)), (vjp, ok)

  def guarded_bwd(residuals, cotangents):
    vjp, ok = residuals
    grads = vjp(jnp.where(ok, cotangents[0], 0.0))
    return jax.tree.map(lambda g: g if g.dtype == dtypes.float0 else jnp.where(ok, g, jnp.zeros_like(g)), grads)

  guarded.defvjp(guarded_fwd, guarded_bwd)
  return guarded
