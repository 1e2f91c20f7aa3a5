"""The stages around a run: teacher and scratch configs, the comparison's arithmetic."""

import pytest

from jaxdistill import config as config_lib
from jaxdistill.training import stages


@pytest.fixture(scope="module")
def demo():
  return config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "debug.inject_nonfinite": "kd", "debug.inject_every": 3, "train.best_metric": "kl_t1"}))


def test_the_scratch_run_is_the_same_student_by_plain_lm(demo):
  scratch = stages.plain_lm(demo)
  assert scratch.mode == "lm" and scratch.student == demo.student
  assert (scratch.data, scratch.seed, scratch.optim, scratch.train.max_steps) == (
      demo.data, demo.seed, demo.optim, demo.train.max_steps)  # same data, order, steps, tokens
  assert scratch.objective.curriculum.values("lm") == (1.0, 1.0, 1.0) and not scratch.objective.needs_teacher
  assert [c.name for c in scratch.objective.components()] == ["lm"] and scratch.objective.teacher == "none"
  assert scratch.debug.inject_nonfinite == "" and scratch.stages == config_lib.StagesSpec()
  assert scratch.train.best_metric == "student_lm_loss"  # kl_t1 needs a teacher


def test_the_teacher_run_trains_the_teacher_architecture(demo):
  teacher = stages.teacher_config(demo)
  assert teacher.mode == "lm" and teacher.student == demo.teacher
  assert teacher.train.max_steps == demo.stages.teacher_steps == 8
  assert teacher.optim.learning_rate == demo.stages.teacher_learning_rate == 3e-3
  assert teacher.optim.accumulation_steps == demo.optim.accumulation_steps


def test_with_teacher_points_the_run_at_the_trained_checkpoint(demo):
  cfg = stages.with_teacher(demo, "/cache/t/student_hf")
  assert cfg.teacher.name_or_path == "/cache/t/student_hf" and cfg.teacher.arch is None
  assert cfg.teacher.dtype == demo.teacher.dtype and cfg.student == demo.student


def _eval(student_lm_loss, student_ppl, teacher_ppl=None):
  result = {"student_lm_loss": student_lm_loss, "student_ppl": student_ppl, "opt_step": 600,
            "count/tokens": 20480.0}
  if teacher_ppl is not None:
    result.update(teacher_ppl=teacher_ppl, teacher_lm_loss=1.5)
  return result


def test_gap_closed_by_hand():
  c = stages.comparison(_eval(1.7, 6.0, teacher_ppl=4.0), _eval(1.9, 8.0), tokens_per_step=2048)
  assert c["gap_closed"] == pytest.approx((8.0 - 6.0) / (8.0 - 4.0)) == 0.5
  assert (c["steps"], c["train_tokens"], c["eval_tokens"]) == (600, 1_228_800, 20480)
  assert (c["teacher_ppl"], c["scratch_ppl"], c["distilled_ppl"]) == (4.0, 8.0, 6.0)
  worse = stages.comparison(_eval(2.0, 9.0, teacher_ppl=4.0), _eval(1.9, 8.0), tokens_per_step=2048)
  assert worse["gap_closed"] == pytest.approx(-0.25)  # distillation hurt: a negative share, shown as such
  no_gap = stages.comparison(_eval(1.7, 6.0, teacher_ppl=9.0), _eval(1.9, 8.0), tokens_per_step=2048)
  assert no_gap["gap_closed"] is None
  table = stages.comparison_table(c)
  assert "| teacher | 4.00 | 1.5000 |" in table and "| distilled student | 6.00 | 1.7000 |" in table
  assert "scratch to teacher): 50.0%" in table
  assert "n/a (the scratch student is not worse than the teacher)" in stages.comparison_table(no_gap)


def test_a_teacher_with_its_own_tokenizer_trains_on_rows_of_its_own_tokens():
  cross = config_lib.parse(config_lib.load("configs/cpu_demo.py:cross_smoke"))
  teacher = stages.teacher_config(cross)
  assert (teacher.tokenizer, teacher.teacher_tokenizer) == ("sp:600", "")
  assert (teacher.data.seq_len, teacher.data.teacher_seq_len) == (40, 0)  # data.teacher_seq_len of the run
  assert teacher.student.arch["family"] == "qwen3_moe"
  # The teacher's cache key follows its tokenizer.
  other = config_lib.parse(config_lib.load("configs/cpu_demo.py:cross_smoke", {"teacher_tokenizer": "sp:500"}))
  assert stages.teacher_dir(other) != stages.teacher_dir(cross)


def test_a_teacher_with_its_own_tokenizer_is_compared_per_student_token():
  distilled = _eval(1.7, 6.0, teacher_ppl=3.0) | {"teacher_ppl_per_student_token": 4.0,
                                                   "teacher_lm_loss_per_student_token": 1.3863}
  c = stages.comparison(distilled, _eval(1.9, 8.0), tokens_per_step=2048)
  assert (c["teacher_ppl"], c["teacher_lm_loss"], c["teacher_tokenizer"]) == (4.0, 1.3863, True)
  assert c["gap_closed"] == pytest.approx(0.5)
  assert "| teacher (own tokenizer; its loss per student token) | 4.00 | 1.3863 |" in stages.comparison_table(c)
