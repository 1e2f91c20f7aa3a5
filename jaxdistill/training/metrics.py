"""Host-side metrics: token-weighted reduction, the log blocks, progress, metrics.jsonl and TensorBoard."""

import contextlib
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from jaxdistill.objective import COMPONENTS
from jaxdistill.parallel import is_main_process

# The counts each metric is a mean over, the first one present (older eval steps lack the later counts);
# all others are means over (student) tokens.
_LABELS = ("count/label_tokens",)
_WEIGHTS = {"raw/lm": _LABELS, "loss/lm": _LABELS, "student_lm_loss": _LABELS,
            "teacher_lm_loss": ("count/teacher_label_tokens",) + _LABELS,
            "kl_t1": ("count/pairs", "count/tokens"), "top1_agreement": ("count/pairs", "count/tokens"),
            "samples/teacher_nll": ("count/sample_tokens",), "samples/reverse_kl": ("count/sample_tokens",)}
_NOT_AVERAGED = ("opt_step", "student_ppl", "teacher_ppl")


class EvalReducer:
  """Accumulates eval-step metrics as sums weighted by their token counts; `result()` gives the means.

  Each metric is weighted by the count it is a mean over (`_WEIGHTS`: LM targets, the teacher's LM targets,
  aligned pairs; student tokens otherwise). With two tokenizers the teacher's perplexity per its own token
  is not comparable with the student's, so `result()` adds `teacher_ppl_per_student_token`: the teacher's
  total loss over the split divided by the student's LM targets there (the two cover the same text).
  """

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.counts: dict[str, float] = {}

  def _weight(self, key: str, metrics: dict) -> float:
    counts = _WEIGHTS.get(key, ("count/tokens",))
    return float(metrics[next((c for c in counts if c in metrics), "count/tokens")])

  def add(self, metrics: dict) -> None:
    self.opt_step = int(metrics["opt_step"])  # the same in every batch of one evaluation
    for key, value in metrics.items():
      if key.startswith("count/"):
        self.counts[key] = self.counts.get(key, 0.0) + float(value)
      elif key not in _NOT_AVERAGED and not key.startswith("nonfinite/"):
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * self._weight(key, metrics)

  def result(self) -> dict[str, float]:
    out = {k: v / max(self._weight(k, self.counts), 1.0) for k, v in self.sums.items()}
    # The total is recomputed from its parts so that it equals their sum exactly.
    out["loss"] = sum(out[f"loss/{c}"] for c in COMPONENTS)
    for model in ("student", "teacher"):  # no teacher in plain LM training
      if f"{model}_lm_loss" in out:
        out[f"{model}_ppl"] = _ppl(out[f"{model}_lm_loss"])
    if "count/pairs" in self.counts:
      per_student_token = self.sums["teacher_lm_loss"] / max(self.counts["count/label_tokens"], 1.0)
      out["teacher_lm_loss_per_student_token"] = per_student_token
      out["teacher_ppl_per_student_token"] = _ppl(per_student_token)
    out["opt_step"] = self.opt_step
    out.update(self.counts)
    return out


def _ppl(loss: float) -> float:
  return math.exp(min(loss, 50.0))


