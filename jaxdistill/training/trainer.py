"""The training loop: `train_and_evaluate(cfg, workdir, resume)`.

Builds tokenizer, data, teacher, student and state; resumes from the workdir's newest good
checkpoint (or `resume`); runs micro-batches through the compiled `train_step`; logs, evaluates,
checkpoints and monitors on optimizer-step boundaries; writes an emergency checkpoint when
interrupted; exports the student in Hugging Face format at the end.
"""

import os
import signal
import sys
import textwrap
import time

import jax
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import parallel, workdir_lock
from jaxdistill.config import fingerprint
from jaxdistill.data.pipeline import DataPipeline
from jaxdistill.errors import ConfigError, JaxDistillError
from jaxdistill.models import save_pretrained
from jaxdistill.objective import COMPONENTS, ENTRIES, offline_teacher
from jaxdistill.training import checkpoint as ckpt
from jaxdistill.training import metrics as metrics_lib
from jaxdistill.training.build import build_run, build_teacher_tokenizer, build_tokenizer, check_cross_vocab_objective
from jaxdistill.training.metrics import log
from jaxdistill.training.monitor import Diverged, RunMonitor, out_of_memory_message
from jaxdistill.training.steps import StepSetup, compile_steps


class Interrupted(JaxDistillError):
  """SIGTERM or Ctrl-C: the run stopped after an emergency checkpoint."""

  def __init__(self, signum: int):
    self.exit_code = 128 + signum
    super().__init__(f"stopped by {signal.Signals(signum).name}")


