"""The curves plot: reading metrics.jsonl, the curriculum phase changes, the PNG and the CLI."""

import json
import math
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest

from jaxdistill.errors import CommandLineError, JaxDistillError
from jaxdistill.plot import (DPI, FIGSIZE, PANEL_TITLES, components, load_curves, main, phase_changes,
                             plotted_components, write_plot)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_BEFORE_10 = {"kd": 0.7, "lm": 0.3, "attention": 0.0, "contrastive": 0.0}
WEIGHTS_FROM_10 = {"kd": 0.7, "lm": 0.3, "attention": 0.1, "contrastive": 0.0}


def _train_record(step: int, offset: float = 0.0) -> dict:
  """Train record at `step`: raw losses fall as 1/step, temperature 2 -> 1.5 and attention on from step 10."""
  weights = WEIGHTS_BEFORE_10 if step < 10 else WEIGHTS_FROM_10
  raw = {"kd": 2.0 / step + offset, "lm": 4.0 / step + 1.0 + offset, "attention": 1.0 / step, "contrastive": 3.0}
  record = {"step": step, "split": "train", "temperature": 2.0 if step < 10 else 1.5,
            "lr": 1e-3 * step / 5 if step <= 5 else 1e-3 * (30 - step) / 25, "grad_norm": 1.0}
  for c in weights:
    record |= {f"raw/{c}": raw[c], f"weight/{c}": weights[c], f"loss/{c}": weights[c] * raw[c],
               f"nonfinite/{c}": 0.0, f"count/nonfinite/{c}": 0}
  record["loss"] = sum(record[f"loss/{c}"] for c in weights)
  return record


def _eval_record(step: int, student_lm_loss: float) -> dict:
  return {"step": step, "split": "eval", "loss": student_lm_loss - 0.5, "student_lm_loss": student_lm_loss,
          "student_ppl": math.exp(student_lm_loss), "teacher_lm_loss": 1.25, "teacher_ppl": math.exp(1.25),
          "kl_t1": "nan", "top1_agreement": 0.5}


def _write_jsonl(path, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)


@pytest.fixture
def workdir(tmp_path):
  """A run interrupted after step 20 and resumed from step 15 (steps 16..20 and eval 20 logged twice)."""
  first_run = [_train_record(s, offset=100.0) for s in range(1, 21)]
  first_run.insert(10, _eval_record(10, 3.0))
  first_run.append(_eval_record(20, 9.0))
  resumed = [_train_record(s) for s in range(16, 31)]
  resumed[5:5] = [_eval_record(20, 2.5)]  # after step 20
  resumed.append(_eval_record(30, 2.0))
  _write_jsonl(tmp_path / "demo" / "metrics.jsonl", first_run + resumed)
  _write_jsonl(tmp_path / "demo" / "scratch" / "metrics.jsonl",
               [_train_record(s) for s in (10, 20, 30)] + [_eval_record(s, 4.0) for s in (10, 20, 30)])
  return tmp_path / "demo"


def test_load_curves_keeps_the_last_record_of_each_step_sorted(workdir):
  curves = load_curves(str(workdir / "metrics.jsonl"))
  train, evals = curves["train"], curves["eval"]
  assert [r["step"] for r in train] == list(range(1, 31))
  assert [r["step"] for r in evals] == [10, 20, 30]
  # Steps 1..15 come only from the first run (raw/kd offset by 100); 16..20 from the resumed one.
  assert train[14]["raw/kd"] == pytest.approx(2.0 / 15 + 100.0)
  assert train[15]["raw/kd"] == pytest.approx(2.0 / 16)
  assert train[19]["loss"] == pytest.approx(0.7 * 0.1 + 0.3 * 1.2 + 0.1 * 0.05)  # step 20: 0.435
  assert [r["student_lm_loss"] for r in evals] == [3.0, 2.5, 2.0]  # eval 20: the resumed 2.5, not 9.0
  assert math.isnan(evals[0]["kl_t1"])  # the string "nan" reads as NaN


def test_components_in_order_of_first_appearance_and_plotted_only_when_weighted():
  records = [{"step": 1, "weight/lm": 1.0, "weight/kd": 0.0, "weight/feature": 0.0},
             {"step": 2, "weight/lm": 1.0, "weight/kd": 0.0, "weight/feature": 0.5, "weight/extra": 0.0}]
  assert components(records) == ["lm", "kd", "feature", "extra"]
  assert plotted_components(records) == ["lm", "feature"]  # kd and extra are 0 in every record


def test_plotted_components_of_the_fixture_drop_the_all_zero_one(workdir):
  train = load_curves(str(workdir / "metrics.jsonl"))["train"]
  assert components(train) == ["attention", "contrastive", "kd", "lm"]  # the file's keys are sorted
  assert plotted_components(train) == ["attention", "kd", "lm"]


