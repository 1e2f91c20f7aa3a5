"""Training curves of a run as one PNG.

    python -m jaxdistill.plot WORKDIR [--out PATH]

Reads WORKDIR/metrics.jsonl and writes WORKDIR/curves.png (or PATH): the weighted loss components,
the curriculum (weights, KD temperature and the phase changes), the learning rate, and train against
eval loss (with the teacher's LM loss and, when WORKDIR/scratch/ holds the demo's from-scratch
baseline, that run's student LM loss). Only json, numpy and matplotlib are needed: no jax import,
so the command stays fast and works while a run is still training.
"""

from jaxdistill import cli

cli.quiet_environment()

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from jaxdistill.errors import CommandLineError, JaxDistillError  # noqa: E402


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing must not claim global flag names)."""
  flags.DEFINE_string("out", None, "PNG to write; default WORKDIR/curves.png.")

USAGE = "usage: python -m jaxdistill.plot WORKDIR [--out PATH]"
PANEL_TITLES = ("Loss components (weighted)", "Curriculum weights", "Learning rate", "Train vs eval loss")
FIGSIZE = (13.0, 8.5)  # inches
DPI = 110
_PHASE_KEYS = ("temperature",)  # besides every weight/<c>: scalars whose change starts a curriculum phase


# ---------------------------------------------------------------------------------------------
# Reading metrics.jsonl.

def _as_metric(value):
  """JSON value of a metric: the strings "nan"/"inf" that MetricWriter writes for non-finite floats become NaN."""
  return math.nan if isinstance(value, str) else value


def _record(path: str, line_number: int, line: str) -> dict:
  """One parsed metrics record; anything that is not one raises JaxDistillError naming file and line."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise JaxDistillError(f"{path}:{line_number}: malformed line ({e.msg})") from None
  if (not isinstance(record, dict) or not isinstance(record.get("split"), str)
      or not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool)):
    raise JaxDistillError(f"{path}:{line_number}: malformed line (not a record with an integer 'step' and a 'split')")
  return {k: v if k in ("step", "split") else _as_metric(v) for k, v in record.items()}


def load_curves(path: str) -> dict[str, list[dict]]:
  """Records of a metrics.jsonl by split, sorted by step.

  A resumed run logs again the steps it repeats, so per split only the last record of each step is
  kept. String values (non-finite floats) are read as NaN.

  Args:
    path: a metrics.jsonl written by `metrics.MetricWriter`.

  Returns:
    split ("train", "eval") -> its records in increasing step order, one per step.

  Raises:
    JaxDistillError: the file does not exist, or a line is not a JSON metrics record.
  """
  if not os.path.isfile(path):
    raise JaxDistillError(f"{path}: no such file; pass the workdir of a run")
  latest_by_split: dict[str, dict[int, dict]] = {}
  with open(path) as f:
    lines = f.readlines()
  for line_number, line in enumerate(lines, start=1):
    if line.strip():
      if line_number == len(lines) and not line.endswith("\n"):
        try:  # the last line of a run killed while writing it may be cut short: skip it, then
          json.loads(line)
        except json.JSONDecodeError:
          continue
      record = _record(path, line_number, line)
      latest_by_split.setdefault(record["split"], {})[record["step"]] = record  # a later line wins
  return {split: [latest[step] for step in sorted(latest)] for split, latest in latest_by_split.items()}


# ---------------------------------------------------------------------------------------------
# What to draw: pure functions of the records.

def components(records: list[dict]) -> list[str]:
  """Loss component names, from the `weight/<c>` keys, in the order they first appear."""
  names: dict[str, None] = {}
  for record in records:
    for key in record:
      if key.startswith("weight/"):
        names.setdefault(key[len("weight/"):])
  return list(names)


def _nonzero(value) -> bool:
  return isinstance(value, (int, float)) and abs(value) > 0  # NaN compares False: not a weight that was on


def plotted_components(train_records: list[dict]) -> list[str]:
  """The components whose curriculum weight is non-zero in some train record (the others never contribute)."""
  return [c for c in components(train_records) if any(_nonzero(r.get(f"weight/{c}")) for r in train_records)]


def _same(a, b) -> bool:
  """Equal values, where NaN equals NaN (a weight that stays NaN is no phase change)."""
  both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
  return both_nan or a == b


