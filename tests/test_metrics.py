"""Host-side metrics: token-weighted eval reduction and the log blocks."""

import math

import pytest

from jaxdistill.objective import COMPONENTS
from jaxdistill.training.metrics import EvalReducer, debug_block


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
