"""Orbax checkpoints of the train state (never the teacher) with run metadata, verified on restore.

Two managers under the workdir: `checkpoints/` keeps the last K (periodic, epoch-end, emergency,
final) and `best/` keeps the best by the evaluation metric. Each step directory holds the state
(student and heads params, optimizer state, step, RNG, loss scale, counters), a JSON `meta` item
(data position, monitor state, best metric, the run's fingerprint) and, once orbax has finished
writing it, `checksums.json`: the SHA-256 of every file in the step directory.

A checkpoint is used only if all of it holds: its checksums match, its `meta` is accepted (the
caller's `accept` compares fingerprints and may refuse the whole resume), it restores, and every
float in it is finite. Restoring walks back from the newest step and reports each one that fails
by name; when none is usable it raises, and nothing is deleted either way.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable

import jax
import jmp
import numpy as np
import orbax.checkpoint as ocp

from jaxdistill.errors import JaxDistillError, first_line
from jaxdistill.parallel import is_main_process
from jaxdistill.training.metrics import log

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
REJECTED_DIR = "rejected_checkpoints"  # unusable checkpoints a run replaced, moved here rather than deleted
CHECKSUMS = "checksums.json"
_FREE_SPACE_MARGIN = 1.1  # free bytes a save asks for, per byte of state


class CheckpointError(JaxDistillError):
  """No usable checkpoint where one was asked for."""


class DiskFull(JaxDistillError):
  """Too little free space for the next checkpoint."""


@dataclasses.dataclass(frozen=True)
class Restored:
  state: Any
  meta: dict
  name: str   # e.g. 'checkpoints/120', for messages


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  # Both managers save the same steps; in a multi-process run their cross-process barriers (named by
  # step) would collide without a prefix of their own.
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=os.path.basename(directory))
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, multiprocessing_options=multiprocessing))


def _save_args(state, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def abstract(state):
  """Shapes and dtypes of `state`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


all_finite = jax.jit(jmp.all_finite)  # whether every value of a state is finite (integers always are), one scalar


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Checksums.

