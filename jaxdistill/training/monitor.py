"""Run monitor: the health checks an operator would otherwise make by hand.

It watches host-side numbers the loop already has (cumulative counters from the state, logged
losses, evaluation results), prints a warning when one trips and summarises them at the end. Its
state is plain JSON, saved in every checkpoint so a resumed run keeps watching where it was.
Divergence is not a warning: `divergence` names it, and the trainer stops the run with `Diverged`.
"""

import dataclasses
import math
import re

from jaxdistill.errors import JaxDistillError
from jaxdistill.objective import REGISTRY


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  nonfinite_fraction: float = 0.01   # warn when a component is non-finite in more than this share of batches
  plateau_steps: int = 1000          # warn when the training loss has not improved for this many steps
  eval_train_ratio: float = 5.0      # warn when eval loss > this x the recent training loss
  diverged_steps: int = 100          # stop the run (exit 3) when this many optimizer steps in a row were all
                                     # skipped for non-finite gradients (and on any non-finite loss)


class Diverged(JaxDistillError):
  """The run diverged: it stops with exit code 3 and keeps its last good checkpoint."""
  exit_code = 3

  def __init__(self, step: int, reason: str, last_good: str | None, optim, dtype: str):
    kept = f"the last good checkpoint is {last_good} (kept)" if last_good else "no checkpoint was kept"
    fp16 = "; with float16 compute, use bfloat16 or float32 (student.dtype)" if dtype == "float16" else ""
    super().__init__(f"training diverged at step {step}: {reason}; nothing was exported and {kept}. Lower "
                     f"optim.learning_rate (now {optim.learning_rate:g}) or optim.clip_norm (now {optim.clip_norm:g}), "
                     f"or raise optim.warmup_steps (now {optim.warmup_steps}){fp16}")


class RunMonitor:
  """Trips warnings once per condition (again only after it clears) and keeps a tally for the summary."""

  def __init__(self, cfg: MonitorConfig, state: dict | None = None):
    self.cfg = cfg
    state = state or {}
    best = state.get("best_loss")
    self.best_loss = math.inf if best is None else best
    self.best_step = state.get("best_step", 0)
    self.tripped = dict(state.get("tripped", {}))  # condition -> times it tripped
    self.active = set(state.get("active", []))
    self.last_skipped = state.get("last_skipped", 0)

  def state_dict(self) -> dict:
    return {"best_loss": self.best_loss if math.isfinite(self.best_loss) else None, "best_step": self.best_step,
            "tripped": self.tripped, "active": sorted(self.active), "last_skipped": self.last_skipped}

  def _trip(self, key: str, condition: bool, message: str) -> list[str]:
    if not condition:
      self.active.discard(key)
      return []
    if key in self.active:
      return []
    self.active.add(key)
    self.tripped[key] = self.tripped.get(key, 0) + 1
    return [f"[MONITOR] {message}"]

  def on_train(self, opt_step: int, batches: int, counters: dict[str, int], loss: float,
               fp16: bool) -> list[str]:
    """Checks after a logged training step; `counters` are the state's cumulative non-finite counts."""
    if math.isfinite(loss) and loss < self.best_loss:
      self.best_loss, self.best_step = loss, opt_step
    warnings = []
    for name, count in counters.items():
      if name == "grads":
        continue
      share = count / max(batches, 1)
      warnings += self._trip(f"nonfinite/{name}", share > self.cfg.nonfinite_fraction,
                             f"{name} was non-finite in {count} of {batches} batches ({share:.1%} > "
                             f"{self.cfg.nonfinite_fraction:.0%}); those values were replaced by 0")
    stalled = opt_step - self.best_step
    warnings += self._trip("plateau", stalled >= self.cfg.plateau_steps,
                           f"training loss has not improved for {stalled} steps (best {self.best_loss:.4f} at "
                           f"step {self.best_step})")
    skipped = counters.get("grads", 0)
    new_skips = skipped - self.last_skipped
    self.last_skipped = skipped
    what = "fp16 overflow: " if fp16 else ""
    warnings += self._trip("skipped", new_skips > 0,
                           f"{what}{new_skips} update(s) skipped for non-finite gradients ({skipped} in total)")
    return warnings

  def divergence(self, loss: float, skipped_streak: int, accumulation: int) -> str | None:
    """Why the run has diverged, or None: a non-finite training loss, or `diverged_steps` skipped in a row.

    `skipped_streak`: micro-batches in a row whose gradients were non-finite (the state's counter).
    """
    if not math.isfinite(loss):
      return f"the training loss is {loss}"
    steps = skipped_streak // accumulation
    if steps >= self.cfg.diverged_steps:
      return (f"the updates of the last {steps} optimizer steps were all skipped for non-finite gradients "
              f"(monitor.diverged_steps={self.cfg.diverged_steps})")
    return None

  def on_eval(self, eval_loss: float, train_loss: float) -> list[str]:
    ratio = eval_loss / train_loss if train_loss > 0 else math.inf
    return self._trip("eval_gap", ratio > self.cfg.eval_train_ratio,
                      f"eval loss {eval_loss:.4f} is {ratio:.1f}x the training loss {train_loss:.4f} "
                      f"(> {self.cfg.eval_train_ratio:g}x): overfitting or a train/eval mismatch")

  def summary(self) -> str:
    if not self.tripped:
      return "[MONITOR] no warnings"
    return "[MONITOR] warnings this run: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.tripped.items()))


_OOM_BYTES = re.compile(r"allocate ([0-9.]+\s*[KMGT]?i?B|[0-9]+ bytes)", re.IGNORECASE)


def out_of_memory_message(error: Exception, batch_size: int, seq_len: int, accumulation: int) -> str | None:
  """A user-facing message for an XLA out-of-memory error, or None if `error` is something else."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
    return None
  asked = _OOM_BYTES.search(text)
  amount = f" while allocating {asked.group(1)}" if asked else ""
  return (f"out of device memory{amount} at micro-batch {batch_size} x {seq_len} tokens. Lower "
          f"data.batch_size (raise optim.accumulation_steps={accumulation} to keep the tokens per step), "
          f"data.seq_len or distill.chunk_size; use bfloat16/float16 compute (student.dtype, teacher.dtype) "
          f"or a bfloat16 teacher (teacher.param_dtype); or switch off the losses that read attention maps or "
          f"expert outputs ({', '.join(_map_entries())}).")


def _map_entries() -> list[str]:
  """The curriculum entries of the components that read attention rows or experts' outputs (registry order)."""
  entries = [f"curriculum.{c.entry.name}" for c in REGISTRY if c.needs.attention or c.needs.experts]
  return list(dict.fromkeys(entries))
