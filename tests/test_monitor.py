"""The run monitor's thresholds and the out-of-memory message."""

from jaxdistill.training.monitor import MonitorConfig, RunMonitor, out_of_memory_message

CLEAN = {"kd": 0, "lm": 0, "grads": 0}


def test_nonfinite_share_warns_only_above_one_percent():
  monitor = RunMonitor(MonitorConfig(nonfinite_fraction=0.01))
  assert monitor.on_train(10, 100, {**CLEAN, "kd": 1}, 1.0, fp16=False) == []        # 1% is not more than 1%
  warnings = monitor.on_train(11, 100, {**CLEAN, "kd": 2}, 1.0, fp16=False)          # 2% is
  assert warnings == ["[MONITOR] kd was non-finite in 2 of 100 batches (2.0% > 1%); those values were replaced by 0"]
  assert monitor.on_train(12, 100, {**CLEAN, "kd": 3}, 1.0, fp16=False) == []        # once until it clears
  assert monitor.on_train(13, 1000, {**CLEAN, "kd": 3}, 1.0, fp16=False) == []       # cleared (0.3%)
  assert len(monitor.on_train(14, 100, {**CLEAN, "kd": 5}, 1.0, fp16=False)) == 1    # trips again
  assert monitor.summary() == "[MONITOR] warnings this run: nonfinite/kd x2"


def test_plateau_after_the_configured_steps_without_improvement():
  monitor = RunMonitor(MonitorConfig(plateau_steps=1000))
  monitor.on_train(100, 100, CLEAN, 2.0, fp16=False)
  assert monitor.on_train(1099, 1099, CLEAN, 2.5, fp16=False) == []
  warnings = monitor.on_train(1100, 1100, CLEAN, 2.1, fp16=False)
  assert warnings == ["[MONITOR] training loss has not improved for 1000 steps (best 2.0000 at step 100)"]
  assert monitor.on_train(1200, 1200, CLEAN, 1.9, fp16=False) == []  # improved: cleared


def test_eval_gap_and_skipped_updates():
  monitor = RunMonitor(MonitorConfig(eval_train_ratio=5.0))
  assert monitor.on_eval(4.9, 1.0) == []
  assert monitor.on_eval(5.5, 1.0) == ["[MONITOR] eval loss 5.5000 is 5.5x the training loss 1.0000 (> 5x): "
                                       "overfitting or a train/eval mismatch"]
  warnings = monitor.on_train(5, 5, {**CLEAN, "grads": 2}, 1.0, fp16=True)
  assert warnings == ["[MONITOR] fp16 overflow: 2 update(s) skipped for non-finite gradients (2 in total)"]


def test_state_survives_a_checkpoint_round_trip():
  monitor = RunMonitor(MonitorConfig())
  monitor.on_train(7, 7, {**CLEAN, "kd": 7}, 3.0, fp16=False)
  restored = RunMonitor(MonitorConfig(), monitor.state_dict())
  assert restored.state_dict() == monitor.state_dict()
  assert restored.best_loss == 3.0 and restored.tripped == {"nonfinite/kd": 1}


def test_out_of_memory_message_names_the_request_and_the_settings():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.50GiB.")
  message = out_of_memory_message(error, batch_size=16, seq_len=512, accumulation=16)
  assert message.startswith("out of device memory while allocating 17.50GiB at micro-batch 16 x 512 tokens")
  for setting in ("data.batch_size", "optim.accumulation_steps=16", "data.seq_len", "distill.chunk_size",
                  "student.dtype", "teacher.param_dtype"):
    assert setting in message
  assert out_of_memory_message(ValueError("shapes do not match"), 1, 1, 1) is None


def test_divergence_is_a_non_finite_loss_or_a_run_of_skipped_updates():
  monitor = RunMonitor(MonitorConfig(diverged_steps=3))
  assert monitor.divergence(2.0, skipped_streak=5, accumulation=2) is None   # 2 whole steps of 2 micro-batches
  assert monitor.divergence(2.0, skipped_streak=6, accumulation=2) == (
      "the updates of the last 3 optimizer steps were all skipped for non-finite gradients (monitor.diverged_steps=3)")
  assert monitor.divergence(float("nan"), skipped_streak=0, accumulation=1) == "the training loss is nan"


def test_the_divergence_error_says_what_to_lower_and_what_was_kept():
  from jaxdistill.training.monitor import Diverged
  from jaxdistill.training.optim import OptimConfig

  optim = OptimConfig(learning_rate=1e6, warmup_steps=1, clip_norm=1.0)
  error = Diverged(6, "the training loss is nan", "runs/x/checkpoints/4", optim, "float16")
  assert error.exit_code == 3
  assert str(error) == ("training diverged at step 6: the training loss is nan; nothing was exported and the last "
                        "good checkpoint is runs/x/checkpoints/4 (kept). Lower optim.learning_rate (now 1e+06) or "
                        "optim.clip_norm (now 1), or raise optim.warmup_steps (now 1); with float16 compute, use "
                        "bfloat16 or float32 (student.dtype)")


def test_a_full_disk_is_one_line():
  import errno

  from jaxdistill.cli import disk_full_message

  error = OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")
  assert disk_full_message(error) == ("no space left on device writing runs/x/metrics.jsonl; free space there or "
                                      "choose a --workdir on a larger disk (the checkpoints written so far are kept)")
  assert disk_full_message(ValueError("tensorstore: ... No space left on device [os error 28]")).startswith(
      "no space left on device; free space there")
  assert disk_full_message(OSError(errno.EACCES, "Permission denied")) is None
