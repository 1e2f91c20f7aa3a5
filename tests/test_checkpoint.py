"""Orbax checkpoints: round trip, keep-last-K, fallback from a corrupt latest, explicit paths."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import checkpoint as ckpt
from jaxdistill.optim import OptimConfig, make_optimizer
from jaxdistill.state import create_train_state


def _state(value: float):
  tx, _ = make_optimizer(OptimConfig(accumulation_steps=2))
  state = create_train_state({"w": jnp.full((2, 3), value)}, {"h": jnp.zeros(3)}, tx, jax.random.key(0))
  return state.replace(step=jnp.int32(int(value)))


def test_round_trip_and_keep_last_k(tmp_path):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {"step": step, "data_position": {"epoch": 0, "batch_in_epoch": step}})
  checkpointer.wait()
  assert checkpointer.latest.all_steps() == [2, 3]
  state, meta = checkpointer.restore_latest(ckpt.abstract(_state(0)))
  assert meta == {"step": 3, "data_position": {"epoch": 0, "batch_in_epoch": 3}}
  assert int(state.step) == 3 and float(state.params["student"]["w"][0, 0]) == 3.0
  assert state.rng.dtype == jnp.uint32  # raw key data: checkpointable
  checkpointer.close()


def test_corrupt_latest_falls_back_to_the_previous_good_one(tmp_path):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpointer.save(step, _state(step), {"step": step})
  checkpointer.wait()
  state_dir = tmp_path / ckpt.LATEST_DIR / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every data file of the newest checkpoint
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)
  with pytest.warns(UserWarning, match=r"checkpoints/2 is unreadable .* falling back to the previous one"):
    state, meta = checkpointer.restore_latest(ckpt.abstract(_state(0)))
  assert meta == {"step": 1} and int(state.step) == 1
  checkpointer.close()


def test_restore_from_an_explicit_step_or_directory(tmp_path):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=3)
  for step in (4, 8):
    checkpointer.save(step, _state(step), {"step": step})
  checkpointer.wait()
  checkpointer.close()
  target = ckpt.abstract(_state(0))
  _, meta = ckpt.restore_path(str(tmp_path / ckpt.LATEST_DIR / "4"), target)
  assert meta["step"] == 4
  _, meta = ckpt.restore_path(str(tmp_path), target)  # a workdir: its newest good checkpoint
  assert meta["step"] == 8
  with pytest.raises(ckpt.CheckpointError, match="no such directory"):
    ckpt.restore_path(str(tmp_path / "missing"), target)
  np.testing.assert_array_equal(jax.device_get(target.step.shape), ())
