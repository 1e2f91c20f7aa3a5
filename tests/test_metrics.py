"""Host-side metrics: token-weighted eval reduction, the log blocks and the progress lines."""

import math

import pytest

from jaxdistill.objective import COMPONENTS
from jaxdistill.training.metrics import EvalReducer, Progress, StepTimer, debug_block, train_line


def _eval_metrics(scale: float, tokens: float, label_tokens: float) -> dict:
  metrics = {f"{kind}/{c}": scale for c in COMPONENTS for kind in ("raw", "loss")}
  metrics.update({f"weight/{c}": 1.0 for c in COMPONENTS})
  metrics.update({"loss": 8 * scale, "student_lm_loss": scale, "teacher_lm_loss": 2 * scale, "kl_t1": scale,
                  "top1_agreement": 0.5, "temperature": 2.0, "router/top_k": 1.0, "router/temperature": 1.0,
                  "student_ppl": 0.0, "teacher_ppl": 0.0, "opt_step": 3.0,
                  "count/tokens": tokens, "count/label_tokens": label_tokens})
  return metrics


def test_eval_means_are_weighted_by_tokens_not_by_batches():
  reducer = EvalReducer()
  reducer.add(_eval_metrics(1.0, tokens=30, label_tokens=29))
  reducer.add(_eval_metrics(4.0, tokens=10, label_tokens=1))
  result = reducer.result()
  assert result["kl_t1"] == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)          # 1.75, not the batch mean 2.5
  assert result["student_lm_loss"] == pytest.approx((1.0 * 29 + 4.0 * 1) / 30)  # over LM targets: 1.1
  assert result["student_ppl"] == pytest.approx(math.exp(1.1))
  assert result["teacher_ppl"] == pytest.approx(math.exp(2.2))
  assert result["loss"] == pytest.approx(sum(result[f"loss/{c}"] for c in COMPONENTS))
  assert result["count/tokens"] == 40 and result["temperature"] == 2.0


def test_debug_block_shows_raw_weight_weighted_and_checks_the_sum():
  metrics = {f"raw/{c}": 2.0 for c in COMPONENTS} | {f"weight/{c}": 0.5 for c in COMPONENTS}
  total = len(COMPONENTS)  # one per component
  metrics |= {f"loss/{c}": 1.0 for c in COMPONENTS} | {"loss": float(total)}
  block = debug_block(100, metrics)
  assert block.splitlines()[0] == "[TRAIN DEBUG] step 100"
  assert f"sum of weighted = {total}   total loss = {total}   (match)" in block
  assert all(f"  {c:30s} {2.0:12.6g} {0.5:9.4g} {1.0:12.6g}" in block for c in COMPONENTS)
  assert "MISMATCH" in debug_block(100, metrics | {"loss": total + 1.0})


def test_two_tokenizer_eval_weights_teacher_and_pair_metrics_by_their_own_counts():
  reducer = EvalReducer()
  for scale, pairs, teacher_labels in ((1.0, 20, 24), (4.0, 5, 6)):
    reducer.add(_eval_metrics(scale, tokens=30, label_tokens=29) | {"count/pairs": pairs,
                                                                    "count/teacher_label_tokens": teacher_labels})
  result = reducer.result()
  assert result["kl_t1"] == pytest.approx((1.0 * 20 + 4.0 * 5) / 25)                # 1.6: over aligned pairs
  assert result["teacher_lm_loss"] == pytest.approx((2.0 * 24 + 8.0 * 6) / 30)      # 3.2: over teacher targets
  # The teacher's total loss (96 nats) over the student's 58 targets covering the same text.
  assert result["teacher_lm_loss_per_student_token"] == pytest.approx(96 / 58)
  assert result["teacher_ppl_per_student_token"] == pytest.approx(math.exp(96 / 58))
  assert result["count/pairs"] == 25 and result["count/teacher_label_tokens"] == 30


