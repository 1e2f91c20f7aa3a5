"""Host-side metrics: token-weighted reduction, the log blocks, metrics.jsonl and TensorBoard."""

import json
import math
import os
import sys

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
  """Prints a run block to stdout without breaking the progress bar (on stderr); process 0 only."""
  if is_main_process():
    tqdm.write(message, file=sys.stdout)


def curriculum_block(step: int, total_steps: int, split: str, metrics: dict) -> str:
  weights = "  ".join(f"{c}={metrics[f'weight/{c}']:.4g}" for c in COMPONENTS)
  return (f"[CURRICULUM] {split} step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)  "
          f"temperature={metrics['temperature']:.4g}  router top_k={metrics['router/top_k']:.0f} "
          f"temperature={metrics['router/temperature']:.3g}\n  weights: {weights}")


def debug_block(step: int, metrics: dict) -> str:
  lines = [f"[TRAIN DEBUG] step {step}", f"  {'component':30s} {'raw':>12s} {'weight':>9s} {'weighted':>12s}"]
  for c in COMPONENTS:
    lines.append(f"  {c:30s} {metrics[f'raw/{c}']:12.6g} {metrics[f'weight/{c}']:9.4g} {metrics[f'loss/{c}']:12.6g}")
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
