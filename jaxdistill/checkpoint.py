"""Orbax checkpoints of the train state (never the teacher) with run metadata.

Two managers under the workdir: `checkpoints/` keeps the last K (periodic, epoch-end, emergency,
final) and `best/` keeps the best by the evaluation metric. Each step directory holds the state
(student and heads params, optimizer state, step, RNG, loss scale, counters) and a JSON `meta`
item (data position, monitor state, best metric). Restoring walks back from the newest step and
skips, with a warning, any that cannot be read.
"""

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdistill.errors import JaxDistillError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(JaxDistillError):
  """No usable checkpoint where one was asked for."""


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Both managers save the same steps; in a multi-process run their cross-process barriers (named by
  # step) would collide without a prefix of their own.
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=os.path.basename(directory))
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, multiprocessing_options=multiprocessing))


def _save_args(state, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def _restore_args(abstract_state) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())


def abstract(state):
  """Shapes and dtypes of `state`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Checkpointer:
  """Saves and restores `(state, meta)` under `workdir`."""

  def __init__(self, workdir: str, keep: int):
    self.latest = _manager(os.path.join(workdir, LATEST_DIR), keep)
    self.best = _manager(os.path.join(workdir, BEST_DIR), 1)

  def save(self, step: int, state, meta: dict, best: bool = False) -> bool:
    """Saves unless this step is already saved (e.g. periodic and epoch-end coincide); True if it saved."""
    manager = self.best if best else self.latest
    if step in manager.all_steps():
      return False
    return manager.save(step, args=_save_args(state, meta), force=True)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

  def has_checkpoints(self) -> bool:
    return bool(self.latest.all_steps())

  def restore_latest(self, abstract_state) -> tuple[Any, dict] | None:
    """The newest readable checkpoint of the workdir, or None if there is none."""
    return restore_newest_readable(self.latest, abstract_state, where=self.latest.directory)


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state, where, steps=None):
  """Tries the manager's steps newest first; unreadable ones are skipped with a warning."""
  for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
    try:
      restored = manager.restore(step, args=_restore_args(abstract_state))
      return restored.state, dict(restored.meta)
    except Exception as e:  # orbax/tensorstore raise many types for truncated or corrupt files
      warnings.warn(f"checkpoint {where}/{step} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); falling back to the previous one", stacklevel=2)
  return None


def restore_path(path: str, abstract_state) -> tuple[Any, dict]:
  """`--resume PATH`: a step directory (`.../checkpoints/120`) or a checkpoints directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"--resume {path}: no such directory")
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    manager = ocp.CheckpointManager(os.path.dirname(path))
    restored = restore_newest_readable(manager, abstract_state, os.path.dirname(path), steps=[int(name)])
  else:
    root = os.path.join(path, LATEST_DIR) if os.path.isdir(os.path.join(path, LATEST_DIR)) else path
    restored = restore_newest_readable(ocp.CheckpointManager(root), abstract_state, root)
  if restored is None:
    raise CheckpointError(f"--resume {path}: no readable checkpoint there")
  return restored