def log(message: str) -> None:
  """Prints a run block to stdout without breaking the progress bar (on stderr); process 0 only.

  Flushed at once: a redirected stdout is block-buffered, and a log file should follow the run.
  """
  if is_main_process():
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def clock(seconds: float) -> str:
  """A duration as H:MM:SS, or M:SS under an hour, to the nearest second."""
  minutes, secs = divmod(int(seconds + 0.5), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepTimer:
  """Wall-clock times of this process's optimizer steps, from `start_step` (0, or the step a run resumed at).

  The first step includes compiling the train step, so the rate and the ETA are measured from its end on;
  `left_out` seconds after it (the first evaluation, which compiles the eval step) do not count either.
  """

  def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, now: float):
    self.start_step, self.total_steps, self.tokens_per_step = start_step, total_steps, tokens_per_step
    self.started = now
    self.first_done: float | None = None  # when the first step (with its compilation) ended
    self.left_out = 0.0

  @property
  def first_step(self) -> int:
    return self.start_step + 1

  def tick(self, step: int, now: float) -> None:
    if step == self.first_step:
      self.first_done = now

  def compile_s(self) -> float:
    """The first step's seconds, compilation included."""
    return self.first_done - self.started

  def seconds_per_step(self, step: int, now: float) -> float | None:
    """The mean over the steps after the first (evaluations and checkpoints included); None before there is one."""
    steps = step - self.first_step
    return (now - self.first_done - self.left_out) / steps if steps > 0 and self.first_done is not None else None

  def eta(self, step: int, now: float) -> float | None:
    per_step = self.seconds_per_step(step, now)
    return None if per_step is None else per_step * (self.total_steps - step)

  def tokens_per_s(self, step: int, now: float) -> float | None:
    per_step = self.seconds_per_step(step, now)
    return None if per_step is None else self.tokens_per_step / max(per_step, 1e-9)


def _progress_parts(timer: StepTimer, step: int, metrics: dict | None, now: float) -> list[str]:
  """Loss and learning rate (when known), then tokens/s from the steps after the first (once there are some)."""
  parts = [f"loss={metrics['loss']:.4f}", f"lr={metrics['lr']:.2e}"] if metrics else []
  tokens_per_s = timer.tokens_per_s(step, now)
  return parts + ([f"{tokens_per_s:,.0f} tok/s"] if tokens_per_s is not None else [])


def _eta(timer: StepTimer, step: int, now: float) -> list[str]:
  eta = timer.eta(step, now)
  return [f"ETA {clock(eta)}"] if eta is not None else []


def train_line(timer: StepTimer, step: int, metrics: dict | None, now: float) -> str:
  """The plain `[TRAIN]` progress line that stands in for the bar in a log file: short, no carriage return."""
  total = timer.total_steps
  parts = [f"[TRAIN] step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)",
           *_progress_parts(timer, step, metrics, now), f"elapsed {clock(now - timer.started)}",
           *_eta(timer, step, now)]
  if step == timer.first_step:
    parts.append(f"step {step} took {timer.compile_s():.1f} s with compilation (not in the ETA)")
  return "  ".join(parts)


class Progress:
  """A run's progress: a tqdm bar when `bar` (stderr a terminal and `log.progress_bar`), else a `[TRAIN]` line
  at the first step (it says its compile time), the second (the first rate), every `every` steps and the last.
  Process 0 shows it.

  Neither counts compilation in its rate or ETA: the first step, the first evaluation (`evaluating`). tqdm's own
  rate and ETA are left out of the bar.
  `update(step, metrics)` takes the step's loss and lr: always at the steps `wants_metrics` names, else None
  or a training record; the bar shows the last it was given.
  """

  _BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

  def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, every: int, bar: bool,
               now=time.perf_counter):
    self.now, self.every, self.plain = now, every, not bar
    self.timer = StepTimer(start_step, total_steps, tokens_per_step, now())
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                    bar_format=self._BAR_FORMAT) if bar and is_main_process() else None
    self.last_metrics: dict | None = None
    self.evaluated = False

  @contextlib.contextmanager
  def evaluating(self):
    """Around an evaluation: the first one compiles the eval step, so its time is left out of the rate."""
    start = self.now()
    yield
    if not self.evaluated:
      self.timer.left_out += self.now() - start
      self.evaluated = True

  def wants_metrics(self, step: int) -> bool:
    """The steps whose loss and lr are shown: the first (on the bar too), and those of a `[TRAIN]` line."""
    first = self.timer.first_step
    due = step == first + 1 or step % self.every == 0 or step == self.timer.total_steps
    return step == first or (self.plain and due)

  def update(self, step: int, metrics: dict | None) -> None:
    now = self.now()
    self.timer.tick(step, now)
    self.last_metrics = metrics or self.last_metrics
    if self.bar is not None:  # process 0 of a bar run
      parts = _progress_parts(self.timer, step, self.last_metrics, now) + _eta(self.timer, step, now)
      compiled = f"step {self.timer.first_step} with compilation {self.timer.compile_s():.1f} s"
      self.bar.set_postfix_str(", ".join(parts + [compiled]), refresh=False)
      self.bar.update(1)
    elif self.plain and self.wants_metrics(step):
      log(train_line(self.timer, step, metrics, now))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def curriculum_block(step: int, total_steps: int, split: str, metrics: dict) -> str:
  weights = "  ".join(f"{c}={metrics[f'weight/{c}']:.4g}" for c in COMPONENTS)
  return (f"[CURRICULUM] {split} step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)  "
          f"temperature={metrics['temperature']:.4g}  router top_k={metrics['router/top_k']:.0f} "
          f"temperature={metrics['router/temperature']:.3g}\n  weights: {weights}")