def test_phase_changes_are_the_first_step_of_each_new_value(workdir):
  assert phase_changes(load_curves(str(workdir / "metrics.jsonl"))["train"]) == [10]
  records = [{"step": 5, "weight/kd": 1.0, "temperature": 2.0},
             {"step": 10, "weight/kd": 1.0, "temperature": 2.0},
             {"step": 15, "weight/kd": 0.5, "temperature": 2.0},   # a weight changes
             {"step": 20, "weight/kd": 0.5, "temperature": 2.0},
             {"step": 25, "weight/kd": 0.5, "temperature": 1.0},   # the temperature changes
             {"step": 30, "weight/kd": 0.5, "temperature": 1.0, "lr": 3.0}]  # lr is no curriculum
  assert phase_changes(records) == [15, 25]
  steady_nan = [{"step": 1, "weight/kd": math.nan}, {"step": 2, "weight/kd": math.nan}]
  assert phase_changes(steady_nan) == []
  assert phase_changes(records[:1]) == []


def test_a_ramp_counts_once_at_its_first_step():
  kd = [1.0, 1.0, 0.8, 0.6, 0.4, 0.4, 0.4, 0.2, 0.0, 0.0]  # two ramps: steps 3-5 and 8-9
  records = [{"step": i + 1, "weight/kd": w} for i, w in enumerate(kd)]
  assert phase_changes(records) == [3, 8]


def test_write_plot_draws_four_panels_into_a_png_of_the_figure_size(workdir):
  png_path, titles = write_plot(str(workdir))
  assert png_path == os.path.join(str(workdir), "curves.png")
  assert titles == list(PANEL_TITLES) == ["Loss components (weighted)", "Curriculum weights", "Learning rate",
                                          "Train vs eval loss"]
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png_path) > 20_000
  pixels_HxWxC = matplotlib.image.imread(png_path)
  assert pixels_HxWxC.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)) == (935, 1430)


def test_write_plot_honours_out_path(workdir, tmp_path):
  out = tmp_path / "elsewhere" / "plot.png"
  assert write_plot(str(workdir), str(out))[0] == str(out)
  assert out.stat().st_size > 20_000


def test_missing_file_and_no_train_records_name_the_path(tmp_path):
  missing = str(tmp_path / "nothing" / "metrics.jsonl")
  with pytest.raises(JaxDistillError, match=f"^{re.escape(missing)}: no such file; pass the workdir of a run$"):
    write_plot(str(tmp_path / "nothing"))
  eval_only = str(tmp_path / "eval_only" / "metrics.jsonl")
  _write_jsonl(eval_only, [_eval_record(10, 3.0)])
  with pytest.raises(JaxDistillError, match=f"^{re.escape(eval_only)}: no train records"):
    write_plot(str(tmp_path / "eval_only"))


def test_a_malformed_line_names_file_and_line_number(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps(_train_record(1)) + "\n\n" + '{"step": 2, "split": "tra\n')
  with pytest.raises(JaxDistillError, match=f"^{re.escape(str(path))}:3: malformed line"):
    load_curves(str(path))
  path.write_text(json.dumps(_train_record(1)) + "\n" + '{"step": "2", "split": "train"}\n')
  with pytest.raises(JaxDistillError, match=f"^{re.escape(str(path))}:2: malformed line"):
    load_curves(str(path))


def test_a_last_line_cut_short_by_a_kill_is_skipped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps(_train_record(1)) + "\n" + json.dumps(_train_record(2))[:25])
  assert [r["step"] for r in load_curves(str(path))["train"]] == [1]


def test_main_wants_exactly_one_workdir():
  for argv in (["plot"], ["plot", "runs/a", "runs/b"]):
    with pytest.raises(CommandLineError, match=r"^usage: python -m jaxdistill.plot WORKDIR \[--out PATH\]$"):
      main(argv)


def _start_plot_command(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "jaxdistill.plot", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_writes_curves_png_and_reports_errors_on_one_line(workdir, tmp_path):
  # Both at once: each start-up pays for importing jax (through cli.run's flag parser).
  plotting, failing = _start_plot_command(str(workdir)), _start_plot_command(str(tmp_path / "missing"))
  stdout, stderr = plotting.communicate(timeout=120)
  assert plotting.returncode == 0, stderr
  assert stdout.strip() == f"wrote {workdir / 'curves.png'}"
  assert (workdir / "curves.png").stat().st_size > 20_000
  stdout, stderr = failing.communicate(timeout=120)
  assert failing.returncode == 2 and stdout == ""
  assert stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}/metrics.jsonl: no such file; "
                                         "pass the workdir of a run"]