def phase_changes(train_records: list[dict]) -> list[int]:
  """Steps that start a curriculum phase: where any `weight/<c>` or the temperature differs from the record before.

  Args:
    train_records: train records in increasing step order (as `load_curves` returns them).

  Returns:
    the step of the first record that has each new value, in increasing order. A ramped curriculum
    (`curriculum.ramp_fraction > 0`) changes at every record of a ramp: only its first step counts.
  """
  keys = [f"weight/{c}" for c in components(train_records)] + list(_PHASE_KEYS)
  changed = [any(not _same(previous.get(k), current.get(k)) for k in keys)
             for previous, current in zip(train_records, train_records[1:])]
  return [train_records[i + 1]["step"] for i, change in enumerate(changed) if change and not (i and changed[i - 1])]


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the records that have it, values as float64 (non-numbers as NaN)."""
  steps_N, values_N = [], []
  for record in records:
    if key in record:
      value = record[key]
      steps_N.append(record["step"])
      values_N.append(float(value) if isinstance(value, (int, float)) else math.nan)
  return np.asarray(steps_N, np.int64), np.asarray(values_N, np.float64)


# ---------------------------------------------------------------------------------------------
# Drawing.

def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _finish(ax, *, extra_axes=()) -> None:
  """x label, grid, and one small legend over `ax` and any twin axes."""
  ax.set_xlabel("optimizer step")
  ax.grid(True, alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  for other in extra_axes:
    more_handles, more_labels = other.get_legend_handles_labels()
    handles, labels = handles + more_handles, labels + more_labels
  if handles:
    ax.legend(handles, labels, fontsize="small")


def _draw_loss_components(ax, train, names, colors) -> None:
  plotted_values = []
  for c in names:
    steps_N, loss_N = _series(train, f"loss/{c}")
    ax.plot(steps_N, loss_N, color=colors[c], label=c)
    plotted_values.append(loss_N)
  steps_N, loss_N = _series(train, "loss")
  ax.plot(steps_N, loss_N, color="black", linewidth=2.5, label="total loss")
  plotted_values.append(loss_N)
  finite_values = np.concatenate(plotted_values)
  finite_values = finite_values[np.isfinite(finite_values)]
  if finite_values.size and np.all(finite_values > 0):
    ax.set_yscale("log")
  elif np.any(finite_values != 0):
    # Linear below the smallest non-zero magnitude, so zeros (components switched off) still show.
    ax.set_yscale("symlog", linthresh=float(np.min(np.abs(finite_values[finite_values != 0]))))
  ax.set_ylabel("weighted loss")


def _draw_curriculum(ax, train, names, colors) -> None:
  for c in names:
    ax.plot(*_series(train, f"weight/{c}"), color=colors[c], drawstyle="steps-post", label=c)
  ax.set_ylabel("weight")
  for i, step in enumerate(phase_changes(train)):
    ax.axvline(step, color="grey", linestyle=":", linewidth=1.2, label="phase change" if i == 0 else None)
  twin_axes = ()
  steps_N, temperature_N = _series(train, "temperature")
  if steps_N.size:
    twin = ax.twinx()
    twin.plot(steps_N, temperature_N, color="dimgrey", linestyle="--", drawstyle="steps-post",
              label="KD temperature")
    twin.set_ylabel("KD temperature")
    twin_axes = (twin,)
  _finish(ax, extra_axes=twin_axes)


def _draw_learning_rate(ax, train) -> None:
  ax.plot(*_series(train, "lr"), color="C0", label="learning rate")
  ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
  ax.set_ylabel("learning rate")


def _draw_train_vs_eval(ax, curves, scratch_curves) -> None:
  train, evals = curves["train"], curves.get("eval", [])
  ax.plot(*_series(train, "loss"), color="C0", label="train loss")
  ax.plot(*_series(evals, "loss"), color="C1", marker="o", label="eval loss")
  steps_N, student_N = _series(evals, "student_lm_loss")
  if steps_N.size:
    ax.plot(steps_N, student_N, color="C2", marker="s", label="student LM loss (eval)")
  teacher_N = _series(evals, "teacher_lm_loss")[1]
  teacher_N = teacher_N[np.isfinite(teacher_N)]
  if teacher_N.size:  # the teacher is frozen: its loss on the eval set is one number
    ax.axhline(teacher_N[-1], color="C3", linestyle="--", label="teacher LM loss (eval)")
  if scratch_curves is not None:
    steps_N, scratch_N = _series(scratch_curves.get("eval", []), "student_lm_loss")
    if steps_N.size:
      ax.plot(steps_N, scratch_N, color="C4", marker="^", label="scratch student LM loss (eval)")
  ax.set_ylabel("loss")


def write_plot(workdir: str, out_path: str | None = None) -> tuple[str, list[str]]:
  """Draws the four panels of WORKDIR/metrics.jsonl into a PNG.

  Args:
    workdir: a run directory (holding metrics.jsonl, and optionally scratch/metrics.jsonl).
    out_path: the PNG to write; default WORKDIR/curves.png. Missing parent directories are created.

  Returns:
    (the PNG's path, the panel titles in order: left to right, top to bottom).

  Raises:
    JaxDistillError: no metrics.jsonl, a malformed line, no train records, or the PNG cannot be written.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  curves = load_curves(metrics_path)
  if not curves.get("train"):
    raise JaxDistillError(f"{metrics_path}: no train records yet; plot once the run has logged a step")
  scratch_path = os.path.join(workdir, "scratch", "metrics.jsonl")
  scratch_curves = load_curves(scratch_path) if os.path.isfile(scratch_path) else None
  out_path = out_path or os.path.join(workdir, "curves.png")

  train = curves["train"]
  names = plotted_components(train)
  colors = {c: f"C{i % 10}" for i, c in enumerate(components(train))}  # one color per component in both panels
  plt = _pyplot()
  fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, layout="constrained")
  loss_ax, curriculum_ax, lr_ax, eval_ax = axes.flat
  try:
    _draw_loss_components(loss_ax, train, names, colors)
    _draw_curriculum(curriculum_ax, train, names, colors)
    _draw_learning_rate(lr_ax, train)
    _draw_train_vs_eval(eval_ax, curves, scratch_curves)
    for ax, title in zip(axes.flat, PANEL_TITLES):
      ax.set_title(title)
      if ax is not curriculum_ax:  # the curriculum panel finished itself, twin axis included
        _finish(ax)
    fig.suptitle(f"{os.path.basename(os.path.normpath(os.path.abspath(workdir)))} — jaxdistill")
    if os.path.dirname(out_path):
      os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
  except OSError as e:
    raise JaxDistillError(f"{out_path}: cannot write the plot ({e.strerror or e})") from None
  finally:
    plt.close(fig)
  return out_path, [ax.get_title() for ax in axes.flat]


def main(argv) -> None:
  positionals = argv[1:]
  if len(positionals) != 1:
    raise CommandLineError(USAGE)
  out_path, _ = write_plot(positionals[0], flags.FLAGS.out)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
