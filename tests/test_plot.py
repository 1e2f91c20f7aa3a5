"""The curves plot: reading metrics.jsonl, the curriculum phase changes, the PNG and the CLI."""

import contextlib
import json
import math
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest

from jaxdistill.errors import CommandLineError, JaxDistillError
from jaxdistill.plot import (DPI, FIGSIZE, PANEL_TITLES, components, draw_curves, load_curves, main, phase_changes,
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


def test_write_plot_draws_six_panels_into_a_png_of_the_figure_size(workdir, tmp_path):
  # Into --out's path here (the CLI test below writes the default WORKDIR/curves.png): one drawing fewer.
  out = tmp_path / "elsewhere" / "plot.png"
  png_path, titles = write_plot(str(workdir), str(out))
  assert png_path == str(out)
  assert titles == list(PANEL_TITLES) == [
      "Training objective (weighted components)", "Curriculum: weights and KD temperature", "Learning rate",
      "Held-out LM loss: student vs teacher", "Student's samples scored by the teacher",
      "Student–teacher divergence (eval)"]
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png_path) > 20_000
  pixels_HxWxC = matplotlib.image.imread(png_path)
  assert pixels_HxWxC.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)) == (1210, 1980)


# ---------------------------------------------------------------------------------------------
# What each panel draws, from records made here (no file): `draw_curves` tags each line with its
# gid "<source>:<metric>".

def _curves(train_records: list[dict], eval_records: list[dict]) -> dict[str, list[dict]]:
  return {"train": train_records, "eval": eval_records}


def _with_samples(record: dict, teacher_nll: float) -> dict:
  return record | {"samples/teacher_nll": teacher_nll, "samples/reverse_kl": teacher_nll / 10}


@contextlib.contextmanager
def _figure(curves, scratch_curves=None):
  """The figure `draw_curves` draws of the curves, closed on leaving."""
  fig = draw_curves(curves, scratch_curves, "demo")
  try:
    yield fig
  finally:
    import matplotlib.pyplot as plt  # on the Agg backend that draw_curves chose

    plt.close(fig)


@pytest.fixture(scope="module")
def drawn():
  """The six panels of 30 train steps and 3 evaluations with student samples, beside a scratch run; drawn once."""
  evals = [_with_samples(_eval_record(s, lm), nll) for s, lm, nll in ((10, 3.0, 4.0), (20, 2.5, 3.5), (30, 2.0, 3.0))]
  with _figure(_curves([_train_record(s) for s in range(1, 31)], evals),
               _curves([], [_eval_record(s, 4.0) for s in (10, 20, 30)])) as fig:
    fig.draw_without_rendering()  # runs the constrained layout: the legends' final places
    yield fig


def _panels(fig) -> dict:
  """Panel title -> (the panel's axes, its twin axes if any)."""
  panels = fig.axes[:len(PANEL_TITLES)]
  return {ax.get_title(): (ax, [twin for twin in fig.axes[len(PANEL_TITLES):]
                                if twin.get_position().bounds == ax.get_position().bounds]) for ax in panels}


def _gids(axes) -> set[str]:
  return {line.get_gid() for ax in axes for line in ax.lines if line.get_gid() is not None}


def _legend_labels(ax) -> list[str]:
  return [text.get_text() for text in ax.get_legend().get_texts()]


def test_each_series_lands_in_its_panel(drawn):
  panels = _panels(drawn)
  assert list(panels) == list(PANEL_TITLES)
  gids = {title: _gids([ax, *twins]) for title, (ax, twins) in panels.items()}
  objective, curriculum, lr, lm, samples, divergence = PANEL_TITLES
  assert gids[objective] == {"train:loss/attention", "train:loss/kd", "train:loss/lm", "train:loss", "eval:loss"}
  assert gids[curriculum] == {"train:weight/attention", "train:weight/kd", "train:weight/lm", "train:temperature"}
  assert gids[lr] == {"train:lr"}
  assert gids[lm] == {"eval:student_lm_loss", "eval:teacher_lm_loss", "scratch-eval:student_lm_loss"}
  assert gids[samples] == {"eval:samples/teacher_nll", "eval:teacher_lm_loss"}
  assert gids[divergence] == {"eval:kl_t1", "eval:samples/reverse_kl", "eval:top1_agreement"}
  assert _legend_labels(panels[lm][0]) == ["distilled student", "teacher (frozen) = 1.250",
                                           "student trained from scratch"]
  assert _legend_labels(panels[samples][0]) == ["teacher NLL of the student's samples",
                                                "teacher NLL of the held-out text = 1.250"]
  assert panels[objective][0].get_ylabel() == "weighted objective (not an LM loss)"
  # The values drawn are the records': held-out LM losses at the eval steps, the teacher's as one level.
  lines = {line.get_gid(): line for line in panels[lm][0].lines}
  assert list(lines["eval:student_lm_loss"].get_xdata()) == [10, 20, 30]
  assert list(lines["eval:student_lm_loss"].get_ydata()) == [3.0, 2.5, 2.0]
  assert list(lines["scratch-eval:student_lm_loss"].get_ydata()) == [4.0, 4.0, 4.0]
  assert list(lines["eval:teacher_lm_loss"].get_ydata()) == [1.25, 1.25]
  samples_nll = next(line for line in panels[samples][0].lines if line.get_gid() == "eval:samples/teacher_nll")
  assert list(samples_nll.get_ydata()) == [4.0, 3.5, 3.0]


