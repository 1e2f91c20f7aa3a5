"""Nothing lost, nothing silent: damaged checkpoints, refused resumes, a busy workdir, a diverged run.

Each case runs the real program on the demo's tiny models and checks its exit code, its one-line
message, and that the earlier run's checkpoints, export and metrics are untouched.
"""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import DISTILL_ONLY, run_train
from jaxdistill import workdir_lock
from jaxdistill.training import checkpoint as ckpt

# 4 optimizer steps, a checkpoint and an evaluation every 2.
SHORT = [*DISTILL_ONLY, "--config.train.max_steps=4", "--config.optim.warmup_steps=1", "--config.checkpoint.every_steps=2",
         "--config.train.eval_every_steps=2", "--config.log.tensorboard=False", "--config.log.progress_bar=False"]


def _files(workdir) -> dict[str, bytes]:
  """Every file of a workdir (the lock's record aside) and its bytes."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if name != workdir_lock.LOCK_FILE:
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


def _one_error_line(result, code: int) -> str:
  assert result.returncode == code, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
  """A finished short run: checkpoints 2 and 4, best/, student_hf, metrics.jsonl."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = run_train(env, workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / ckpt.LATEST_DIR)) == ["2", "4"]
  return workdir


def test_a_flipped_bit_in_the_newest_checkpoint_is_caught_and_the_run_redone_from_the_one_before(env, finished,
                                                                                                   tmp_path):
  workdir = shutil.copytree(finished, tmp_path / "run")
  shutil.rmtree(workdir / "student_hf")
  data = sorted(p for p in (workdir / ckpt.LATEST_DIR / "4" / "state").rglob("*") if p.is_file())
  target = max(data, key=lambda p: p.stat().st_size)  # the array data
  with open(target, "r+b") as f:
    f.seek(target.stat().st_size // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))
  result = run_train(env, workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  relative = target.relative_to(workdir / ckpt.LATEST_DIR / "4")
  assert (f"[CHECKPOINT] {workdir / ckpt.LATEST_DIR / '4'} fails its checksum ({relative} changed since it was "
          f"written): not used") in result.stdout
  assert "resuming at step 2" in result.stdout
  # The damaged checkpoint is kept aside, step 4 is written anew, and the run ends where the original did.
  assert (workdir / ckpt.REJECTED_DIR / "checkpoints-4" / relative).is_file()
  assert ckpt.verify(str(workdir / ckpt.LATEST_DIR / "4")) is None
  weights = "student_hf/model.safetensors"
  assert _files(workdir)[weights] == _files(finished)[weights]


@pytest.mark.parametrize("args, message", [
    (["--config.student.arch.hidden_size=48"],
     "checkpoints/4 holds a train state of other shapes (student.arch.hidden_size 32 -> 48): it cannot continue "
     "this run, whatever is allowed; nothing was deleted. Start this run in another --workdir"),
    (["--config.data.batch_size=2", "--config.optim.accumulation_steps=4"],
     "checkpoints/4 was saved by a run with other settings: data.batch_size 4 -> 2; optim.accumulation_steps 2 -> 4; "
     "nothing was deleted. Start this run in another --workdir, or continue the saved run with these changes: "
     "--config.train.allow_config_change=data.batch_size,optim.accumulation_steps"),
    (["--config.mode=lm"],  # the README's plain-LM example in the demo's workdir
     "checkpoints/4 holds a train state of other shapes (mode \"distill\" -> \"lm\"; "),
])
def test_a_resume_with_other_settings_is_refused_and_changes_nothing(env, finished, args, message):
  before = _files(finished)
  result = run_train(env, finished, *SHORT, *args)
  assert message in _one_error_line(result, 2)
  assert _files(finished) == before


def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_first(env, finished):
  before = _files(finished)
  hold = ("import sys, time\nfrom jaxdistill import workdir_lock\nwith workdir_lock.hold(sys.argv[1]):\n"
          "  print('held', flush=True)\n  time.sleep(600)\n")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(finished)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    result = run_train(env, finished, *SHORT)
  finally:
    holder.kill()
    holder.wait()
  line = _one_error_line(result, 2)
  assert line.startswith(f"error: workdir {finished} is in use by pid {holder.pid} on host {socket.gethostname()}")
  assert _files(finished) == before


def test_a_diverged_run_fails_keeps_its_last_good_checkpoint_and_exports_nothing(env, tmp_path):
  workdir = tmp_path / "diverged"
  result = run_train(env, workdir, *SHORT, "--config.train.max_steps=12", "--config.optim.learning_rate=1e6",
                     "--config.monitor.diverged_steps=3")
  line = _one_error_line(result, 3)
  assert line.startswith("error: training diverged at step ")
  assert (": the updates of the last 3 optimizer steps were all skipped for non-finite gradients "
          "(monitor.diverged_steps=3); nothing was exported and the last good checkpoint is "
          f"{workdir / ckpt.LATEST_DIR}/") in line
  assert line.endswith("(kept). Lower optim.learning_rate (now 1e+06) or optim.clip_norm (now 1), or raise "
                       "optim.warmup_steps (now 1)")
  assert not (workdir / "student_hf").exists()
  kept = line.split("the last good checkpoint is ")[1].split(" (kept)")[0]
  assert ckpt.verify(kept) is None
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(kept, "state"))
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(state["params"]))
