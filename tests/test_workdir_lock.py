"""The workdir lock: one holder, a clear line for the second, stale locks taken over, re-entrant stages."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from jaxdistill import workdir_lock

HOLD = ("import sys, time\nfrom jaxdistill import workdir_lock\nwith workdir_lock.hold(sys.argv[1]):\n"
        "  print('held', flush=True)\n  time.sleep(600)\n")


def _holder(directory):
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def test_a_second_holder_stops_at_once_naming_the_first(tmp_path):
  process = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.DirectoryBusy) as busy:
      with workdir_lock.hold(str(tmp_path)):
        pass
    message = str(busy.value)
    assert message.startswith(f"workdir {tmp_path} is in use by pid {process.pid} on host {socket.gethostname()} "
                              "since ")
    assert message.endswith(f"; wait for that run to end or use another directory (lock file "
                            f"{tmp_path}/.jaxdistill.lock)")
  finally:
    process.kill()
    process.wait()
  with workdir_lock.hold(str(tmp_path)):  # killed: the kernel dropped its lock
    with open(tmp_path / workdir_lock.LOCK_FILE) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""  # released: the file stays, empty


def test_holding_is_reentrant_within_a_process(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with workdir_lock.hold(str(tmp_path / ".")):
      pass
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()


def _no_flock(*args):
  raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_the_record_decides_by_pid_and_host(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(workdir_lock.fcntl, "flock", _no_flock)
  lock = tmp_path / workdir_lock.LOCK_FILE
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-11-29T10:00:00", "command": "x"}
  lock.write_text(json.dumps(record))
  with workdir_lock.hold(str(tmp_path)):  # its pid is gone: stale
    pass
  assert "the run that held it (pid" in capsys.readouterr().out
  lock.write_text(json.dumps({**record, "pid": os.getppid()}))  # alive on this host
  with pytest.raises(workdir_lock.DirectoryBusy, match=f"in use by pid {os.getppid()} on host "):
    with workdir_lock.hold(str(tmp_path)):
      pass
  lock.write_text(json.dumps({**record, "host": "elsewhere"}))  # another host: cannot be checked from here
  with pytest.raises(workdir_lock.DirectoryBusy, match="on host elsewhere .*, or delete the lock file if that run "
                                                        "is gone"):
    with workdir_lock.hold(str(tmp_path)):
      pass