def test_no_panel_mixes_the_weighted_objective_with_an_lm_loss(drawn):
  def is_objective(gid):
    return gid.split(":")[1] == "loss" or gid.split(":")[1].startswith("loss/")

  def is_lm_loss(gid):
    return re.search(r"lm_loss|_ppl|teacher_nll", gid) is not None

  for title, (ax, twins) in _panels(drawn).items():
    gids = _gids([ax, *twins])
    assert not (any(map(is_objective, gids)) and any(map(is_lm_loss, gids))), (title, gids)
  objective_gids = _gids([_panels(drawn)[PANEL_TITLES[0]][0]])
  assert all(map(is_objective, objective_gids)) and len(objective_gids) == 5


def test_legends_sit_below_their_panels_clear_of_every_axes_and_label(drawn):
  renderer = drawn.canvas.get_renderer()
  figure_box = drawn.bbox
  legends = [ax.get_legend() for ax in drawn.axes[:len(PANEL_TITLES)]]
  assert all(legend is not None for legend in legends)
  boxes = [legend.get_window_extent(renderer) for legend in legends]
  for ax, box in zip(drawn.axes, boxes):
    assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, ax.get_title()
    assert box.y1 < ax.bbox.y0  # under its panel's plotting area, so below every point drawn there
    for other in drawn.axes:  # the panels and their twins (whose x axis draws nothing: no box)
      assert not box.overlaps(other.bbox), (ax.get_title(), other.get_title())
      x_axis_box = other.xaxis.get_tightbbox(renderer)  # tick labels and x label
      assert x_axis_box is None or not box.overlaps(x_axis_box), (ax.get_title(), other.get_title())
      assert not box.overlaps(other.title.get_window_extent(renderer)), ax.get_title()
    assert sum(box.overlaps(other) for other in boxes) == 1  # itself only


def test_a_constant_series_gets_an_axis_from_zero_to_twice_its_value():
  train = [_train_record(s) | {"temperature": 1.0, "lr": 3e-4} for s in range(1, 31)]
  with _figure(_curves(train, [])) as fig:
    panels = _panels(fig)
    curriculum_ax, (temperature_ax,) = panels[PANEL_TITLES[1]]
    assert temperature_ax.get_ylim() == (0.0, 2.0)  # not matplotlib's 0.96 .. 1.04
    ticks = [t for t in temperature_ax.get_yticks() if 0.0 <= t <= 2.0]
    assert ticks == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    assert "KD temperature (constant T = 1)" in _legend_labels(curriculum_ax)
    lr_ax = panels[PANEL_TITLES[2]][0]
    assert lr_ax.get_ylim() == pytest.approx((0.0, 6e-4))
    assert _legend_labels(lr_ax) == ["learning rate (constant 0.0003)"]
    # No evaluation yet: the eval panels say so.
    for title in PANEL_TITLES[3:]:
      assert [t.get_text() for t in panels[title][0].texts][0].startswith("no ")


def test_a_changing_series_keeps_its_range_and_a_plain_lm_run_reads_right(drawn):
  _, (temperature_ax,) = _panels(drawn)[PANEL_TITLES[1]]
  low, high = temperature_ax.get_ylim()  # 2.0 then 1.5: matplotlib's 5% margins
  assert (low, high) == pytest.approx((1.475, 2.025))
  lm_only = [{"step": s, "split": "train", "loss": 3.0 / s, "loss/lm": 3.0 / s, "weight/lm": 1.0, "lr": 1e-3 * s}
             for s in range(1, 6)]
  with _figure(_curves(lm_only, [])) as fig:
    curriculum_ax, twins = _panels(fig)[PANEL_TITLES[1]]
    assert curriculum_ax.get_ylim() == (0.0, 2.0) and twins == []  # no temperature logged: no twin axis
    lm_ax = _panels(fig)[PANEL_TITLES[3]][0]
    assert lm_ax.get_legend() is None and lm_ax.texts[0].get_text() == "no evaluation yet"
  plain_lm_eval = [{"step": 5, "split": "eval", "loss": 2.0, "student_lm_loss": 2.0, "student_ppl": math.exp(2.0)}]
  with _figure(_curves(lm_only, plain_lm_eval)) as fig:
    lm_ax = _panels(fig)[PANEL_TITLES[3]][0]
    assert _legend_labels(lm_ax) == ["student"]  # no teacher: not a "distilled" student
    assert lm_ax.get_ylim() == (0.0, 4.0)  # one evaluation is a constant series too


def test_two_tokenizers_compare_the_teacher_per_student_token():
  evals = [_eval_record(10, 3.0) | {"teacher_lm_loss_per_student_token": 1.5}]
  with _figure(_curves([_train_record(s) for s in (5, 10)], evals)) as fig:
    lm_ax = _panels(fig)[PANEL_TITLES[3]][0]
    assert _gids([lm_ax]) == {"eval:student_lm_loss", "eval:teacher_lm_loss_per_student_token"}
    assert _legend_labels(lm_ax)[1] == "teacher (frozen), per student token = 1.500"


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
