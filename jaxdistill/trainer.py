"""The training loop: `train_and_evaluate(cfg, workdir, resume)`.

Builds tokenizer, data, teacher, student and state; resumes from the workdir's newest good
checkpoint (or `resume`); runs micro-batches through the compiled `train_step`; logs, evaluates,
checkpoints and monitors on optimizer-step boundaries; writes an emergency checkpoint when
interrupted; exports the student in Hugging Face format at the end.
"""

import dataclasses
import os
import signal
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from jaxdistill import checkpoint as ckpt
from jaxdistill import config as config_lib
from jaxdistill import fingerprint
from jaxdistill import metrics as metrics_lib
from jaxdistill import offline_teacher, parallel, workdir_lock
from jaxdistill.build import (build_model, build_teacher_tokenizer, build_tokenizer, check_cross_vocab_objective,
                              check_positions, vocab_map)
from jaxdistill.data.alignment import vocab_size
from jaxdistill.data.pipeline import DataPipeline
from jaxdistill.errors import ConfigError, JaxDistillError
from jaxdistill.metrics import log
from jaxdistill.models import save_pretrained
from jaxdistill.monitor import Diverged, RunMonitor, out_of_memory_message
from jaxdistill.objective import COMPONENTS, init_heads
from jaxdistill.optim import check_warmup, make_optimizer
from jaxdistill.state import create_placed_train_state
from jaxdistill.steps import StepSetup, compile_steps

FP16_INITIAL_LOSS_SCALE = 2.0 ** 15


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


def _model_line(model) -> str:
  cfg = model.config
  return (f"{model.path or 'random ' + cfg.family}  {_param_count(model.params):,} params  {cfg.num_layers} layers  "
          f"{cfg.param_dtype}/{cfg.dtype}")


def _curriculum_rows(cur) -> list[str]:
  phases = ["0"] + [f"{b:.0%}" for b in cur.boundaries]
  rows = []
  for i, start in enumerate(phases):
    weights = "  ".join(f"{name}={cur.values(name)[i]:g}" for name in ("kd", "lm", "attention", "feature", "layerwise",
                                                                     "contrastive"))
    rows.append(f"    phase {i + 1} from {start:>4s}: {weights}  T={cur.temperature[i]:g}")
  return rows