def _debug_metrics(raw: dict, weight: dict) -> dict:
  """Every component, 0 unless given: raw, weight, weighted = raw * weight, and their sum as the loss."""
  metrics = {}
  for c in COMPONENTS:
    r, w = raw.get(c, 0.0), weight.get(c, 0.0)
    metrics |= {f"raw/{c}": r, f"weight/{c}": w, f"loss/{c}": r * w}
  return metrics | {"loss": sum(metrics[f"loss/{c}"] for c in COMPONENTS)}


def test_debug_block_of_plain_lm_shows_only_lm_and_names_the_hidden_components():
  block = debug_block(10, _debug_metrics({"lm": 2.5}, {"lm": 1.0}), active=("lm",))
  hidden = [c for c in COMPONENTS if c != "lm"]
  assert block.splitlines() == [
      "[TRAIN DEBUG] step 10",
      f"  {'component':30s} {'raw':>12s} {'weight':>9s} {'weighted':>12s}",
      f"  {'lm':30s} {2.5:12.6g} {1.0:9.4g} {2.5:12.6g}",
      f"  ({len(hidden)} components with weight 0 hidden: {', '.join(hidden)})",
      "  sum of weighted = 2.5   total loss = 2.5   (match)"]
  assert len(hidden) == 8 and "kd, attention" in block


def test_debug_block_hides_no_component_the_objective_weighs_or_that_is_not_zero():
  # kd is weighted; layerwise has weight 0 at this step but the objective weighs it later (its raw value is
  # computed); contrastive is inactive yet not 0, which would be a bug: shown, and the sum still covers it.
  metrics = _debug_metrics({"kd": 0.5, "layerwise": 1.5, "contrastive": 2.0}, {"kd": 0.7, "contrastive": 1.0})
  lines = debug_block(5, metrics, active=("kd", "layerwise")).splitlines()
  assert [l.split()[0] for l in lines[2:5]] == ["kd", "layerwise", "contrastive"]
  hidden = [c for c in COMPONENTS if c not in ("kd", "layerwise", "contrastive")]
  assert lines[5] == f"  ({len(hidden)} components with weight 0 hidden: {', '.join(hidden)})"
  assert lines[6] == "  sum of weighted = 2.35   total loss = 2.35   (match)"
  one_hidden = debug_block(5, metrics, active=[c for c in COMPONENTS if c != "total_variation"])
  assert "  (1 component with weight 0 hidden: total_variation)" in one_hidden
  assert "hidden" not in debug_block(5, metrics)  # every component active by default: nothing hidden


def _timer() -> StepTimer:
  """600 steps of 256 tokens; step 1 (with compilation) ends 20 s in, step 10 at 24.5 s: 0.5 s a step after it."""
  timer = StepTimer(start_step=0, total_steps=600, tokens_per_step=256, now=100.0)
  timer.tick(1, now=120.0)
  return timer


def test_eta_and_tokens_per_second_leave_out_the_first_steps_compilation():
  timer = _timer()
  assert timer.compile_s() == 20.0
  assert timer.eta(1, now=120.0) is None and timer.tokens_per_s(1, now=120.0) is None  # no step after it yet
  assert timer.seconds_per_step(10, now=124.5) == pytest.approx(0.5)   # 9 steps in 4.5 s
  assert timer.eta(10, now=124.5) == pytest.approx(295.0)               # 590 steps left x 0.5 s
  assert timer.tokens_per_s(10, now=124.5) == pytest.approx(512.0)      # 256 tokens / 0.5 s
  resumed = StepTimer(start_step=400, total_steps=600, tokens_per_step=256, now=0.0)
  resumed.tick(401, now=30.0)  # the first step after a resume compiles again
  assert resumed.eta(411, now=35.0) == pytest.approx(189 * 0.5)


