"""Host-side metrics: token-weighted reduction, the log blocks, metrics.jsonl and TensorBoard."""

import json
import math
import os
import sys
from typing import Iterable

import numpy as np
from tqdm import tqdm

from jaxdistill.objective import COMPONENTS

# Metrics averaged over LM targets (next-token positions); all others over tokens.
_LABEL_WEIGHTED = ("raw/lm", "loss/lm", "student_lm_loss", "teacher_lm_loss")
_NOT_AVERAGED = ("opt_step", "count/tokens", "count/label_tokens", "student_ppl", "teacher_ppl")


class EvalReducer:
  """Accumulates eval-step metrics as sums weighted by token counts; `result()` gives the means."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.tokens = 0.0
    self.label_tokens = 0.0

  def add(self, metrics: dict) -> None:
    tokens, label_tokens = float(metrics["count/tokens"]), float(metrics["count/label_tokens"])
    self.tokens += tokens
    self.label_tokens += label_tokens
    self.opt_step = int(metrics["opt_step"])  # the same in every batch of one evaluation
    for key, value in metrics.items():
      if key in _NOT_AVERAGED or key.startswith("count/") or key.startswith("nonfinite/"):
        continue
      weight = label_tokens if key in _LABEL_WEIGHTED else tokens
      self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight

  def result(self) -> dict[str, float]:
    out = {k: v / max(self.label_tokens if k in _LABEL_WEIGHTED else self.tokens, 1.0) for k, v in self.sums.items()}
    # The total is recomputed from its parts so that it equals their sum exactly.
    out["loss"] = sum(out[f"loss/{c}"] for c in COMPONENTS)
    for model in ("student", "teacher"):  # no teacher in plain LM training
      if f"{model}_lm_loss" in out:
        out[f"{model}_ppl"] = math.exp(min(out[f"{model}_lm_loss"], 50.0))
    out["opt_step"] = self.opt_step
    out["count/tokens"] = self.tokens
    out["count/label_tokens"] = self.label_tokens
    return out


def log(message: str) -> None:
  """Prints a run block to stdout without breaking the progress bar (which lives on stderr)."""
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
    teacher = (f"  teacher ppl={metrics['teacher_ppl']:.2f}  KL(T=1)={metrics['kl_t1']:.4f}  "
               f"top-1 agreement={metrics['top1_agreement']:.3f}")
  return (f"[EVAL] step {step}: loss={metrics['loss']:.4f}  student ppl={metrics['student_ppl']:.2f} "
          f"(lm {metrics['student_lm_loss']:.4f}){teacher}  over {metrics['count/tokens']:.0f} tokens")


def _plain(value):
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else str(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _plain(value.item())
  return value


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


def read_records(path: str) -> Iterable[dict]:
  with open(path) as f:
    for line in f:
      if line.strip():
        yield json.loads(line)
