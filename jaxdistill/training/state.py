"""The train state: everything that changes during training, as one pytree (never the teacher)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import jmp

from jaxdistill.objective import COMPONENTS
from jaxdistill.training import optim

# Per-component counts of non-finite loss values, plus skipped updates from non-finite gradients.
NONFINITE_COUNTERS = COMPONENTS + ("grads",)


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32: micro-batches seen (always an array, never None)
  params: Any                # {'student': ..., 'heads': router and projections}
  opt_state: optim.OptState
  nonfinite: dict[str, jax.Array]  # int32 counters, keys NONFINITE_COUNTERS
  loss_scale: jax.Array      # float32; stays 1 unless fp16 dynamic loss scaling is on
  loss_scale_good_steps: jax.Array  # int32 finite steps since the scale last changed
  skipped_streak: jax.Array  # int32 micro-batches in a row whose gradients were non-finite (update skipped)
  sample_key: jax.Array      # uint32 key data: split every micro-batch; draws the sampled micro-batches
                             # (objective/on_policy.py), so a resumed run samples what the uninterrupted one did

  @property
  def opt_step(self) -> jax.Array:
    """Optimizer steps taken (updates applied); the curriculum's clock."""
    return self.opt_state.opt_step


  def loss_scaler(self, dynamic: bool) -> jmp.LossScale:
    """The jmp loss scale this state's arrays describe (a no-op unless `dynamic`)."""
    if not dynamic:
      return jmp.NoOpLossScale()
    return jmp.DynamicLossScale(self.loss_scale, self.loss_scale_good_steps)


_SAMPLER_STREAM = 0x5A4D  # folded into the seed's key: the sampler's stream


def sample_key(seed: int) -> jax.Array:
  """The sampler's first key for `seed` (its own stream: the models' initialisation keys are unchanged)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), _SAMPLER_STREAM))


def create_train_state(student_params, heads_params, tx: optim.Optimizer, initial_loss_scale: float = 1.0,
                       seed: int = 0) -> TrainState:
  """A fresh state at step 0; `initial_loss_scale` > 1 for fp16; `seed` gives the sampler's key."""
  params = {"student": student_params, "heads": heads_params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite={k: jnp.zeros((), jnp.int32) for k in NONFINITE_COUNTERS},
                    loss_scale=jnp.asarray(initial_loss_scale, jnp.float32),
                    loss_scale_good_steps=jnp.zeros((), jnp.int32), skipped_streak=jnp.zeros((), jnp.int32),
                    sample_key=sample_key(seed))


def create_placed_train_state(plan, student_params, heads_params, tx: optim.Optimizer,
                              initial_loss_scale: float = 1.0, seed: int = 0) -> TrainState:
  """`create_train_state` directly in the shardings of `plan` (a `parallel.MeshPlan`).

  The student's params go to their shards first and the optimizer state is created in its own, so no
  device ever holds all of a sharded state.
  """
  def create(student_params, heads_params):
    return create_train_state(student_params, heads_params, tx, initial_loss_scale, seed)

  shardings = plan.state_shardings(jax.eval_shape(create, student_params, heads_params))
  student_params = plan.put(student_params, shardings.params["student"])
  return jax.jit(create, out_shardings=shardings)(student_params, heads_params)