class _StopFlag:
  """SIGTERM and the first Ctrl-C ask the loop to stop after the current step; a second Ctrl-C aborts."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)



def _host(tree) -> dict:
  return {k: np.asarray(v).item() for k, v in jax.device_get(tree).items()}


def _device_memory() -> dict:
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"memory/bytes_in_use": stats["bytes_in_use"]} if "bytes_in_use" in stats else {}


def _param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _model_line(model, params) -> str:
  cfg = model.config
  return (f"{model.path or 'random ' + cfg.family}  {_param_count(params):,} params  {cfg.num_layers} layers  "
          f"{cfg.param_dtype}/{cfg.dtype}")


def _curriculum_rows(cur) -> list[str]:
  """One row per phase: the weight of every entry that is not 0 in every phase (registry order), and T."""
  phases = ["0"] + [f"{b:.0%}" for b in cur.boundaries]
  entries = [e.name for e in ENTRIES if cur.enabled(e.name)]
  rows = []
  for i, start in enumerate(phases):
    weights = "  ".join(f"{name}={cur.values(name)[i]:g}" for name in entries)
    rows.append(f"    phase {i + 1} from {start:>4s}: {weights}  T={cur.temperature[i]:g}")
  return rows


_RUN_WIDTH = 150  # a longer [RUN] line wraps at its spaces, under the labels: a log file's lines stay short


def _wrapped(line: str) -> str:
  """`line`, broken at spaces into lines of at most `_RUN_WIDTH` (a longer word stays whole), indented under labels."""
  return "\n".join(textwrap.wrap(line, _RUN_WIDTH, subsequent_indent=" " * 12, break_long_words=False,
                                 break_on_hyphens=False))


def _summary(cfg, teacher, student, state, data, setup: StepSetup, total_steps: int, start_step: int,
             plan: parallel.MeshPlan, offline: offline_teacher.RunRecords | None = None) -> str:
  accumulation = setup.optim.accumulation_steps
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * accumulation
  device = jax.local_devices()[0]
  loss_scaling = "  (fp16 dynamic loss scaling)" if setup.dynamic_loss_scale else ""
  if teacher is None:
    models = [f"  model   : {_model_line(student, state.params['student'])}{loss_scaling}"]
    objective = ["  objective: plain LM cross-entropy (mode 'lm': no teacher)"]
  else:
    models = [f"  teacher : {_model_line(teacher, teacher.params)}",
              f"  student : {_model_line(student, state.params['student'])}{loss_scaling}"]
    objective = ["  curriculum:", *_curriculum_rows(setup.objective.curriculum)]
    sampled = setup.objective.on_policy
    if sampled.enabled:
      divergence = sampled.divergence + (f" (beta {sampled.jsd_beta:g})" if sampled.divergence == "jsd" else "")
      start = f" from {sampled.start:.0%} of training" if sampled.start else ""
      objective.append(f"  sampled : {sampled.fraction:.0%} of micro-batches{start}: {sampled.prompt_length} tokens "
                       f"of a row + {sampled.completion_length} sampled from the {sampled.source} at temperature "
                       f"{sampled.temperature:g}; loss {divergence} at T=1 on the sampled tokens")
    if offline is not None:
      store = offline.store
      objective.append(f"  offline teacher: top-{setup.objective.offline_top_k} logits, "
                       f"{store.bytes_per_token:,.0f} bytes per token, {store.rows_filled:,} of {store.num_rows:,} "
                       f"rows recorded in {store.directory}")
  return "\n".join(_wrapped(line) for line in [
      "[RUN]",
      f"  devices : {jax.device_count()} x {device.platform} ({device.device_kind}); mesh {plan.describe()}",
      *models,
      f"  data    : {data.summary()}",
      f"  steps   : {total_steps:,} optimizer steps x {accumulation} micro-batches of {cfg.data.batch_size} = "
      f"{tokens_per_step:,} tokens per step; {data.batches_per_epoch // accumulation:,} steps per epoch"
      + (f"; resuming at step {start_step:,}" if start_step else ""),
      *objective,
  ])


def _drill(batch: dict, micro_step: int, debug) -> dict:
  """Adds the `inject_nonfinite` vector when a debug drill is configured (every batch, to keep one shape).

  Micro-batches inject_every - 1, 2 * inject_every - 1, ... are poisoned: 1 in inject_every of any prefix.
  """
  if not debug.inject_nonfinite:
    return batch
  inject = np.zeros(len(COMPONENTS), np.float32)
  if (micro_step + 1) % debug.inject_every == 0:
    inject[COMPONENTS.index(debug.inject_nonfinite)] = np.nan
  return {**batch, "inject_nonfinite": inject}


def train_and_evaluate(cfg: config_lib.Config, workdir: str, resume: str | None = None,
                       data_cache: str | None = None, devices=None) -> dict:
  """Runs one training run, holding the workdir's lock; returns the final evaluation metrics.

  `resume`: a checkpoint path or None. `data_cache`: where packed data is cached (default
  WORKDIR/data_cache; the cache key covers everything the arrays depend on, so runs may share one).
  `devices`: the devices the mesh spans (default: every device of the run, `jax.devices()`).
  """
  parallel.initialize(cfg.mesh)  # multi-host: joins the cluster before anything touches a device
  plan = parallel.MeshPlan(cfg.mesh, devices)  # checked before anything is written
  plan.check_batch_size(cfg.data.batch_size)
  if jax.process_count() > 1 and cfg.offline_teacher.top_k:
    raise ConfigError("offline_teacher.top_k", cfg.offline_teacher.top_k,
                      "0 in a multi-process run (records are kept by a single process)")
  with workdir_lock.hold(workdir, enabled=parallel.is_main_process()):
    return _train_and_evaluate(cfg, workdir, resume, data_cache, plan)


def _restore(cfg, checkpointer: ckpt.Checkpointer, resume: str | None, state, data) -> tuple[object, dict]:
  """(state, meta) of the checkpoint this run continues, or the fresh `state`; meta holds this run's fingerprint.

  The checkpoint must be of this run (its fingerprint, see `fingerprint.check`), and so must the
  workdir's own checkpoints when `resume` names another: this run's saves would rotate them away.
  """
  run_fingerprint = fingerprint.of_run(cfg, data.identity, ckpt.abstract(state))
  allow = fingerprint.allowed_changes(cfg.train.allow_config_change)

  def accept(meta: dict, name: str) -> None:
    for change in fingerprint.check(meta.get("fingerprint"), run_fingerprint, allow, name):
      log(f"[RESUME] {change.field}: {change.saved!r} -> {change.now!r} (allowed)")

  if resume:
    own = checkpointer.newest_meta()
    if own is not None:
      fingerprint.check(own[0].get("fingerprint"), run_fingerprint, allow, own[1])
    restored = ckpt.restore_path(resume, ckpt.abstract(state), accept)
  elif checkpointer.has_checkpoints():
    restored = checkpointer.restore_latest(ckpt.abstract(state), accept)
  else:
    return state, {"fingerprint": run_fingerprint}
  return restored.state, {**restored.meta, "fingerprint": run_fingerprint}


def _train_and_evaluate(cfg: config_lib.Config, workdir: str, resume: str | None, data_cache: str | None,
                        plan: parallel.MeshPlan) -> dict:
  loop = _Loop(cfg, workdir, resume, data_cache, plan)
  loop.train()
  return loop.finish()


class _Loop:
  """One run's parts and bookkeeping: built in __init__, stepped by `train`, exported by `finish`.

  Everything a checkpoint's meta carries besides the state (micro-batch, monitor, best metric and the
  evaluations since it improved) lives here, so an emergency save writes exactly what a periodic one does.
  """

  def __init__(self, cfg: config_lib.Config, workdir: str, resume: str | None, data_cache: str | None,
               plan: parallel.MeshPlan):
    os.makedirs(workdir, exist_ok=True)
    self.cfg, self.workdir, self.plan = cfg, workdir, plan
    self.distill = cfg.mode == "distill"  # otherwise plain LM training: no teacher at all
    self.tokenizer = build_tokenizer(cfg)
    # None: one tokenizer. In plain LM training a named teacher tokenizer only shapes the rows (a scratch
    # baseline trains on the distillation's rows, `stages.scratch_config`).
    teacher_tokenizer = build_teacher_tokenizer(cfg, self.tokenizer) if self.distill or cfg.teacher_tokenizer else None
    if self.distill and teacher_tokenizer is not None:
      check_cross_vocab_objective(cfg)
    self.data = DataPipeline(cfg.data, self.tokenizer, cfg.seed, teacher_tokenizer=teacher_tokenizer,
                             cache_dir=data_cache or os.path.join(workdir, "data_cache"))
    self.accumulation = cfg.optim.accumulation_steps
    steps_per_epoch = self.data.batches_per_epoch // self.accumulation
    if steps_per_epoch < 1:
      raise JaxDistillError(f"one epoch has {self.data.batches_per_epoch} micro-batches, fewer than "
                            f"optim.accumulation_steps={self.accumulation}: lower it or data.batch_size, or add data")
    self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    run = build_run(cfg, plan, self.total_steps, self.tokenizer, teacher_tokenizer if self.distill else None)
    self.setup, self.teacher, self.student = run.setup, run.teacher, run.student

    self.checkpointer = ckpt.Checkpointer(workdir, cfg.checkpoint.keep)
    self.state, meta = _restore(cfg, self.checkpointer, resume, run.state, self.data)
    self.fingerprint = meta["fingerprint"]
    self.monitor = RunMonitor(cfg.monitor, meta.get("monitor"))
    self.best_metric = meta.get("best_metric")
    self.evals_without_improvement = meta.get("evals_without_improvement", 0)
    self.last_eval_step, self.result = None, None

    self.train_step, self.eval_step = compile_steps(self.setup, self.teacher.params if self.distill else None,
                                                    run.vocab_map, plan, self.state)
    objective = self.setup.objective
    self.active_components = tuple(c.name for c in objective.components())  # weighted at some step
    self.offline = offline_teacher.for_run(
        cfg.offline_teacher.dir or os.path.join(workdir, "offline_teacher"), objective, self.student.config,
        self.teacher, self.data) if objective.teacher == "records" else None
    self.micro_step = int(self.state.step)
    log(_summary(cfg, self.teacher, self.student, self.state, self.data, self.setup, self.total_steps,
                 self.micro_step // self.accumulation, plan, self.offline))
    self.writer = metrics_lib.MetricWriter(workdir, cfg.log.tensorboard) if parallel.is_main_process() else \
        metrics_lib.NullWriter()

  def run_meta(self, step: int) -> dict:
    """A checkpoint's meta at optimizer step `step`: where the data stands and the run's bookkeeping."""
    if self.offline is not None:  # the records written so far outlive the run with the checkpoint
      self.offline.store.flush()
    return {"step": step, "micro_step": self.micro_step, "data_position": self.data.position(self.micro_step),
            "monitor": self.monitor.state_dict(), "best_metric": self.best_metric,
            "evals_without_improvement": self.evals_without_improvement, "fingerprint": self.fingerprint}

  def diverged(self, step: int, reason: str) -> Diverged:
    return Diverged(step, reason, self.checkpointer.last_good(), self.cfg.optim, self.student.config.dtype)

  def save(self, step: int, best: bool = False) -> None:
    """Checkpoints the state; a state with a non-finite value is never saved (the run diverged)."""
    if not bool(ckpt.all_finite(self.state)):
      raise self.diverged(step, "the parameters or the optimizer state hold non-finite values")
    self.checkpointer.save(step, self.state, self.run_meta(step), best=best)

  def evaluate(self, step: int) -> dict:
    """The eval split at `step`: logged, checked for divergence, and the best checkpoint when it improved."""
    cfg = self.cfg
    self.last_eval_step = step
    reducer = metrics_lib.EvalReducer()
    for batch in self.data.eval_batches(self.plan.host_rows(cfg.data.batch_size)):
      reducer.add(_host(self.eval_step(self.state, self.plan.global_batch(batch, cfg.data.batch_size))))
    result = self.result = reducer.result()
    self.writer.write(step, "eval", result)
    log(metrics_lib.eval_block(step, result))
    if self.distill and step % cfg.log.curriculum_every_steps == 0:
      log(metrics_lib.curriculum_block(step, self.total_steps, "eval", result))
    if not np.isfinite(result["loss"]):
      raise self.diverged(step, f"the evaluation loss is {result['loss']}")
    value = result[cfg.train.best_metric]
    if self.best_metric is None or value < self.best_metric:
      self.best_metric, self.evals_without_improvement = value, 0
      self.save(step, best=True)
    else:
      self.evals_without_improvement += 1
    return result

  def record_train(self, step: int, step_metrics, elapsed: float, tokens: int) -> dict:
    """The training record of `step` (written, checked by the monitor, logged); raises Diverged."""
    cfg = self.cfg
    nonfinite, skipped_streak = jax.device_get((self.state.nonfinite, self.state.skipped_streak))  # one transfer
    counters = {k: int(v) for k, v in nonfinite.items()}
    record = {**_host(step_metrics), "tokens_per_s": tokens / max(elapsed, 1e-9),
              "epoch": self.data.position(self.micro_step - 1)["epoch"], **_device_memory(),
              **{f"count/nonfinite/{k}": v for k, v in counters.items()}}
    self.writer.write(step, "train", record)
    for warning in self.monitor.on_train(step, self.micro_step, counters, record["loss"],
                                         self.setup.dynamic_loss_scale):
      log(warning)
    reason = self.monitor.divergence(record["loss"], int(skipped_streak), self.accumulation)
    if reason:
      raise self.diverged(step, reason)
    if step % cfg.log.debug_every_steps == 0:
      log(metrics_lib.debug_block(step, record, self.active_components))
    if self.distill and step % cfg.log.curriculum_every_steps == 0:
      log(metrics_lib.curriculum_block(step, self.total_steps, "train", record))
    return record

  def _global_batch(self, host_batch):
    return self.plan.global_batch(host_batch, self.cfg.data.batch_size)

  def _micro_step(self):
    """Runs the compiled step on the next micro-batch (recording the teacher first in an offline epoch 1)."""
    cfg = self.cfg
    host_batch = self.data.train_batch(self.micro_step, self.plan.host_rows(cfg.data.batch_size))
    batch = self._global_batch(_drill(host_batch, self.micro_step, cfg.debug))
    new_records = None
    if self.offline is not None:
      batch, new_records = self.offline.batch_with_records(batch, self.data.train_row_indices(self.micro_step),
                                                           self._global_batch)
    try:
      self.state, step_metrics = self.train_step(self.state, batch)
    except Exception as e:  # XLA raises JaxRuntimeError; only out-of-memory is translated
      message = out_of_memory_message(e, cfg.data.batch_size, cfg.data.seq_len, self.accumulation)
      if message:
        raise JaxDistillError(message) from None
      raise
    if new_records is not None:  # written while the step runs
      self.offline.store.put(*new_records)
    self.micro_step += 1
    return step_metrics

  def _progress(self) -> metrics_lib.Progress:
    """The bar on a terminal (stderr), plain `[TRAIN]` lines in a log file or with log.progress_bar=False."""
    cfg = self.cfg
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * self.accumulation
    return metrics_lib.Progress(self.micro_step // self.accumulation, self.total_steps, tokens_per_step,
                                cfg.log.print_every_steps, bar=cfg.log.progress_bar and sys.stderr.isatty())

  def train(self) -> None:
    """Micro-batches until the last optimizer step (or early stopping); an emergency checkpoint on any error."""
    cfg, accumulation, batches_per_epoch = self.cfg, self.accumulation, self.data.batches_per_epoch
    last_train, window_start, window_tokens = None, time.perf_counter(), 0
    progress = self._progress()
    try:
      with _StopFlag() as stop:
        while self.micro_step < self.total_steps * accumulation:
          step_metrics = self._micro_step()
          window_tokens += cfg.data.batch_size * cfg.data.seq_len
          if self.micro_step % accumulation:
            continue
          step = self.micro_step // accumulation
          self.checkpointer.seal_finished()
          shown = None
          if step % cfg.log.every_steps == 0 or step % cfg.log.debug_every_steps == 0 or step == self.total_steps:
            last_train = shown = self.record_train(step, step_metrics, time.perf_counter() - window_start,
                                                   window_tokens)
            window_start, window_tokens = time.perf_counter(), 0
          elif progress.wants_metrics(step):
            shown = _host({k: step_metrics[k] for k in ("loss", "lr")})
          progress.update(step, shown)
          # This optimizer step's micro-batches crossed into a new data epoch (grain's epochs, by micro-batch).
          epoch_end = self.micro_step // batches_per_epoch != (self.micro_step - accumulation) // batches_per_epoch
          if step % cfg.train.eval_every_steps == 0 or step == self.total_steps:
            with progress.evaluating():
              result = self.evaluate(step)
            if last_train is not None:
              for warning in self.monitor.on_eval(result["loss"], last_train["loss"]):
                log(warning)
          if step % cfg.checkpoint.every_steps == 0 or epoch_end or step == self.total_steps:
            self.save(step)
          patience = cfg.train.early_stopping_patience
          if patience and self.evals_without_improvement >= patience:
            log(f"[EARLY STOP] {cfg.train.best_metric} has not improved for {patience} evaluations")
            self.save(step)
            break
          if stop.signum is not None:
            raise Interrupted(stop.signum)
    except BaseException as error:
      progress.close()
      _emergency_save(self.checkpointer, self.state, self.micro_step, accumulation, self.run_meta, error)
      _close_quietly(self.checkpointer)
      self.writer.close()
      raise
    progress.close()

  def finish(self) -> dict:
    """The final evaluation (unless the last step had one), the checkpoints closed, the student exported."""
    step = self.micro_step // self.accumulation
    result = self.evaluate(step) if self.last_eval_step != step else self.result  # e.g. a finished run started again
    self.writer.close()
    self.checkpointer.wait()
    self.checkpointer.close()
    log(self.monitor.summary())
    export_dir = os.path.join(self.workdir, "student_hf")
    student_params = self.plan.to_host(self.state.params["student"])  # every process takes part in the gather
    if parallel.is_main_process():
      save_pretrained(student_params, self.setup.student, export_dir, hf_config=self.student.hf_config,
                      tokenizer=self.tokenizer)
    parallel.barrier("export")  # the next stage may read the export on any host
    if self.distill:
      log(f"[DONE] student exported to {export_dir}\n"
          f"  held-out perplexity: student {result['student_ppl']:.2f}, teacher "
          f"{result.get('teacher_ppl_per_student_token', result['teacher_ppl']):.2f}"
          + (" (its loss per student token)" if "teacher_ppl_per_student_token" in result else ""))
    else:
      log(f"[DONE] model exported to {export_dir}\n  held-out perplexity: {result['student_ppl']:.2f}")
    return result


def _close_quietly(checkpointer) -> None:
  """Finishes (and seals) the saves in flight as the run dies; a failure there leaves the earlier ones."""
  try:
    checkpointer.close()
  except Exception as e:  # e.g. the disk filled up under an asynchronous save
    log(f"[CHECKPOINT] a save in flight did not finish ({type(e).__name__}); the checkpoints before it stand")


def _emergency_save(checkpointer, state, micro_step, accumulation, run_meta, error) -> None:
  """Saves the last complete state when the run dies; a state lost to a failed donated step is reported.

  A diverged run or a full disk saves nothing: the last good checkpoint stands.
  """
  step = micro_step // accumulation
  if isinstance(error, (Diverged, ckpt.DiskFull)):
    return
  try:
    if not bool(ckpt.all_finite(state)):
      log(f"[EMERGENCY] no checkpoint: the state at step {step} holds non-finite values; the last good one stands")
      return
    written = checkpointer.save(step, state, run_meta(step) | {"emergency": type(error).__name__})
    checkpointer.wait()
    what = "written" if written else "already on disk"
    log(f"[EMERGENCY] checkpoint {what} at step {step} (micro-batch {micro_step}) after {type(error).__name__}")
  except Exception as e:  # e.g. the state's buffers were donated to the step that failed
    log(f"[EMERGENCY] could not write a checkpoint ({type(e).__name__}); the last periodic one stands")