def _files(step_dir: str) -> list[str]:
  """Every file under `step_dir` but the checksum file, as sorted relative paths."""
  out = []
  for parent, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(parent, n), step_dir) for n in names]
  return sorted(f for f in out if f != CHECKSUMS)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def seal(step_dir: str) -> None:
  """Writes `checksums.json` for a finished step directory (through a temporary name and a rename)."""
  sums = {name: _sha256(os.path.join(step_dir, name)) for name in _files(step_dir)}
  staging = os.path.join(step_dir, f".{CHECKSUMS}.tmp")
  with open(staging, "w") as f:
    json.dump({"sha256": sums}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(staging, os.path.join(step_dir, CHECKSUMS))


def verify(step_dir: str) -> str | None:
  """None when every file of `step_dir` matches its checksum; else what is wrong, in a few words."""
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      sums = json.load(f)["sha256"]
  except FileNotFoundError:
    return "has no checksums (its run stopped before they were written)"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"has an unreadable {CHECKSUMS} ({type(e).__name__})"
  if not isinstance(sums, dict):
    return f"has an unreadable {CHECKSUMS}"
  missing = sorted(set(sums) - set(_files(step_dir)))
  if missing:
    return f"lacks {missing[0]}"
  for name, digest in sorted(sums.items()):
    if _sha256(os.path.join(step_dir, name)) != digest:
      return f"fails its checksum ({name} changed since it was written)"
  return None


# ---------------------------------------------------------------------------------------------
# Saving.

class Checkpointer:
  """Saves and restores `(state, meta)` under `workdir`; seals each checkpoint once orbax finished it."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, LATEST_DIR), keep)
    self.best = _manager(os.path.join(workdir, BEST_DIR), 1)
    self._unsealed: list[tuple[ocp.CheckpointManager, int]] = []

  def save(self, step: int, state, meta: dict, best: bool = False) -> bool:
    """Saves unless this step is already saved (e.g. periodic and epoch-end coincide); True if it saved.

    Raises DiskFull, before writing anything, when the disk has too little room for the state.
    """
    manager = self.best if best else self.latest
    if step in manager.all_steps():
      if (manager, step) in self._unsealed or verify(os.path.join(manager.directory, str(step))) is None:
        return False
      self._set_aside(manager, step)  # a damaged or unsealed checkpoint of an earlier life of the run
    manager.wait_until_finished()  # orbax would wait here too; then the previous save can be sealed
    self.seal_finished()
    self._check_free_space(str(manager.directory), step, nbytes(state))
    saved = manager.save(step, args=_save_args(state, meta), force=True)
    if saved:
      self._unsealed.append((manager, step))
    return saved

  def _check_free_space(self, directory: str, step: int, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * _FREE_SPACE_MARGIN:
      last = self.last_good()
      kept = f"the last good checkpoint is {last} (kept)" if last else "there is no earlier checkpoint"
      raise DiskFull(f"no room for the checkpoint of step {step} in {directory}: it needs about "
                     f"{_mib(needed * _FREE_SPACE_MARGIN)} and {_mib(free)} are free; {kept}. Free space there, "
                     f"lower checkpoint.keep, or choose a --workdir on a larger disk")

  def _set_aside(self, manager: ocp.CheckpointManager, step: int) -> None:
    """Moves an unusable step directory to WORKDIR/rejected_checkpoints (kept for inspection, never deleted)."""
    if is_main_process():
      target = os.path.join(self.workdir, REJECTED_DIR, f"{os.path.basename(manager.directory)}-{step}")
      suffix = 1
      while os.path.exists(target if suffix == 1 else f"{target}.{suffix}"):
        suffix += 1
      target = target if suffix == 1 else f"{target}.{suffix}"
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(manager.directory, str(step)), target)
      log(f"[CHECKPOINT] moved the unusable {os.path.join(manager.directory, str(step))} to {target}")
    manager.reload()

  def seal_finished(self) -> None:
    """Writes the checksums of every save orbax has finished; cheap when there is none."""
    pending = []
    for manager, step in self._unsealed:
      if manager.is_saving_in_progress():
        pending.append((manager, step))
      elif is_main_process():
        step_dir = os.path.join(manager.directory, str(step))
        if os.path.isdir(step_dir):  # not rotated away already
          seal(step_dir)
    self._unsealed = pending

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.seal_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()

  def has_checkpoints(self) -> bool:
    return bool(self.latest.all_steps())

  def last_good(self) -> str | None:
    """The path of the workdir's newest sealed checkpoint, or None."""
    for step in sorted(self.latest.all_steps(), reverse=True):
      if os.path.isfile(os.path.join(self.latest.directory, str(step), CHECKSUMS)):
        return os.path.join(self.workdir, LATEST_DIR, str(step))
    return None

  def restore_latest(self, abstract_state, accept: Callable[[dict, str], None]) -> Restored:
    """The newest usable checkpoint of the workdir (see `restore_newest_usable`)."""
    return restore_newest_usable(self.latest, abstract_state, accept, os.path.join(self.workdir, LATEST_DIR))

  def newest_meta(self) -> tuple[dict, str] | None:
    """The `meta` of the workdir's newest checkpoint that verifies, with its path; None if there is none."""
    for step in sorted(self.latest.all_steps(), reverse=True):
      if verify(os.path.join(self.latest.directory, str(step))) is None:
        return _read_meta(self.latest, step), os.path.join(self.workdir, LATEST_DIR, str(step))
    return None


def _mib(n: float) -> str:
  return f"{n / 2 ** 20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Restoring.

def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` item of a step alone (the state is not read)."""
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def _restore_one(manager: ocp.CheckpointManager, step: int, abstract_state, accept, name: str) -> Restored | str:
  """The checkpoint, or why it cannot be used. `accept` raising means the whole resume is refused."""
  problem = verify(os.path.join(manager.directory, str(step)))
  if problem:
    return problem
  try:
    meta = _read_meta(manager, step)
  except Exception as e:  # orbax raises many types for damaged files
    return f"has unreadable metadata ({type(e).__name__}: {first_line(e)[:200]})"
  accept(meta, name)
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
  except Exception as e:  # orbax/tensorstore raise many types for truncated, corrupt or mismatched files
    return f"is unreadable ({type(e).__name__}: {first_line(e)[:200]})"
  if not bool(all_finite(state)):
    return "holds non-finite values"
  return Restored(state, meta, name)


def restore_newest_usable(manager: ocp.CheckpointManager, abstract_state, accept: Callable[[dict, str], None],
                          where: str, steps=None) -> Restored:
  """Tries the steps newest first; each unusable one is reported by name. Raises when none is usable."""
  problems = []
  for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
    name = os.path.join(where, str(step))
    result = _restore_one(manager, step, abstract_state, accept, name)
    if isinstance(result, Restored):
      if problems:
        log(f"[CHECKPOINT] resuming from {name}, the newest usable checkpoint")
      return result
    log(f"[CHECKPOINT] {name} {result}: not used")
    problems.append(f"{step} {result}")
  raise CheckpointError(f"no usable checkpoint in {where} ({'; '.join(problems) or 'none saved'}); nothing was "
                        "deleted. Resume from another with --resume PATH, or start afresh in another --workdir")


def restore_path(path: str, abstract_state, accept: Callable[[dict, str], None]) -> Restored:
  """`--resume PATH`: a step directory (`.../checkpoints/120`) or a checkpoints directory (or a workdir)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"--resume {path}: no such directory")
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    root = os.path.dirname(path)
    return restore_newest_usable(ocp.CheckpointManager(root), abstract_state, accept, root, steps=[int(name)])
  root = os.path.join(path, LATEST_DIR) if os.path.isdir(os.path.join(path, LATEST_DIR)) else path
  return restore_newest_usable(ocp.CheckpointManager(root), abstract_state, accept, root)