def _summary(cfg, teacher, student, data, setup: StepSetup, total_steps: int, start_step: int, plan: parallel.MeshPlan,
             offline: offline_teacher.RunRecords | None = None) -> str:
  accumulation = setup.optim.accumulation_steps
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * accumulation
  device = jax.local_devices()[0]
  loss_scaling = "  (fp16 dynamic loss scaling)" if setup.dynamic_loss_scale else ""
  if teacher is None:
    models = [f"  model   : {_model_line(student)}{loss_scaling}"]
    objective = ["  objective: plain LM cross-entropy (mode 'lm': no teacher)"]
  else:
    models = [f"  teacher : {_model_line(teacher)}", f"  student : {_model_line(student)}{loss_scaling}"]
    objective = ["  curriculum:", *_curriculum_rows(setup.objective.curriculum)]
    if offline is not None:
      store = offline.store
      objective.append(f"  offline teacher: top-{setup.objective.offline_top_k} logits, "
                       f"{store.bytes_per_token:,.0f} bytes per token, {store.rows_filled:,} of {store.num_rows:,} "
                       f"rows recorded in {store.directory}")
  return "\n".join([
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


def _evaluate(eval_step, state, data, plan: parallel.MeshPlan) -> dict:
  reducer = metrics_lib.EvalReducer()
  for batch in data.eval_batches(plan.host_rows(data.cfg.batch_size)):
    reducer.add(_host(eval_step(state, plan.global_batch(batch, data.cfg.batch_size))))
  return reducer.result()


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
  os.makedirs(workdir, exist_ok=True)
  distill = cfg.mode == "distill"  # otherwise plain LM training: no teacher at all
  tokenizer = build_tokenizer(cfg)
  # None: one tokenizer. In plain LM training a named teacher tokenizer only shapes the rows (a scratch
  # baseline trains on the distillation's rows, `stages.scratch_config`).
  teacher_tokenizer = build_teacher_tokenizer(cfg, tokenizer) if distill or cfg.teacher_tokenizer else None
  if distill and teacher_tokenizer is not None:
    check_cross_vocab_objective(cfg)
  data = DataPipeline(cfg.data, tokenizer, cfg.seed, cache_dir=data_cache or os.path.join(workdir, "data_cache"),
                      teacher_tokenizer=teacher_tokenizer)
  rng = jax.random.key(cfg.seed)
  teacher_rng, student_rng, heads_rng, state_rng = jax.random.split(rng, 4)
  teacher = build_model(cfg.teacher, vocab_size(teacher_tokenizer or tokenizer), teacher_rng, "teacher") \
      if distill else None
  teacher_config = teacher.config if distill else None
  student = build_model(cfg.student, vocab_size(tokenizer), student_rng, "student")
  check_positions(student.config, cfg.data.seq_len, "data.seq_len", "the student")
  if distill:
    check_positions(teacher.config, cfg.data.teacher_len,
                    "data.teacher_seq_len" if cfg.data.teacher_seq_len else "data.seq_len", "the teacher")
  shared_tokens = None if teacher is None or teacher_tokenizer is None else vocab_map(
      tokenizer, teacher_tokenizer, student.config.vocab_size, teacher.config.vocab_size)

  accumulation = cfg.optim.accumulation_steps
  steps_per_epoch = data.batches_per_epoch // accumulation
  if steps_per_epoch < 1:
    raise JaxDistillError(f"one epoch has {data.batches_per_epoch} micro-batches, fewer than "
                          f"optim.accumulation_steps={accumulation}: lower it or data.batch_size, or add data")
  total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
  check_warmup(cfg.optim, total_steps)
  optim = dataclasses.replace(cfg.optim, total_steps=total_steps)
  objective = dataclasses.replace(cfg.objective, total_steps=total_steps).resolve_layers(student.config, teacher_config)
  fp16 = student.config.dtype == "float16"
  setup = StepSetup(objective, student.config, teacher_config, optim, dynamic_loss_scale=fp16)
  tx, _ = make_optimizer(optim)
  heads = init_heads(objective, student.config, teacher_config, heads_rng)
  state = create_placed_train_state(plan, student.params, heads, tx, state_rng,
                                    FP16_INITIAL_LOSS_SCALE if fp16 else 1.0)
  if distill:
    teacher = dataclasses.replace(teacher, params=plan.put(teacher.params, plan.teacher_shardings(teacher.params)))
  if shared_tokens is not None:
    shared_tokens = plan.replicate(shared_tokens)

  checkpointer = ckpt.Checkpointer(workdir, cfg.checkpoint.keep)
  state, meta = _restore(cfg, checkpointer, resume, state, data)
  monitor = RunMonitor(cfg.monitor, meta.get("monitor"))
  best_metric = meta.get("best_metric")
  evals_without_improvement = meta.get("evals_without_improvement", 0)

  train_step, eval_step = compile_steps(setup, teacher.params if distill else None, shared_tokens, plan, state)
  offline = offline_teacher.for_run(cfg.offline_teacher.dir or os.path.join(workdir, "offline_teacher"), objective,
                                    student.config, teacher, data) if objective.offline_top_k else None
  micro_step = int(state.step)
  start_opt_step = micro_step // accumulation
  total_micro = total_steps * accumulation
  log(_summary(cfg, teacher, student, data, setup, total_steps, start_opt_step, plan, offline))
  student = dataclasses.replace(student, params=None)  # the state owns (and donates) the params now
  writer = metrics_lib.MetricWriter(workdir, cfg.log.tensorboard) if parallel.is_main_process() else \
      metrics_lib.NullWriter()
  host_rows = plan.host_rows(cfg.data.batch_size)

  def global_batch(host_batch):
    return plan.global_batch(host_batch, cfg.data.batch_size)

  def run_meta(step: int) -> dict:
    if offline is not None:  # the records written so far outlive the run with the checkpoint
      offline.store.flush()
    return {"step": step, "micro_step": micro_step, "data_position": data.position(micro_step),
            "monitor": monitor.state_dict(), "best_metric": best_metric,
            "evals_without_improvement": evals_without_improvement, "fingerprint": meta["fingerprint"]}

  def diverged(step: int, reason: str) -> Diverged:
    return Diverged(step, reason, checkpointer.last_good(), cfg.optim, student.config.dtype)

  def save(step: int, best: bool = False) -> None:
    """Checkpoints the state; a state with a non-finite value is never saved (the run diverged)."""
    if not bool(ckpt.all_finite(state)):
      raise diverged(step, "the parameters or the optimizer state hold non-finite values")
    checkpointer.save(step, state, run_meta(step), best=best)

  last_eval_step = None

  def evaluate(step: int) -> dict:
    nonlocal best_metric, evals_without_improvement, last_eval_step
    last_eval_step = step
    result = _evaluate(eval_step, state, data, plan)
    writer.write(step, "eval", result)
    log(metrics_lib.eval_block(step, result))
    if distill and step % cfg.log.curriculum_every_steps == 0:
      log(metrics_lib.curriculum_block(step, total_steps, "eval", result))
    if not np.isfinite(result["loss"]):
      raise diverged(step, f"the evaluation loss is {result['loss']}")
    value = result[cfg.train.best_metric]
    if best_metric is None or value < best_metric:
      best_metric, evals_without_improvement = value, 0
      save(step, best=True)
    else:
      evals_without_improvement += 1
    return result

  last_train, window_start, window_tokens = None, time.perf_counter(), 0
  bar = tqdm(total=total_steps, initial=start_opt_step, unit="step", dynamic_ncols=True, file=sys.stderr,
             disable=not cfg.log.progress_bar or not parallel.is_main_process())
  try:
    with _StopFlag() as stop:
      while micro_step < total_micro:
        batch = global_batch(_drill(data.train_batch(micro_step, host_rows), micro_step, cfg.debug))
        new_records = None
        if offline is not None:
          batch, new_records = offline.batch_with_records(batch, data.train_row_indices(micro_step), global_batch)
        try:
          state, step_metrics = train_step(state, batch)
        except Exception as e:  # XLA raises JaxRuntimeError; only out-of-memory is translated
          message = out_of_memory_message(e, cfg.data.batch_size, cfg.data.seq_len, accumulation)
          if message:
            raise JaxDistillError(message) from None
          raise
        if new_records is not None:  # written while the step runs
          offline.store.put(*new_records)
        micro_step += 1
        window_tokens += cfg.data.batch_size * cfg.data.seq_len
        if micro_step % accumulation:
          continue
        step = micro_step // accumulation
        bar.update(1)
        checkpointer.seal_finished()

        if step % cfg.log.every_steps == 0 or step % cfg.log.debug_every_steps == 0 or step == total_steps:
          train_metrics = _host(step_metrics)
          elapsed = time.perf_counter() - window_start
          nonfinite, skipped_streak = jax.device_get((state.nonfinite, state.skipped_streak))  # one transfer
          counters = {k: int(v) for k, v in nonfinite.items()}
          record = {**train_metrics, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "epoch": data.position(micro_step - 1)["epoch"], **_device_memory(),
                    **{f"count/nonfinite/{k}": v for k, v in counters.items()}}
          writer.write(step, "train", record)
          bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                          tok_s=f"{record['tokens_per_s']:,.0f}")
          window_start, window_tokens = time.perf_counter(), 0
          last_train = record
          for warning in monitor.on_train(step, micro_step, counters, record["loss"], fp16):
            log(warning)
          reason = monitor.divergence(record["loss"], int(skipped_streak), accumulation)
          if reason:
            raise diverged(step, reason)
          if step % cfg.log.debug_every_steps == 0:
            log(metrics_lib.debug_block(step, record))
          if distill and step % cfg.log.curriculum_every_steps == 0:
            log(metrics_lib.curriculum_block(step, total_steps, "train", record))

        # This optimizer step's micro-batches crossed into a new data epoch (grain's epochs, by micro-batch).
        epoch_end = micro_step // data.batches_per_epoch != (micro_step - accumulation) // data.batches_per_epoch
        if step % cfg.train.eval_every_steps == 0 or step == total_steps:
          result = evaluate(step)
          if last_train is not None:
            for warning in monitor.on_eval(result["loss"], last_train["loss"]):
              log(warning)
        if step % cfg.checkpoint.every_steps == 0 or epoch_end or step == total_steps:
          save(step)
        patience = cfg.train.early_stopping_patience
        if patience and evals_without_improvement >= patience:
          log(f"[EARLY STOP] {cfg.train.best_metric} has not improved for {patience} evaluations")
          save(step)
          break
        if stop.signum is not None:
          raise Interrupted(stop.signum)
  except BaseException as error:
    bar.close()
    _emergency_save(checkpointer, state, micro_step, accumulation, run_meta, error)
    _close_quietly(checkpointer)
    writer.close()
    raise
  bar.close()

  step = micro_step // accumulation
  if last_eval_step != step:  # e.g. a finished run started again
    result = evaluate(step)
  writer.close()
  checkpointer.wait()
  checkpointer.close()
  log(monitor.summary())
  export_dir = os.path.join(workdir, "student_hf")
  student_params = plan.to_host(state.params["student"])  # every process takes part in the gather
  if parallel.is_main_process():
    save_pretrained(student_params, setup.student, export_dir, hf_config=student.hf_config, tokenizer=tokenizer)
  parallel.barrier("export")  # the next stage may read the export on any host
  if distill:
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
