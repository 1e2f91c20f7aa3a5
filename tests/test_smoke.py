"""The model smoke program through its real command line, for every shipped config."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

CONFIG_FILES = sorted(glob.glob("configs/*.py"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxdistill.smoke", *args], capture_output=True, text=True,
                        env=ENV, timeout=timeout)


def _llama_params(vocab, hidden, layers, heads, kv_heads, inter, tied=True):
  """Hand count: embeddings, per layer q/k/v/o + gate/up/down + two norms, final norm, head."""
  head_dim = hidden // heads
  attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
  per_layer = attention + 3 * hidden * inter + 2 * hidden
  return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.parametrize("path, teacher, student", [
    ("configs/cpu_demo.py", (257, 64, 2, 4, 2, 128), (257, 32, 2, 4, 2, 64)),
    ("configs/p100.py", (257, 64, 3, 4, 1, 128), (257, 32, 2, 2, 1, 64)),
])
def test_smoke_form_of_each_config_runs_offline(tmp_path, path, teacher, student):
  assert path in CONFIG_FILES
  result = _run(f"--config={path}:smoke", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "[SMOKE]" in result.stdout and "Traceback" not in result.stderr
  with open(tmp_path / "smoke.json") as f:
    figures = json.load(f)
  assert figures["teacher"]["params"] == _llama_params(*teacher)
  assert figures["student"]["params"] == _llama_params(*student)
  for name in ("teacher", "student"):  # random init: next-token loss is that of a uniform guess
    assert abs(figures[name]["lm_loss"] - math.log(257)) < 0.1
  assert 0 <= figures["kl_teacher_student"] < 0.1
  assert figures["export_max_abs_logit_diff"] < 1e-4
  assert os.path.isfile(tmp_path / "student_hf" / "model.safetensors")
  assert os.path.isfile(tmp_path / "student_hf" / "tokenizer.json")


def test_every_config_has_a_smoke_test():
  tested = {"configs/cpu_demo.py", "configs/p100.py"}
  assert set(CONFIG_FILES) == tested, "add the new config to test_smoke_form_of_each_config_runs_offline"


@pytest.mark.parametrize("args, message", [
    (["--config=configs/cpu_demo.py:smoke", "--config.student.dtype=float64"],
     "error: config field 'student.dtype' = 'float64' is not allowed: one of float32, bfloat16, float16"),
    (["--config=configs/cpu_demo.py:smoke", "--config.student.dtyp=float32"],
     "error: no such config field 'dtyp'. Did you mean \"dtype\" instead of \"dtyp\"?"),
    (["--config=configs/cpu_demo.py:huge"],
     "error: flag --config=configs/cpu_demo.py:huge: Error whilst parsing config file: "
     "ValueError: unknown config argument 'huge'; allowed: smoke"),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--config=configs/p100.py"], "error: student.name_or_path: could not get 'HuggingFaceTB/SmolLM-135M'"),
    (["--config=configs/p100.py", "--config.tokenizer=byte"],
     "error: teacher.name_or_path: could not get 'HuggingFaceTB/SmolLM-360M'"),
    (["--config=configs/cpu_demo.py:smoke", "--workdir=/proc/forbidden"],
     "error: config field '--workdir' = '/proc/forbidden' is not allowed: a writable directory"),
])
def test_bad_command_lines_end_in_one_clear_line(args, message):
  result = _run(*args, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert message in lines[0]
