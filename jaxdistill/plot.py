"""Training curves of a run as one PNG.

    python -m jaxdistill.plot WORKDIR [--out PATH]

Reads WORKDIR/metrics.jsonl and writes WORKDIR/curves.png (or PATH), six panels that each draw like
with like: the weighted training objective (its components, and the total on train and eval: not an
LM loss); the curriculum (weights, KD temperature and the phase changes); the learning rate; the
held-out LM loss of the student against the teacher's (and, when WORKDIR/scratch/ holds the demo's
from-scratch baseline, that run's student); the teacher's NLL of the student's own samples; the
student-teacher KLs and top-1 agreement. Legends sit below their panels, and a series that never
changes gets an axis from 0 to twice its value. Only json, numpy and matplotlib are needed: no jax
import, so the command stays fast and works while a run is still training.
"""

from jaxdistill import cli

cli.quiet_environment()

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill.errors import CommandLineError, JaxDistillError  # noqa: E402


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing must not claim global flag names)."""
  flags.DEFINE_string("out", None, "PNG to write; default WORKDIR/curves.png.")

USAGE = "usage: python -m jaxdistill.plot WORKDIR [--out PATH]"
PANEL_TITLES = ("Training objective (weighted components)", "Curriculum: weights and KD temperature",
                "Learning rate", "Held-out LM loss: student vs teacher", "Student's samples scored by the teacher",
                "Student–teacher divergence (eval)")
FIGSIZE = (18.0, 11.0)  # inches
LEGEND_GAP_INCHES = 0.5  # from an axes' bottom edge to its legend: clears the x tick labels and the x label
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


def _is_flat(values_N: np.ndarray) -> bool:
  """Whether the finite values (at least one) are all the same, up to float32 rounding."""
  finite_N = values_N[np.isfinite(values_N)]
  return bool(finite_N.size) and np.ptp(finite_N) <= 1e-6 * np.max(np.abs(finite_N))


def _limit_flat(ax, values_N: np.ndarray) -> None:
  """For a series that never changes, y limits from 0 to twice its value (its line mid-height).

  matplotlib's default for a flat line is the value ± 4%, whose tick labels (0.96 ... 1.04 for a
  temperature of 1) suggest a variation that is not there.
  """
  if _is_flat(values_N):
    value = float(np.nanmean(values_N))
    ax.set_ylim(*((0.0, 2.0 * value) if value > 0 else (2.0 * value, 0.0) if value < 0 else (-1.0, 1.0)))


def _plot(ax, records: list[dict], key: str, source: str, **kwargs) -> np.ndarray:
  """Draws `key` of the records against their steps, the line's gid naming what it is ("eval:kl_t1"); its values."""
  steps_N, values_N = _series(records, key)
  if steps_N.size:
    ax.plot(steps_N, values_N, gid=f"{source}:{key}", **kwargs)
  return values_N


def _last_finite(records: list[dict], key: str) -> float | None:
  values_N = _series(records, key)[1]
  values_N = values_N[np.isfinite(values_N)]
  return float(values_N[-1]) if values_N.size else None


def _teacher_lm_key(evals: list[dict]) -> str:
  """The teacher's held-out LM loss per student token when the two tokenizers differ, else per its own token."""
  per_student_token = "teacher_lm_loss_per_student_token"
  return per_student_token if _last_finite(evals, per_student_token) is not None else "teacher_lm_loss"


def _draw_teacher_line(ax, evals: list[dict], label: str) -> np.ndarray:
  """The frozen teacher's held-out LM loss, one number, as a dashed horizontal line; its value (or none)."""
  key = _teacher_lm_key(evals)
  value = _last_finite(evals, key)
  if value is None:
    return np.zeros(0)
  ax.axhline(value, color="C3", linestyle="--", gid=f"eval:{key}", label=f"{label} = {value:.3f}")
  return np.asarray([value])


def _note(ax, text: str) -> None:
  """A grey line of text in the middle of a panel that has nothing to draw."""
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey", wrap=True)


def _finish(ax, *, extra_axes=()) -> None:
  """x label, grid, and one legend for `ax` and its twin axes, below the panel: it never covers a curve."""
  from matplotlib.transforms import ScaledTranslation

  ax.set_xlabel("optimizer step")
  ax.grid(True, alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  for other in extra_axes:
    more_handles, more_labels = other.get_legend_handles_labels()
    handles, labels = handles + more_handles, labels + more_labels
  if handles:
    # Anchored a fixed distance (in inches) under the axes' bottom edge, clear of the tick labels and the
    # x label whatever size the constrained layout gives the axes; the layout makes room for it.
    below_axes = ax.transAxes + ScaledTranslation(0.0, -LEGEND_GAP_INCHES, ax.figure.dpi_scale_trans)
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below_axes,
              ncol=min(len(handles), 2), fontsize="small", frameon=False)


