"""The offline teacher: records equal to the live teacher, kd from records, the store on disk, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.config import arch_group
from jaxdistill.errors import ConfigError
from jaxdistill.objective import (DistillSpec, ResolvedObjective, curriculum_config, init_heads, losses, objective,
                                  offline_teacher)
from jaxdistill.objective.components.layerwise import record_layers
from jaxdistill.objective.offline_teacher import RECORD_KEY, OfflineTeacher, compute_records, layout
from jaxdistill.training import steps
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import create_train_state

VOCAB = 64
STUDENT = models.families.from_arch(arch_group("llama", VOCAB, 32, 2, 4, 2, 64, 64, True))
TEACHER = models.families.from_arch(arch_group("llama", VOCAB, 48, 3, 6, 2, 96, 64, False))
# Two phases with different temperatures; kd, lm, layerwise and contrastive weighted (no attention, no router).
CURRICULUM = curriculum_config(boundaries=(0.5,), kd=(0.7, 0.7), lm=(0.3, 0.3), attention=(0.0,), feature=(0.0,),
                               layerwise=(0.05, 0.1), contrastive=(0.05, 0.05), temperature=(2.0, 1.5))


def _objective(top_k=0, **distill):
  cfg = ResolvedObjective(distill=DistillSpec(chunk_size=24, **distill), curriculum=CURRICULUM, total_steps=10,
                          teacher="records" if top_k else "live", offline_top_k=top_k)
  return cfg.resolve_layers(STUDENT, TEACHER)


def _batch(seed=0):
  ids = jax.random.randint(jax.random.key(seed), (3, 16), 0, VOCAB)
  mask = jnp.ones_like(ids).at[0, -4:].set(0)
  return {"student_input_ids": ids, "student_attention_mask": mask, "teacher_input_ids": ids,
          "teacher_attention_mask": mask}


@pytest.fixture(scope="module")
def params():
  keys = jax.random.split(jax.random.key(0), 3)
  teacher = models.init_params(TEACHER, keys[0])
  # A sharper teacher than the 0.02-normal init gives: a real top-k (most mass in few tokens).
  teacher = {**teacher, "lm_head": jax.tree.map(lambda w: w * 40.0, teacher["lm_head"])}
  trainable = {"student": models.init_params(STUDENT, keys[1]),
               "heads": init_heads(_objective(), STUDENT, TEACHER, keys[2])}
  return teacher, trainable


def _loss(trainable, teacher, batch, step, cfg):
  return objective(trainable, teacher, batch, step, cfg, STUDENT, TEACHER)[1]


def _records(teacher, cfg, batch):
  return compute_records(teacher, batch, cfg=cfg, student=STUDENT, teacher=TEACHER)


def test_a_record_holds_the_teachers_top_k_and_each_phases_normaliser(params):
  teacher, _ = params
  cfg = _objective(top_k=5)
  batch = _batch()
  record = _records(teacher, cfg, batch)
  logits = models.forward(teacher, TEACHER, batch["teacher_input_ids"], batch["teacher_attention_mask"]).logits_BxLxV
  z = np.asarray(logits, np.float64)[1, 7]  # one position, by hand
  order = np.argsort(-z)[:5]
  np.testing.assert_array_equal(np.asarray(record["topk_ids"][1, 7]), order)
  np.testing.assert_allclose(np.asarray(record["topk_logits"][1, 7]), z[order] - z.max(), atol=1e-5)
  for phase, t in enumerate((2.0, 1.5)):
    expected = np.log(np.sum(np.exp((z - z.max()) / t)))
    assert float(record["lse"][1, 7, phase]) == pytest.approx(expected, abs=1e-5)
  assert record["hidden"].shape == (3, 16, len(record_layers(cfg)), TEACHER.hidden_size)
  assert record["pooled"].shape == (3, TEACHER.hidden_size)


@pytest.mark.parametrize("step", [0, 7])  # phase 1 (T = 2) and phase 2 (T = 1.5)
def test_the_objective_from_records_equals_the_live_teacher(params, step):
  """All 64 logits kept: kd, layerwise and contrastive from records equal the live ones (an fp32 teacher)."""
  teacher, trainable = params
  batch = _batch(1)
  live_cfg, offline_cfg = _objective(), _objective(top_k=VOCAB)
  step = jnp.asarray(step, jnp.int32)
  live = _loss(trainable, teacher, batch, step, live_cfg)
  record = _records(teacher, offline_cfg, batch)
  offline = _loss(trainable, None, {**batch, RECORD_KEY: record}, step, offline_cfg)
  for key in ("raw/kd", "raw/lm", "raw/layerwise", "raw/contrastive", "loss"):
    assert float(offline[key]) == pytest.approx(float(live[key]), rel=2e-5, abs=1e-6), key
  assert float(live["raw/kd"]) > 0.01


def test_kd_from_top_k_records_is_the_live_top_k_kd_and_bounds_the_full_kl(params):
  teacher, trainable = params
  batch = _batch(2)
  mask = batch["student_attention_mask"]
  student_logits = models.forward(trainable["student"], STUDENT, batch["student_input_ids"], mask).logits_BxLxV
  teacher_logits = models.forward(teacher, TEACHER, batch["teacher_input_ids"], mask).logits_BxLxV
  step = jnp.asarray(0, jnp.int32)
  record = _records(teacher, _objective(top_k=8), batch)
  for kd_top_k, tail in ((8, "renormalize"), (8, "other_bucket"), (4, "renormalize")):
    cfg = _objective(top_k=8, kd_top_k=kd_top_k, kd_topk_tail=tail)
    live = losses.kd_loss(student_logits, teacher_logits, mask, temperature=2.0, top_k=kd_top_k, topk_tail=tail)
    cached = offline_teacher.kd_loss(student_logits, record, mask, step, cfg, temperature=2.0)
    assert float(cached) == pytest.approx(float(live), rel=1e-5), (kd_top_k, tail)
  # Full-vocabulary kd from 8 kept logits: the KL over 8 tokens + the rest as one outcome, a lower bound.
  full = float(losses.kd_loss(student_logits, teacher_logits, mask, temperature=2.0))
  bucketed = float(offline_teacher.kd_loss(student_logits, record, mask, step, _objective(top_k=8), temperature=2.0))
  assert 0.5 * full < bucketed <= full


def test_eval_makes_records_as_training_does(params):
  """eval_step's objective is the objective of the records it makes from the live teacher, and the
  objective refuses a batch without records when the teacher is offline."""
  teacher, trainable = params
  cfg = _objective(top_k=16)
  optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
  tx, _ = make_optimizer(optim)
  state = create_train_state(trainable["student"], trainable["heads"], tx)
  batch = _batch(3)
  evaluated = jax.jit(steps.eval_step, static_argnames="setup")(state, batch, teacher,
                                                                setup=steps.StepSetup(cfg, STUDENT, TEACHER, optim))
  record = jax.device_get(_records(teacher, cfg, batch))  # from disk: numpy arrays
  trained = _loss(trainable, None, {**batch, RECORD_KEY: record}, state.opt_step, cfg)
  assert float(evaluated["loss"]) == pytest.approx(float(trained["loss"]), rel=1e-6)
  with pytest.raises(ValueError, match="records"):
    objective(trainable, teacher, batch, state.opt_step, cfg, STUDENT, TEACHER)


def test_the_trainer_computes_records_once_and_reads_them_back(tmp_path):
  """Rows seen for the first time get fresh records (to be written); seen rows are read from disk."""
  arrays = {"topk_ids": ("int32", (2, 1)), "lse": ("float32", (2, 1))}
  store = OfflineTeacher(str(tmp_path), {}, num_rows=4, arrays=arrays)
  calls = []

  def compute(batch):
    calls.append(batch["n"])
    return {"topk_ids": np.full((2, 2, 1), batch["n"], np.int32), "lse": np.zeros((2, 2, 1), np.float32)}

  offline = offline_teacher.RunRecords(store, compute)
  batch, fresh = offline.batch_with_records({"n": 7}, np.array([3, 1]))
  assert calls == [7] and fresh[0].tolist() == [3, 1]
  store.put(*fresh)
  batch, fresh = offline.batch_with_records({"n": 8}, np.array([1, 3]))
  assert calls == [7] and fresh is None
  np.testing.assert_array_equal(batch[RECORD_KEY]["topk_ids"], np.full((2, 2, 1), 7))
  _, fresh = offline.batch_with_records({"n": 9}, np.array([1, 2]))  # one row not recorded yet
  assert calls == [7, 9] and fresh[0].tolist() == [1, 2]


def test_the_store_round_trips_records_and_survives_reopening(params, tmp_path):
  teacher, _ = params
  cfg = _objective(top_k=4)
  arrays = layout(cfg, TEACHER, 16, VOCAB)
  assert arrays["topk_ids"][0] == "uint16"
  per_token = 4 * (4 + 2) + 2 * 4 + len(record_layers(cfg)) * 48 * 4 + 48 * 4 / 16
  assert offline_teacher.bytes_per_row(arrays) / 16 == pytest.approx(per_token)
  store = OfflineTeacher(str(tmp_path), {"teacher": "a"}, num_rows=6, arrays=arrays)
  record = jax.device_get(_records(teacher, cfg, _batch(4)))
  rows = np.array([5, 0, 2])
  assert store.get(rows) is None
  store.put(rows, record)
  assert store.get(np.array([5, 1])) is None and store.rows_filled == 3
  store.flush()
  again = OfflineTeacher(str(tmp_path), {"teacher": "a"}, num_rows=6, arrays=arrays)
  assert again.directory == store.directory
  read = again.get(np.array([2, 5]))
  for name in arrays:
    np.testing.assert_array_equal(read[name], np.asarray(record[name])[[2, 0]])
  assert read["topk_ids"].dtype == np.int32
  other = OfflineTeacher(str(tmp_path), {"teacher": "b"}, num_rows=6, arrays=arrays)  # another teacher
  assert other.directory != store.directory and other.rows_filled == 0


def _parse(**overrides):
  return config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))


def test_config_errors_name_the_field():
  off = {"offline_teacher.top_k": 8, "curriculum.attention": (0.0, 0.0, 0.0)}
  with pytest.raises(ConfigError, match=r"'curriculum.feature' = \(0.0, 0.1, 0.1\) is not allowed: 0 in every phase "
                     r"with offline_teacher.top_k=8 \(routing_feature reads what the teacher's records do not keep"):
    _parse(**off)
  off["curriculum.feature"] = (0.0, 0.0, 0.0)
  assert _parse(**off).objective.offline_top_k == 8 and _parse(**off).objective.teacher == "records"
  with pytest.raises(ConfigError, match="curriculum.attention"):
    _parse(**{"offline_teacher.top_k": 8})
  with pytest.raises(ConfigError, match="distill.kd_top_k"):
    _parse(**off, **{"distill.kd_top_k": 16})
  with pytest.raises(ConfigError, match="curriculum.ramp_fraction"):
    _parse(**off, **{"curriculum.ramp_fraction": 0.1, "curriculum.temperature": (2.0, 1.5, 1.0)})
  with pytest.raises(ConfigError, match="offline_teacher.top_k"):
    _parse(**{**off, "offline_teacher.top_k": -1})
  cfg = _parse(**off)
  live = dataclasses.replace(cfg.objective, teacher="live", offline_top_k=0)
  assert live == _parse(**{k: v for k, v in off.items() if k != "offline_teacher.top_k"}).objective
