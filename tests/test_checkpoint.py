"""Orbax checkpoints: round trip, keep-last-K, checksums and fallback, refusals, explicit paths, free space."""

import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.config import fingerprint
from jaxdistill.training import checkpoint as ckpt
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import NONFINITE_COUNTERS, create_train_state


def _state(value: float, step: int | None = None):
  tx, _ = make_optimizer(OptimConfig(accumulation_steps=2))
  state = create_train_state({"w": jnp.full((2, 3), value, jnp.float32)}, {"h": jnp.zeros(3)}, tx)
  return state.replace(step=jnp.int32(int(value) if step is None else step))


def test_round_trip_and_keep_last_k(tmp_path):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {"step": step, "data_position": {"epoch": 0, "batch_in_epoch": step}})
  checkpointer.wait()
  assert checkpointer.latest.all_steps() == [2, 3]
  restored = checkpointer.restore_latest(ckpt.abstract(_state(0)), _accept_all)
  state, meta = restored.state, restored.meta
  assert meta == {"step": 3, "data_position": {"epoch": 0, "batch_in_epoch": 3}}
  assert int(state.step) == 3 and float(state.params["student"]["w"][0, 0]) == 3.0
  assert float(state.loss_scale) == 1.0 and int(state.skipped_streak) == 0
  checkpointer.close()


def _accept_all(meta, name):
  pass


def _saved(tmp_path, steps, keep=3, value=None):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=keep)
  for step in steps:
    checkpointer.save(step, _state(step if value is None else value), {"step": step})
  checkpointer.close()
  return checkpointer


def _tree_bytes(directory) -> dict:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def test_corrupt_latest_falls_back_to_the_previous_good_one(tmp_path, capsys):
  checkpointer = _saved(tmp_path, (1, 2))
  state_dir = tmp_path / ckpt.LATEST_DIR / "2" / "state"
  for root, _, files in os.walk(state_dir):  # truncate every data file of the newest checkpoint
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(0)
  restored = checkpointer.restore_latest(ckpt.abstract(_state(0)), _accept_all)
  assert restored.meta == {"step": 1} and int(restored.state.step) == 1
  assert restored.name == str(tmp_path / ckpt.LATEST_DIR / "1")
  out = capsys.readouterr().out
  assert f"[CHECKPOINT] {tmp_path / ckpt.LATEST_DIR / '2'} fails its checksum (state/" in out
  assert f"[CHECKPOINT] resuming from {tmp_path / ckpt.LATEST_DIR / '1'}, the newest usable checkpoint" in out


def test_every_one_of_20_random_bit_flips_is_detected(tmp_path, capsys):
  checkpointer = _saved(tmp_path, (1, 2))
  newest = tmp_path / ckpt.LATEST_DIR / "2"
  files = sorted(str(p) for p in newest.rglob("*") if p.is_file())
  assert len(files) >= 8 and any(f.endswith(ckpt.CHECKSUMS) for f in files)  # the manifest is a target too
  rng = random.Random(20261129)
  for _ in range(20):
    path = rng.choice(files)
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      offset, bit = rng.randrange(len(data)), rng.randrange(8)
      data[offset] ^= 1 << bit
      f.seek(0)
      f.write(data)
    assert ckpt.verify(str(newest)) is not None, (path, offset, bit)
    assert checkpointer.restore_latest(ckpt.abstract(_state(0)), _accept_all).meta == {"step": 1}
    with open(path, "r+b") as f:  # flip it back: the next flip starts from a good checkpoint
      data[offset] ^= 1 << bit
      f.write(data)
    assert ckpt.verify(str(newest)) is None
  capsys.readouterr()


def test_a_checkpoint_with_non_finite_values_is_not_used(tmp_path, capsys):
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=3)
  checkpointer.save(1, _state(1), {"step": 1})
  checkpointer.save(2, _state(float("nan"), step=2), {"step": 2})  # e.g. a diverged state
  checkpointer.close()
  restored = checkpointer.restore_latest(ckpt.abstract(_state(0)), _accept_all)
  assert restored.meta == {"step": 1}
  assert f"{tmp_path / ckpt.LATEST_DIR / '2'} holds non-finite values: not used" in capsys.readouterr().out


def test_no_usable_checkpoint_raises_and_deletes_nothing(tmp_path, capsys):
  checkpointer = _saved(tmp_path, (1,))
  os.remove(tmp_path / ckpt.LATEST_DIR / "1" / ckpt.CHECKSUMS)  # as when a run is killed before sealing
  before = _tree_bytes(tmp_path)
  with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint in .*checkpoints \(1 has no checksums "
                                                  r"\(its run stopped before they were written\)\); nothing was "
                                                  r"deleted"):
    checkpointer.restore_latest(ckpt.abstract(_state(0)), _accept_all)
  assert _tree_bytes(tmp_path) == before
  capsys.readouterr()


def test_a_refused_fingerprint_stops_the_walk_back(tmp_path, capsys):
  checkpointer = _saved(tmp_path, (1, 2))
  seen = []

  def refuse(meta, name):
    seen.append(meta["step"])
    raise fingerprint.ResumeRefused(f"{name} is another run's")

  before = _tree_bytes(tmp_path)
  with pytest.raises(fingerprint.ResumeRefused, match="checkpoints/2 is another run's"):
    checkpointer.restore_latest(ckpt.abstract(_state(0)), refuse)
  assert seen == [2] and _tree_bytes(tmp_path) == before  # older ones are the same run: not tried


def test_a_save_without_room_raises_disk_full_before_writing(tmp_path, monkeypatch, capsys):
  checkpointer = _saved(tmp_path, (1,))
  needed = ckpt.nbytes(_state(2))
  # Params, Adam's two moments and the accumulator: 4 x 9 floats; four-byte scalars: a non-finite counter per
  # loss component and for the gradients, and 10 more (step, loss scale and its counter, skip streak, six
  # optimizer counts); the sampler's key, two uint32.
  assert needed == 4 * 9 * 4 + (len(NONFINITE_COUNTERS) + 10) * 4 + 2 * 4
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage._replace(free=needed))
  checkpointer = ckpt.Checkpointer(str(tmp_path), keep=3)
  with pytest.raises(ckpt.DiskFull, match=rf"no room for the checkpoint of step 2 in {tmp_path}/checkpoints: it "
                                          rf"needs about 0 MiB and 0 MiB are free; the last good checkpoint is "
                                          rf"{tmp_path}/checkpoints/1 \(kept\)"):
    checkpointer.save(2, _state(2), {"step": 2})
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / ckpt.LATEST_DIR)) == ["1"]


def test_restore_from_an_explicit_step_or_directory(tmp_path):
  _saved(tmp_path, (4, 8))
  target = ckpt.abstract(_state(0))
  assert ckpt.restore_path(str(tmp_path / ckpt.LATEST_DIR / "4"), target, _accept_all).meta["step"] == 4
  # A workdir: its newest good checkpoint.
  assert ckpt.restore_path(str(tmp_path), target, _accept_all).meta["step"] == 8
  with pytest.raises(ckpt.CheckpointError, match="no such directory"):
    ckpt.restore_path(str(tmp_path / "missing"), target, _accept_all)
  np.testing.assert_array_equal(jax.device_get(target.step.shape), ())