def _draw_objective(ax, curves, names, colors) -> None:
  """The weighted training objective: its components and total on train, the total on eval."""
  train, evals = curves["train"], curves.get("eval", [])
  plotted_values = [_plot(ax, train, f"loss/{c}", "train", color=colors[c], label=c) for c in names]
  plotted_values.append(_plot(ax, train, "loss", "train", color="black", linewidth=2.5, label="objective (train)"))
  plotted_values.append(_plot(ax, evals, "loss", "eval", color="black", linestyle="none", marker="o",
                              markerfacecolor="white", label="objective (eval)"))
  finite_values = np.concatenate(plotted_values)
  finite_values = finite_values[np.isfinite(finite_values)]
  if finite_values.size and np.all(finite_values > 0):
    ax.set_yscale("log")
  elif np.any(finite_values != 0):
    # Linear below the smallest non-zero magnitude, so zeros (components switched off) still show.
    ax.set_yscale("symlog", linthresh=float(np.min(np.abs(finite_values[finite_values != 0]))))
  ax.set_ylabel("weighted objective (not an LM loss)")
  _finish(ax)


def _draw_curriculum(ax, train, names, colors) -> None:
  weights_N = np.concatenate([np.zeros(0)] + [
      _plot(ax, train, f"weight/{c}", "train", color=colors[c], drawstyle="steps-post", label=c) for c in names])
  _limit_flat(ax, weights_N)
  ax.set_ylabel("weight")
  for i, step in enumerate(phase_changes(train)):
    ax.axvline(step, color="grey", linestyle=":", linewidth=1.2, label="phase change" if i == 0 else None)
  twin_axes = ()
  temperature_N = _series(train, "temperature")[1]
  if temperature_N.size:
    twin = ax.twinx()
    label = f"KD temperature (constant T = {np.nanmean(temperature_N):g})" if _is_flat(temperature_N) else \
        "KD temperature"
    _plot(twin, train, "temperature", "train", color="dimgrey", linestyle="--", drawstyle="steps-post", label=label)
    _limit_flat(twin, temperature_N)
    twin.set_ylabel("KD temperature")
    twin_axes = (twin,)
  _finish(ax, extra_axes=twin_axes)


def _draw_learning_rate(ax, train) -> None:
  lr_N = _series(train, "lr")[1]
  label = f"learning rate (constant {np.nanmean(lr_N):.3g})" if _is_flat(lr_N) else "learning rate"
  _limit_flat(ax, _plot(ax, train, "lr", "train", color="C0", label=label))
  ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
  ax.set_ylabel("learning rate")
  _finish(ax)


def _perplexity(lm_loss_N):
  with np.errstate(over="ignore"):
    return np.exp(lm_loss_N)


def _lm_loss(perplexity_N):
  with np.errstate(divide="ignore", invalid="ignore"):  # the axis' lower limit may be <= 0 in perplexity
    return np.log(perplexity_N)


def _draw_held_out_lm_loss(ax, curves, scratch_curves) -> None:
  """Like with like: the students' and the teacher's LM loss on the same held-out text (right axis: perplexity)."""
  evals = curves.get("eval", [])
  teacher_key = _teacher_lm_key(evals)
  student_label = "distilled student" if _last_finite(evals, teacher_key) is not None else "student"  # plain LM
  plotted_values = [
      _plot(ax, evals, "student_lm_loss", "eval", color="C2", marker="s", label=student_label),
      _draw_teacher_line(ax, evals, "teacher (frozen)" if teacher_key == "teacher_lm_loss" else
                         "teacher (frozen), per student token")]
  if scratch_curves is not None:
    plotted_values.append(_plot(ax, scratch_curves.get("eval", []), "student_lm_loss", "scratch-eval", color="C4",
                                marker="^", label="student trained from scratch"))
  values_N = np.concatenate(plotted_values)
  if not np.isfinite(values_N).any():
    _note(ax, "no evaluation yet")
  else:
    _limit_flat(ax, values_N)
    ax.secondary_yaxis("right", functions=(_perplexity, _lm_loss)).set_ylabel("perplexity")
  ax.set_ylabel("held-out LM loss (nats/token)")
  _finish(ax)


