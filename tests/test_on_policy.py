"""On-policy distillation: sampled batches, the divergence on their completions, no gradient through sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import models, sampling
from jaxdistill.config import arch_group
from jaxdistill.errors import ConfigError
from jaxdistill.objective import DistillSpec, ResolvedObjective, curriculum_config, init_heads, objective, on_policy
from jaxdistill.training import steps
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import create_train_state

VOCAB = 64
EOS = 63
STUDENT = models.families.from_arch(arch_group("llama", VOCAB, 32, 2, 4, 2, 64, 64, True))
TEACHER = models.families.from_arch(arch_group("llama", VOCAB, 48, 2, 6, 2, 96, 64, False))
SPEC = on_policy.OnPolicySpec(fraction=1.0, prompt_length=5, completion_length=6)
OPTIM = OptimConfig(learning_rate=1e-3, heads_learning_rate=1e-3, warmup_steps=0, total_steps=10)
KD_LM = curriculum_config(boundaries=(), temperature=(2.0,), kd=(0.7,), lm=(0.3,), attention=(0,), feature=(0,),
                          layerwise=(0,), contrastive=(0,))


def _setup(spec=SPEC):
  obj = ResolvedObjective(distill=DistillSpec(chunk_size=0), curriculum=KD_LM, on_policy=spec, total_steps=10)
  return steps.StepSetup(obj.resolve_layers(STUDENT, TEACHER), STUDENT, TEACHER, OPTIM, eos_id=EOS)


def _state(setup, seed=0):
  tx, _ = make_optimizer(setup.optim)
  params = models.init_params(STUDENT, jax.random.key(1))
  return create_train_state(params, init_heads(setup.objective, STUDENT, TEACHER, jax.random.key(2)), tx, seed=seed)


def _batch():
  ids = jax.random.randint(jax.random.key(3), (3, 12), 0, EOS)
  mask = jnp.ones_like(ids).at[2, 3:].set(0)  # the last row is too short for a whole prompt
  return {"student_input_ids": ids, "student_attention_mask": mask, "teacher_input_ids": ids,
          "teacher_attention_mask": mask}


@pytest.fixture(scope="module")
def params():
  return {"student": models.init_params(STUDENT, jax.random.key(1)), "teacher": models.init_params(TEACHER,
                                                                                                    jax.random.key(4))}


def test_a_sampled_batch_is_prompt_then_completion_and_its_loss_mask_marks_the_sampled_targets(monkeypatch):
  # The sampler's output fixed by hand: row 0 runs to the end, row 1 ends at its eos (2 tokens), row 2's prompt
  # is short, so it has no loss tokens.
  new_ids = jnp.array([[1, 2, 3, 4, 5, 6], [7, EOS, EOS, EOS, EOS, EOS], [8, 9, 10, 11, 12, 13]], jnp.int32)
  lengths = jnp.array([6, 2, 6], jnp.int32)
  monkeypatch.setattr(sampling, "sample", lambda *args, **kwargs: (new_ids, lengths))
  batch = _batch()
  samples = on_policy.sample_batch(None, STUDENT, batch, jax.random.key(0), SPEC, EOS)
  np.testing.assert_array_equal(samples["student_input_ids"][:, :5], batch["student_input_ids"][:, :5])
  np.testing.assert_array_equal(samples["student_input_ids"][:, 5:], new_ids)
  np.testing.assert_array_equal(samples["teacher_input_ids"], samples["student_input_ids"])
  np.testing.assert_array_equal(samples["student_attention_mask"], [[1] * 11, [1] * 7 + [0] * 4,
                                                                    [1, 1, 1, 0, 0] + [1] * 6])
  # Position t predicts token t + 1: the sampled tokens sit at 5..10, so positions 4..9 carry the loss.
  np.testing.assert_array_equal(samples["loss_mask"], [[0] * 4 + [1] * 6 + [0], [0] * 4 + [1] * 2 + [0] * 5,
                                                       [0] * 11])


def _log_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reverse_kl_by_hand(student_logits, teacher_logits, mask):
  log_q, log_p = _log_softmax(student_logits), _log_softmax(teacher_logits)
  per_token = np.sum(np.exp(log_q) * (log_q - log_p), -1)
  return float(np.sum(per_token * mask) / np.sum(mask))


def test_the_on_policy_loss_is_the_reverse_kl_on_the_completion_tokens(params):
  setup = _setup()
  samples = on_policy.sample_batch(params["student"], STUDENT, _batch(), jax.random.key(5), SPEC, EOS)
  assert float(samples["loss_mask"].sum()) > 0
  trainable = {"student": params["student"], "heads": {}}
  total, metrics = objective(trainable, params["teacher"], samples, jnp.int32(0), setup.objective.on_samples(),
                             STUDENT, TEACHER)
  ids, mask = samples["student_input_ids"], samples["student_attention_mask"]
  student_logits = models.forward(params["student"], STUDENT, ids, mask).logits_BxLxV
  teacher_logits = models.forward(params["teacher"], TEACHER, ids, mask).logits_BxLxV
  expected = _reverse_kl_by_hand(student_logits, teacher_logits, np.asarray(samples["loss_mask"]))
  assert float(total) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["raw/kd"]) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["weight/kd"]) == 1.0 and float(metrics["weight/lm"]) == 0.0
  assert float(metrics["temperature"]) == 1.0  # the divergence is taken at T = 1, whatever the curriculum's
  # The evaluation's view of the same samples: the teacher's NLL of the sampled tokens, and the same KL.
  sample_metrics = on_policy.sample_metrics(student_logits, teacher_logits, samples, VOCAB)
  log_p = _log_softmax(teacher_logits)
  nll = -np.take_along_axis(log_p[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
  loss_mask = np.asarray(samples["loss_mask"])[:, :-1]
  assert float(sample_metrics["samples/teacher_nll"]) == pytest.approx(np.sum(nll * loss_mask) / loss_mask.sum(),
                                                                       rel=1e-5)
  assert float(sample_metrics["samples/reverse_kl"]) == pytest.approx(expected, rel=1e-5)
  assert float(sample_metrics["count/sample_tokens"]) == loss_mask.sum()


def test_no_gradient_flows_through_sampling(params):
  setup = _setup()
  obj, key = setup.objective.on_samples(), jax.random.key(6)

  def loss(student, resample: bool):
    samples = fixed if not resample else on_policy.sample_batch(student, STUDENT, _batch(), key, SPEC, EOS)
    return objective({"student": student, "heads": {}}, params["teacher"], samples, jnp.int32(0), obj, STUDENT,
                     TEACHER)[0]

  fixed = on_policy.sample_batch(params["student"], STUDENT, _batch(), key, SPEC, EOS)
  through = jax.grad(loss)(params["student"], True)
  constant = jax.grad(loss)(params["student"], False)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), through, constant)


_train = jax.jit(steps.train_step, static_argnames="setup")


def test_the_train_step_samples_with_its_state_key_and_a_mixed_fraction_mixes(params):
  on = _setup()
  state = _state(on)
  new_state, metrics = _train(state, _batch(), params["teacher"], setup=on)
  assert float(metrics["sampled"]) == 1.0 and float(metrics["weight/lm"]) == 0.0
  assert not np.array_equal(new_state.sample_key, state.sample_key)  # a fresh key every micro-batch
  again, _ = _train(state, _batch(), params["teacher"], setup=on)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again.params, new_state.params)  # deterministic
  mixed = _setup(dataclasses.replace(SPEC, fraction=0.5))
  state, drawn = _state(mixed), []
  for _ in range(8):
    state, metrics = _train(state, _batch(), params["teacher"], setup=mixed)
    drawn.append(float(metrics["sampled"]))
    assert float(metrics["weight/lm"]) == pytest.approx(0.0 if drawn[-1] else 0.3)  # data batches: the curriculum
  assert 0 < sum(drawn) < 8, drawn


def test_sequence_level_kd_samples_from_the_teacher(params):
  setup = _setup(dataclasses.replace(SPEC, source="teacher", divergence="forward_kl"))
  state = _state(setup)
  _, metrics = _train(state, _batch(), params["teacher"], setup=setup)
  # The step's key path: the state's key splits into the next one and the step's, which splits into the coin's
  # and the sampler's.
  _, step_key = jax.random.split(state.sample_key)
  _, sample_key = jax.random.split(step_key)
  samples = on_policy.sample_batch(params["teacher"], TEACHER, _batch(), sample_key, setup.objective.on_policy, EOS)
  expected, _ = objective({"student": state.params["student"], "heads": {}}, params["teacher"], samples, jnp.int32(0),
                          setup.objective.on_samples(), STUDENT, TEACHER)
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert float(metrics["sampled"]) == 1.0


def test_eval_reports_the_teachers_nll_of_student_samples(params):
  setup = dataclasses.replace(_setup(dataclasses.replace(SPEC, fraction=0.0)), eos_id=-1)  # no row ends early
  metrics = jax.jit(steps.eval_step, static_argnames="setup")(_state(setup), _batch(), params["teacher"],
                                                               setup=setup)
  # A random student writes near-uniform text: the random teacher's NLL of it is about log(VOCAB).
  assert float(metrics["samples/teacher_nll"]) == pytest.approx(np.log(VOCAB), rel=0.05)
  assert float(metrics["samples/reverse_kl"]) > 0
  assert float(metrics["count/sample_tokens"]) == 2 * 6  # two whole prompts, six sampled targets each 


@pytest.mark.parametrize("change, field", [
    (dict(teacher="records", offline_top_k=4), "on_policy.fraction"),
    (dict(aligned=True), "on_policy.fraction"),
])
def test_modes_that_cannot_sample_are_refused(change, field):
  with pytest.raises(ConfigError, match=field):
    ResolvedObjective(curriculum=KD_LM, on_policy=SPEC, **change)
  ResolvedObjective(curriculum=KD_LM, on_policy=dataclasses.replace(SPEC, fraction=0.0), **change)  # off: fine


def test_sampling_starts_at_its_progress():
  spec = dataclasses.replace(SPEC, fraction=0.5, start=0.3)
  assert [float(spec.probability(jnp.float32(p))) for p in (0.0, 0.29, 0.3, 1.0)] == [0.0, 0.0, 0.5, 0.5]
  assert SPEC.always and not spec.always and not dataclasses.replace(SPEC, start=0.3).always


@pytest.mark.parametrize("overrides, message", [
    ({"on_policy.fraction": 1.5}, "'on_policy.fraction' = 1.5 is not allowed: a number in [0, 1]"),
    ({"on_policy.start": 1.0}, "'on_policy.start' = 1.0 is not allowed: a number in [0, 1)"),
    ({"on_policy.source": "oracle"}, "'on_policy.source' = 'oracle' is not allowed: one of student, teacher"),
    ({"on_policy.divergence": "l2"}, "'on_policy.divergence' = 'l2' is not allowed: one of forward_kl, reverse_kl"),
    ({"on_policy.fraction": 1.0, "on_policy.prompt_length": 33},
     "'on_policy.prompt_length' = 33 is not allowed: an integer <= data.seq_len=32"),
    ({"on_policy.fraction": 1.0, "on_policy.completion_length": 500},
     "'student.arch.max_position_embeddings' = 512 is not allowed: an integer >= on_policy.prompt_length + "
     "completion_length=516"),
])
def test_bad_on_policy_settings_name_their_field(overrides, message):
  from jaxdistill import config as config_lib

  with pytest.raises(ConfigError) as e:
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))
  assert message in str(e.value)
