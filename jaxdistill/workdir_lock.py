"""One run per directory: an advisory lock held for the life of the run.

`hold(directory)` takes an exclusive `flock` on `directory/.jaxdistill.lock` and writes who holds it
(pid, host, start time, command). The kernel drops the lock when the process ends, however it ends,
so a lock left behind by a killed run is simply taken over. A second run on a held directory stops
at once with `DirectoryBusy` naming the holder. On a filesystem without `flock` the file alone
decides: a holder on this host whose pid is gone is stale and replaced; one on another host is not
(its pid cannot be checked from here) and the message names the file to delete.

Holding is re-entrant within a process: the run's stages (teacher, distillation, scratch baseline)
hold their directories while the whole job holds the workdir. In a multi-host run process 0 holds
the lock for all of the run's processes.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from jaxdistill.errors import JaxDistillError

LOCK_FILE = ".jaxdistill.lock"
_held: dict[str, int] = {}  # real path of a lock file -> nesting depth in this process


class DirectoryBusy(JaxDistillError):
  """Another live run holds the directory."""


class CannotLock(JaxDistillError):
  """The lock file cannot be created (an unwritable directory)."""


def _holder_line(holder: dict) -> str:
  command = f" ({holder['command']})" if holder.get("command") else ""
  return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}{command}"


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    holder = json.loads(os.read(fd, 1 << 16).decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(holder).encode())
  os.fsync(fd)


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _busy(directory: str, what: str, holder: dict, path: str, hint: str = "") -> DirectoryBusy:
  return DirectoryBusy(f"{what} {directory} is in use by {_holder_line(holder)}; wait for that run to end or "
                       f"use another directory{hint} (lock file {path})")


def _take(fd: int, directory: str, what: str, path: str) -> dict | None:
  """Locks `fd`; returns the previous holder's record when it was left behind by a run that is gone."""
  previous = _read(fd)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return previous or None
  except BlockingIOError:
    raise _busy(directory, what, _read(fd), path) from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      raise
  # No flock here: the record decides.
  if not previous or previous.get("pid") == os.getpid():
    return None
  if previous.get("host") != socket.gethostname():
    raise _busy(directory, what, previous, path, hint=", or delete the lock file if that run is gone")
  if _pid_alive(previous.get("pid")):
    raise _busy(directory, what, previous, path)
  return previous


@contextlib.contextmanager
def hold(directory: str, what: str = "workdir", name: str = LOCK_FILE, enabled: bool = True):
  """Holds `directory`'s lock (file `name` in it) for the `with` block; `what` names it in messages.

  `enabled=False` holds nothing: the processes of a multi-host run but process 0 (which holds it for all).
  """
  if not enabled:
    yield
    return
  path = os.path.join(directory, name)
  key = os.path.realpath(path)
  if key in _held:
    _held[key] += 1
    try:
      yield
    finally:
      _held[key] -= 1
    return
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise CannotLock(f"cannot lock {what} {directory}: {e.strerror} ({path}); choose a writable one") from None
  try:
    stale = _take(fd, directory, what, path)
    if stale:
      from jaxdistill.training.metrics import log  # here: metrics imports jax
      log(f"[LOCK] {what} {directory}: the run that held it ({_holder_line(stale)}) is gone; taking it over")
    _write(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)})
    _held[key] = 1
    try:
      yield
    finally:
      del _held[key]
      os.ftruncate(fd, 0)  # the file stays: unlinking it would let two runs lock two different files
  finally:
    os.close(fd)  # releases the flock