def _draw_samples(ax, curves) -> None:
  """The teacher's NLL of the student's own samples, beside its NLL of the held-out text (both teacher NLLs)."""
  evals = curves.get("eval", [])
  sample_nll_N = _plot(ax, evals, "samples/teacher_nll", "eval", color="C1", marker="D",
                       label="teacher NLL of the student's samples")
  if not np.isfinite(sample_nll_N).any():
    _note(ax, "no student samples evaluated\n(on_policy.eval_samples is off, or no teacher)")
  else:
    reference_N = _draw_teacher_line(ax, evals, "teacher NLL of the held-out text")
    _limit_flat(ax, np.concatenate([sample_nll_N, reference_N]))
  ax.set_ylabel("teacher NLL (nats/token)")
  _finish(ax)


def _draw_divergence(ax, curves) -> None:
  """How far the student is from the teacher: the two KLs at T = 1 and (right axis) top-1 agreement."""
  evals = curves.get("eval", [])
  kl_N = np.concatenate([
      _plot(ax, evals, "kl_t1", "eval", color="C5", marker="o", label="KL(teacher‖student), held-out text"),
      _plot(ax, evals, "samples/reverse_kl", "eval", color="C1", marker="D",
            label="KL(student‖teacher), student's samples")])
  twin_axes = ()
  agreement_N = _series(evals, "top1_agreement")[1]
  if np.isfinite(agreement_N).any():
    twin = ax.twinx()
    _plot(twin, evals, "top1_agreement", "eval", color="C9", linestyle=":", marker="x", label="top-1 agreement")
    twin.set_ylim(0.0, 1.0)
    twin.set_ylabel("top-1 agreement")
    twin_axes = (twin,)
  if not np.isfinite(kl_N).any() and not twin_axes:
    _note(ax, "no teacher in the evaluation")
  _limit_flat(ax, kl_N)
  ax.set_ylabel("KL at T = 1 (nats/token)")
  _finish(ax, extra_axes=twin_axes)


def draw_curves(curves: dict[str, list[dict]], scratch_curves: dict[str, list[dict]] | None = None,
                title: str = ""):
  """The figure of a run's curves: six panels (`PANEL_TITLES`, left to right, top to bottom), x axes shared.

  Each line's gid names what it draws as "<source>:<metric>" ("train:loss", "eval:student_lm_loss",
  "scratch-eval:student_lm_loss"), so a test can tell which series landed in which panel.

  Args:
    curves: split -> records, as `load_curves` returns them; must hold train records.
    scratch_curves: the same for the from-scratch baseline run, or None.
    title: the figure's title.

  Returns:
    the matplotlib Figure (Agg backend); the caller closes it.
  """
  train = curves["train"]
  names = plotted_components(train)
  colors = {c: f"C{i % 10}" for i, c in enumerate(components(train))}  # one color per component in both panels
  plt = _pyplot()
  fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI, layout="constrained")
  objective_ax, curriculum_ax, lr_ax, lm_ax, samples_ax, divergence_ax = axes.flat
  for ax, panel_title in zip(axes.flat, PANEL_TITLES):
    ax.set_title(panel_title)
    if ax is not objective_ax:  # keeping tick labels on every panel (unlike subplots(sharex=True))
      ax.sharex(objective_ax)
  try:
    _draw_objective(objective_ax, curves, names, colors)
    _draw_curriculum(curriculum_ax, train, names, colors)
    _draw_learning_rate(lr_ax, train)
    _draw_held_out_lm_loss(lm_ax, curves, scratch_curves)
    _draw_samples(samples_ax, curves)
    _draw_divergence(divergence_ax, curves)
    fig.suptitle(title)
  except BaseException:
    plt.close(fig)
    raise
  return fig


def write_plot(workdir: str, out_path: str | None = None) -> tuple[str, list[str]]:
  """Draws the panels of WORKDIR/metrics.jsonl into a PNG (`draw_curves`).

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

  title = f"{os.path.basename(os.path.normpath(os.path.abspath(workdir)))} — jaxdistill"
  fig = draw_curves(curves, scratch_curves, title)
  plt = _pyplot()
  try:
    if os.path.dirname(out_path):
      os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
  except OSError as e:
    raise JaxDistillError(f"{out_path}: cannot write the plot ({e.strerror or e})") from None
  finally:
    plt.close(fig)
  return out_path, [ax.get_title() for ax in fig.axes[:len(PANEL_TITLES)]]  # the twins come after


def main(argv) -> None:
  positionals = argv[1:]
  if len(positionals) != 1:
    raise CommandLineError(USAGE)
  out_path, _ = write_plot(positionals[0], flags.FLAGS.out)
  print(f"wrote {out_path}")


def console_main() -> None:
  """`jaxdistill-plot`, the console script pip installs: the same as `python -m jaxdistill.plot`."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  console_main()