def test_train_line_is_one_short_line_with_the_numbers():
  timer = _timer()
  metrics = {"loss": 2.12345, "lr": 2.9e-3}
  assert train_line(timer, 1, metrics, now=120.0) == (
      "[TRAIN] step 1/600 (0.2%)  loss=2.1235  lr=2.90e-03  elapsed 0:20  "
      "step 1 took 20.0 s with compilation (not in the ETA)")
  assert train_line(timer, 10, metrics, now=124.5) == (
      "[TRAIN] step 10/600 (1.7%)  loss=2.1235  lr=2.90e-03  512 tok/s  elapsed 0:25  ETA 4:55")
  hours = StepTimer(start_step=0, total_steps=100_000, tokens_per_step=1_000_000, now=0.0)
  hours.tick(1, now=1.0)
  line = train_line(hours, 50_000, metrics, now=25_000.5)  # 0.5 s a step: 25,000 s (6:56:40) to go
  assert line.endswith("  2,000,000 tok/s  elapsed 6:56:41  ETA 6:56:40")
  assert "\r" not in line and len(line) < 200


def test_progress_without_a_bar_prints_the_first_two_every_nth_and_the_last_step(capsys):
  times = iter([100.0, 120.0] + [120.0 + 0.5 * i for i in range(1, 11)])
  progress = Progress(start_step=0, total_steps=11, tokens_per_step=256, every=5, bar=False,
                      now=lambda: next(times))
  wanted = [step for step in range(1, 12) if progress.wants_metrics(step)]
  assert wanted == [1, 2, 5, 10, 11]
  for step in range(1, 12):
    progress.update(step, {"loss": 1.0, "lr": 1e-3} if step in wanted else None)
  progress.close()
  out, err = capsys.readouterr()
  assert [l.split("  ")[0] for l in out.splitlines()] == [
      "[TRAIN] step 1/11 (9.1%)", "[TRAIN] step 2/11 (18.2%)", "[TRAIN] step 5/11 (45.5%)",
      "[TRAIN] step 10/11 (90.9%)", "[TRAIN] step 11/11 (100.0%)"]
  assert out.splitlines()[1].endswith("512 tok/s  elapsed 0:21  ETA 0:05")  # step 2: the first rate, 9 steps to go
  assert out.splitlines()[3].endswith("512 tok/s  elapsed 0:25  ETA 0:01")  # 24.5 s in; 0.5 s a step, 1 to go
  assert err == ""


def test_progress_bar_shows_its_own_eta_not_tqdms_rate_that_includes_compilation(capsys):
  times = iter([100.0, 120.0] + [120.0 + 0.5 * i for i in range(1, 10)])
  progress = Progress(start_step=0, total_steps=600, tokens_per_step=256, every=5, bar=True, now=lambda: next(times))
  assert [step for step in range(1, 12) if progress.wants_metrics(step)] == [1]  # the bar prints no lines
  for step in range(1, 11):
    progress.update(step, {"loss": 2.0, "lr": 1e-3} if step in (1, 5) else None)
  progress.close()
  out, err = capsys.readouterr()
  final = err.split("\r")[-1].strip()
  assert out == "" and final.startswith("2%|") and "| 10/600 [" in final
  assert final.endswith(", loss=2.0000, lr=1.00e-03, 512 tok/s, ETA 4:55, step 1 with compilation 20.0 s]")
  assert "s/step" not in err and "step/s" not in err


def test_the_first_evaluation_compiles_and_is_left_out_of_the_rate_later_ones_count():
  # Step 1 ends at 20 s; steps 2-5 take 0.5 s each; the first evaluation 15 s, the second 1 s; then step 6.
  times = iter([0.0, 20.0, 20.5, 21.0, 21.5, 22.0, 22.0, 37.0, 37.0, 38.0, 38.5])
  progress = Progress(start_step=0, total_steps=100, tokens_per_step=256, every=50, bar=False,
                      now=lambda: next(times))
  for step in range(1, 6):
    progress.update(step, None)
  for _ in range(2):
    with progress.evaluating():
      pass
  progress.update(6, None)
  assert progress.timer.left_out == 15.0
  assert progress.timer.seconds_per_step(6, now=38.5) == pytest.approx(0.7)  # (18.5 - 15) s over 5 steps
  assert progress.timer.eta(6, now=38.5) == pytest.approx(94 * 0.7)
