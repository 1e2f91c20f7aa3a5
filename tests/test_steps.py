"""Train and eval steps: the guard, accumulation, compile-once, eval == training objective."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import models
from jaxdistill.config import arch_group
from jaxdistill.objective import COMPONENTS, ENTRIES, DistillSpec, ResolvedObjective, curriculum_config, init_heads
from jaxdistill.training import steps
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import NONFINITE_COUNTERS, create_train_state

VOCAB = 64
STUDENT = models.families.from_arch(arch_group("llama", VOCAB, 32, 2, 4, 2, 64, 64, True))
TEACHER = models.families.from_arch(arch_group("llama", VOCAB, 48, 3, 6, 2, 96, 64, False))
# One phase with every registry component weighted, so each one matters from step 0: the seed run's last-phase
# weights, 0.05 for any other entry.
_SEED_WEIGHTS = {"kd": 0.7, "lm": 0.3, "attention": 0.1, "feature": 0.1, "layerwise": 0.05, "contrastive": 0.05}
ALL_ON = curriculum_config(boundaries=(), temperature=(2.0,),
                           **{e.name: (_SEED_WEIGHTS.get(e.name, 0.05),) for e in ENTRIES})
OPTIM = OptimConfig(learning_rate=1e-3, heads_learning_rate=1e-3, warmup_steps=0, total_steps=100)


def _setup(curriculum=ALL_ON, optim=OPTIM, **objective):
  cfg = ResolvedObjective(distill=DistillSpec(chunk_size=16), curriculum=curriculum, total_steps=optim.total_steps,
                          **objective)
  return steps.StepSetup(cfg.resolve_layers(STUDENT, TEACHER), STUDENT, TEACHER, optim)


def _state(setup, initial_loss_scale=1.0):
  keys = jax.random.split(jax.random.key(0), 4)
  tx, _ = make_optimizer(setup.optim)
  return create_train_state(models.init_params(STUDENT, keys[0]), init_heads(setup.objective, STUDENT, TEACHER, keys[1]),
                            tx, initial_loss_scale)


def _batch(seed=0, batch=4, length=16, pad=True):
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)
  mask = jnp.ones_like(ids)
  if pad:
    mask = mask.at[0, :5].set(0).at[1, -3:].set(0)
  return {"student_input_ids": ids, "student_attention_mask": mask, "teacher_input_ids": ids,
          "teacher_attention_mask": mask}


@pytest.fixture(scope="module")
def teacher_params():
  return models.init_params(TEACHER, jax.random.key(42))


_train = jax.jit(steps.train_step, static_argnames="setup", donate_argnames="state")
_eval = jax.jit(steps.eval_step, static_argnames="setup")


def _copy(state):
  return jax.tree.map(jnp.copy, state)


def test_metrics_are_flat_and_the_total_is_the_sum_of_weighted_components(teacher_params):
  setup = _setup()
  _, metrics = _train(_state(setup), _batch(), teacher_params, setup=setup)
  assert all(jnp.ndim(v) == 0 for v in metrics.values())
  for c in COMPONENTS:
    assert float(metrics[f"loss/{c}"]) == pytest.approx(float(metrics[f"weight/{c}"] * metrics[f"raw/{c}"]), rel=1e-6)
    assert float(metrics[f"raw/{c}"]) != 0.0, c  # every component is live in this setup
  total = sum(float(metrics[f"loss/{c}"]) for c in COMPONENTS)
  assert float(metrics["loss"]) == pytest.approx(total, rel=1e-6)
  assert float(metrics["lr"]) == pytest.approx(1e-3)  # no warmup, step 0 of the cosine


def test_eval_computes_the_training_objective_at_the_states_step(teacher_params):
  setup = _setup()
  state = _state(setup)
  batch = _batch()
  for _ in range(3):
    state, _ = _train(state, _batch(seed=1), teacher_params, setup=setup)
  evaluated = _eval(state, batch, teacher_params, setup=setup)
  _, trained = _train(_copy(state), batch, teacher_params, setup=setup)
  assert int(evaluated["opt_step"]) == int(trained["opt_step"]) == 3
  for key in [k for k in trained if k.split("/")[0] in ("raw", "weight", "loss")] + ["loss", "temperature"]:
    np.testing.assert_allclose(float(evaluated[key]), float(trained[key]), rtol=1e-6, atol=1e-7, err_msg=key)
  # Plain metrics: perplexity is exp(LM loss); counts are the real tokens and the real next-token targets.
  assert float(evaluated["student_ppl"]) == pytest.approx(np.exp(float(evaluated["student_lm_loss"])), rel=1e-5)
  assert float(evaluated["count/tokens"]) == 4 * 16 - 5 - 3
  assert float(evaluated["count/label_tokens"]) == (16 - 5 - 1) + (16 - 3 - 1) + 15 + 15
  assert 0 <= float(evaluated["top1_agreement"]) <= 1 and float(evaluated["kl_t1"]) > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("index", range(len(COMPONENTS)))
def test_nonfinite_component_is_zeroed_counted_and_the_rest_still_trains(teacher_params, index, bad):
  setup = _setup()
  component = COMPONENTS[index]
  inject = jnp.zeros(len(COMPONENTS)).at[index].set(bad)
  state = _state(setup)
  before = _copy(state.params)
  new_state, metrics = _train(state, {**_batch(), "inject_nonfinite": inject}, teacher_params, setup=setup)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics[f"raw/{component}"]) == 0.0
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["skipped"]) == 0.0
  counts = {k: int(v) for k, v in new_state.nonfinite.items()}
  assert counts == {k: int(k == component) for k in NONFINITE_COUNTERS}
  chex.assert_tree_all_finite(new_state.params)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before["student"], new_state.params["student"])
  assert all(jax.tree.leaves(changed)), "the finite components must still update every student tensor"


def test_nonfinite_component_gives_exactly_the_update_without_it(teacher_params):
  """A NaN kd term contributes nothing: the update equals the one with kd switched off."""
  setup = _setup()
  no_kd = _setup(curriculum=ALL_ON.replace(kd=(0.0,)))
  nan_kd = {**_batch(), "inject_nonfinite": jnp.zeros(len(COMPONENTS)).at[0].set(jnp.nan)}
  with_nan, _ = _train(_state(setup), nan_kd, teacher_params, setup=setup)
  without, _ = _train(_state(no_kd), _batch(), teacher_params, setup=no_kd)
  chex.assert_trees_all_close(with_nan.params, without.params, atol=1e-6)


def test_nonfinite_gradients_skip_the_update_and_shrink_the_fp16_loss_scale(teacher_params):
  setup = dataclasses.replace(_setup(), dynamic_loss_scale=True)
  state = _state(setup, initial_loss_scale=3e38)  # the scaled loss overflows to inf
  before = _copy(state)
  new_state, metrics = _train(state, _batch(), teacher_params, setup=setup)
  assert float(metrics["skipped"]) == 1.0 and int(new_state.nonfinite["grads"]) == 1
  chex.assert_trees_all_equal(new_state.params, before.params)
  chex.assert_trees_all_equal(new_state.opt_state, before.opt_state)
  assert int(new_state.step) == 1 and int(new_state.opt_step) == 0
  assert float(new_state.loss_scale) == pytest.approx(1.5e38)
  # A sane scale trains: finite gradients, an update, the scale unchanged until `period` good steps.
  sane = _state(setup, initial_loss_scale=2.0 ** 10)
  params_before = _copy(sane.params)
  sane, metrics = _train(sane, _batch(), teacher_params, setup=setup)
  assert float(metrics["skipped"]) == 0.0 and int(sane.opt_step) == 1
  assert float(sane.loss_scale) == 2.0 ** 10 and int(sane.loss_scale_good_steps) == 1
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params_before, sane.params)))


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(teacher_params):
  # contrastive (in-batch negatives) and load balance (a product of batch shares) are batch-level
  # statistics, not token means: they are switched off for this identity.
  curriculum = ALL_ON.replace(contrastive=(0.0,))
  router_cfg = dataclasses.replace(ResolvedObjective().router, load_balance_coef=0.0)
  k = 4
  # Adam divides by sqrt(v) + eps: a gradient element near eps = 1e-8, the sum of terms that cancel,
  # turns float32 rounding of the two summation orders into a visible update difference. eps 1e-6
  # keeps the identity about the averaged gradient, not about those few ill-conditioned elements.
  optim = dataclasses.replace(OPTIM, eps=1e-6)
  accumulated = _setup(curriculum, dataclasses.replace(optim, accumulation_steps=k), router=router_cfg)
  single = _setup(curriculum, optim, router=router_cfg)
  big = _batch(seed=3, batch=2 * k, pad=False)  # equal token counts per micro-batch
  micro = [jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], big) for i in range(k)]

  state = _state(accumulated)
  start = _copy(state.params)
  for i, batch in enumerate(micro):
    state, metrics = _train(state, batch, teacher_params, setup=accumulated)
    assert int(metrics["opt_step"]) == 0  # every micro-batch of the window sees the same step
    if i < k - 1:
      chex.assert_trees_all_equal(state.params, start)
  assert int(state.opt_step) == 1 and int(state.step) == k
  reference, _ = _train(_state(single), big, teacher_params, setup=single)
  chex.assert_trees_all_close(state.params, reference.params, atol=2e-6)


def test_fifty_steps_and_repeated_evals_compile_once_each(teacher_params):
  setup = _setup()
  train = jax.jit(chex.assert_max_traces(steps.train_step, n=1), static_argnames="setup", donate_argnames="state")
  evaluate = jax.jit(chex.assert_max_traces(steps.eval_step, n=1), static_argnames="setup")
  train_step = functools.partial(train, teacher_params=teacher_params, setup=setup)
  eval_step = functools.partial(evaluate, teacher_params=teacher_params, setup=setup)
  state = _state(setup)
  first = eval_step(state, _batch())  # step 0: where the every-100-steps debug logging fires
  for i in range(50):
    state, metrics = train_step(state, _batch(seed=i % 5))
    if i % 10 == 9:
      eval_step(state, _batch())
  assert int(state.step) == 50 and int(metrics["opt_step"]) == 49
  at_500 = eval_step(state.replace(step=jnp.int32(500)), _batch())  # another debug-logging step
  assert float(at_500["loss"]) < float(first["loss"])  # and it learned something meanwhile


def test_plain_lm_mode_runs_no_teacher_and_reduces_the_loss():
  """mode 'lm': the same train/eval steps with teacher=None and only the lm term (the plain-LM curriculum)."""
  from jaxdistill.objective.losses import next_token_labels

  objective = ResolvedObjective(distill=DistillSpec(chunk_size=16), total_steps=100).plain_lm()
  assert objective.teacher == "none" and objective.curriculum.values("lm") == (1.0, 1.0, 1.0)
  setup = steps.StepSetup(objective.resolve_layers(STUDENT, None), STUDENT, None, OPTIM)
  assert not objective.needs_teacher and not objective.needs_heads
  tx, _ = make_optimizer(OPTIM)
  state = create_train_state(models.init_params(STUDENT, jax.random.key(0)),
                             init_heads(objective, STUDENT, None, jax.random.key(1)), tx)
  assert state.params["heads"] == {}
  batch = _batch(seed=7)

  first = _eval(state, batch, None, setup=setup)
  assert "teacher_ppl" not in first and "kl_t1" not in first
  # The loss is exactly the next-token cross-entropy of the student, by hand.
  logits_BxLxV = models.forward(state.params["student"], STUDENT, batch["student_input_ids"],
                                batch["student_attention_mask"]).logits_BxLxV
  labels_BxL, label_mask_BxL = next_token_labels(batch["student_input_ids"], batch["student_attention_mask"])
  log_probs_BxLxV = jax.nn.log_softmax(logits_BxLxV)
  nll_BxL = -jnp.take_along_axis(log_probs_BxLxV, labels_BxL[..., None], axis=-1)[..., 0]
  by_hand = float(jnp.sum(nll_BxL * label_mask_BxL) / jnp.sum(label_mask_BxL))
  assert float(first["loss"]) == pytest.approx(by_hand, rel=1e-5)
  assert float(first["raw/lm"]) == pytest.approx(by_hand, rel=1e-5) and float(first["weight/lm"]) == 1.0
  assert all(float(first[f"weight/{c}"]) == 0.0 for c in COMPONENTS if c != "lm")

  for _ in range(30):
    state, metrics = _train(state, batch, None, setup=setup)
  assert int(state.opt_step) == 30
  last = _eval(state, batch, None, setup=setup)
  # From log(64) = 4.16 (a near-uniform start) to about 3.2 on this one batch of random ids.
  assert float(first["loss"]) == pytest.approx(np.log(VOCAB), abs=0.05)
  assert float(last["loss"]) < float(first["loss"]) - 0.75
  assert float(last["student_ppl"]) == pytest.approx(np.exp(float(last["student_lm_loss"])), rel=1e-5)


def test_an_identity_alignment_with_one_vocabulary_computes_the_same_objective(teacher_params):
  """The cross-tokenizer path (aligned pairs, cross-vocabulary kd) reduces to the one-tokenizer path."""
  from jaxdistill.objective.cross_vocab import VocabMap

  # Every component two tokenizers can serve, in both setups.
  curriculum = ResolvedObjective(curriculum=ALL_ON).without_unserved(aligned=True).curriculum
  setup, cross_setup = _setup(curriculum), _setup(curriculum, aligned=True)
  state = _state(setup)
  batch = _batch()
  length = batch["student_input_ids"].shape[1]
  aligned = {**batch, "align_student": jnp.broadcast_to(jnp.arange(length), batch["student_input_ids"].shape),
             "align_teacher": jnp.broadcast_to(jnp.arange(length), batch["student_input_ids"].shape),
             "align_mask": batch["student_attention_mask"]}
  vocab_map = VocabMap.from_pairs(np.arange(VOCAB), np.arange(VOCAB), VOCAB)
  plain = _eval(state, batch, teacher_params, setup=setup)
  cross = _eval(state, aligned, teacher_params, vocab_map, setup=cross_setup)
  for key in [k for k in plain if k.startswith(("raw/", "loss/"))] + ["loss", "kl_t1", "top1_agreement"]:
    np.testing.assert_allclose(float(cross[key]), float(plain[key]), rtol=2e-5, atol=1e-6, err_msg=key)
  assert float(cross["raw/kd"]) > 0 and float(cross["raw/attention"]) > 0
  _, trained = _train(_copy(state), aligned, teacher_params, vocab_map, setup=cross_setup)
  np.testing.assert_allclose(float(trained["loss"]), float(plain["loss"]), rtol=2e-5)
  # The mode is the setup's, not the batch's: an aligned setup refuses a batch without pairs.
  with pytest.raises(ValueError, match="aligned across two tokenizers, but the batch has no align_student"):
    _eval(state, batch, teacher_params, vocab_map, setup=cross_setup)


def test_the_router_routes_a_moe_teachers_real_experts():
  """With a mixture-of-experts teacher the router's experts are one sparse block's routed experts."""
  from jaxdistill.errors import ConfigError
  from jaxdistill.objective import DistillHeads, objective, router

  moe_teacher = dataclasses.replace(TEACHER, family="qwen3_moe", num_experts=3, num_experts_per_tok=2,
                                    moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)
  cfg = ResolvedObjective(distill=DistillSpec(chunk_size=16), curriculum=ALL_ON, total_steps=100)
  cfg = cfg.resolve_layers(STUDENT, moe_teacher)
  # auto -> moe: the last sparse block (1: with sparse step 2 of 3 blocks only block 1 is sparse), 3 experts.
  assert (cfg.router.experts, cfg.router.moe_layer, cfg.router.num_experts, cfg.expert_layers) == ("moe", 1, 3, ())
  blocks = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, experts="blocks", num_experts=4))
  assert blocks.resolve_layers(STUDENT, moe_teacher).expert_layers == (1, 2, 2, 3)
  with pytest.raises(ConfigError, match=r"'router.moe_layer' = 0 .* -1 or one of the teacher's sparse blocks 1"):
    dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, moe_layer=0)).resolve_layers(STUDENT, moe_teacher)
  dense = ResolvedObjective(total_steps=100, router=router.RouterConfig(experts="moe"))
  with pytest.raises(ConfigError, match=r"'router.experts' = 'moe' .* the teacher has no routed experts"):
    dense.resolve_layers(STUDENT, TEACHER)

  keys = jax.random.split(jax.random.key(3), 3)
  teacher_params = models.init_params(moe_teacher, keys[0])
  trainable = {"student": models.init_params(STUDENT, keys[1]), "heads": init_heads(cfg, STUDENT, moe_teacher, keys[2])}
  batch = _batch()
  _, metrics = jax.jit(functools.partial(objective, cfg=cfg, student=STUDENT, teacher=moe_teacher))(
      trainable, teacher_params, batch, jnp.int32(0))
  # By hand: every expert's output in block 1 ([B, L, 3, D]) is the target mix's ingredients.
  student_out = models.forward(trainable["student"], STUDENT, batch["student_input_ids"],
                               batch["student_attention_mask"], output_hidden_states=True)
  teacher_out = models.forward(teacher_params, moe_teacher, batch["teacher_input_ids"],
                               batch["teacher_attention_mask"], expert_layers=(1,))
  chex.assert_shape(teacher_out.expert_outputs[0], (4, 16, 3, TEACHER.hidden_size))
  heads = DistillHeads(cfg, TEACHER.hidden_size).apply({"params": trainable["heads"]}, student_out.hidden_states,
                                                       jnp.zeros((4, STUDENT.hidden_size)))
  top_k, temperature = router.schedule(0.0, cfg.router)
  expected = router.feature_loss(heads["routed"], router.gates(heads["gate_logits"], top_k, temperature),
                                 router.normalized_experts(jnp.moveaxis(teacher_out.expert_outputs[0], 2, 0)),
                                 batch["student_attention_mask"])
  np.testing.assert_allclose(float(metrics["raw/routing_feature"]), float(expected), rtol=1e-5)
  assert float(metrics["raw/routing_attention_alignment"]) > 0