def debug_block(step: int, metrics: dict, active: Sequence[str] = COMPONENTS) -> str:
  """Raw, weight and weighted value of each component, and whether the weighted ones sum to the loss.

  `active`: the components the objective weighs at some step. The others (weight 0 throughout the run) are
  hidden while their values are all 0, and named on one line; the sum is checked over every component.
  """
  shown = [c for c in COMPONENTS if c in active or any(metrics[f"{k}/{c}"] for k in ("raw", "weight", "loss"))]
  hidden = [c for c in COMPONENTS if c not in shown]
  lines = [f"[TRAIN DEBUG] step {step}", f"  {'component':30s} {'raw':>12s} {'weight':>9s} {'weighted':>12s}"]
  for c in shown:
    lines.append(f"  {c:30s} {metrics[f'raw/{c}']:12.6g} {metrics[f'weight/{c}']:9.4g} {metrics[f'loss/{c}']:12.6g}")
  if hidden:
    plural = "s" if len(hidden) > 1 else ""
    lines.append(f"  ({len(hidden)} component{plural} with weight 0 hidden: {', '.join(hidden)})")
  parts = sum(metrics[f"loss/{c}"] for c in COMPONENTS)
  match = "match" if math.isclose(parts, metrics["loss"], rel_tol=1e-5, abs_tol=1e-6) else "MISMATCH"
  lines.append(f"  sum of weighted = {parts:.6g}   total loss = {metrics['loss']:.6g}   ({match})")
  return "\n".join(lines)


def eval_block(step: int, metrics: dict) -> str:
  teacher = ""
  if "teacher_ppl" in metrics:
    own = metrics.get("teacher_ppl_per_student_token")
    teacher = (f"  teacher ppl={metrics['teacher_ppl']:.2f}"
               + (f" ({own:.2f} per student token)" if own is not None else "") +
               f"  KL(T=1)={metrics['kl_t1']:.4f}  "
               f"top-1 agreement={metrics['top1_agreement']:.3f}")
  samples = ""
  if "samples/teacher_nll" in metrics:
    samples = (f"\n  student samples: teacher NLL={metrics['samples/teacher_nll']:.4f}  "
               f"reverse KL={metrics['samples/reverse_kl']:.4f}  over {metrics['count/sample_tokens']:.0f} tokens")
  return (f"[EVAL] step {step}: loss={metrics['loss']:.4f}  student ppl={metrics['student_ppl']:.2f} "
          f"(lm {metrics['student_lm_loss']:.4f}){teacher}  over {metrics['count/tokens']:.0f} tokens{samples}")


def _plain(value):
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else str(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _plain(value.item())
  return value


class NullWriter:
  """What processes other than 0 write metrics to: nothing (every process holds the same values)."""

  def write(self, step: int, split: str, metrics: dict) -> None:
    del step, split, metrics

  def close(self) -> None:
    pass


class MetricWriter:
  """One JSON object per line in WORKDIR/metrics.jsonl, and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", buffering=1)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # light: no TensorFlow needed

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key not in ("step", "split") and isinstance(value, (int, float)):
          self._tb.add_scalar(f"{split}/{key}", value, int(step))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
