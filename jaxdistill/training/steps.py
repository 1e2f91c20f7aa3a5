"""`train_step` and `eval_step`: module-level pure functions, each compiled once.

Both read the optimizer step from the state, so evaluation computes exactly the training
objective at that step. Static configuration travels in one hashable `StepSetup`; the teacher's
params are an argument (never part of the state). `compile_steps` binds setup and teacher and
returns `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jmp
import optax

from jaxdistill.models import ModelConfig, forward
from jaxdistill.objective import (COMPONENTS, ResolvedObjective, cross_vocab, curriculum, losses, objective,
                                  offline_teacher, on_policy, run_models)
from jaxdistill.parallel import MeshPlan
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSetup:
  objective: ResolvedObjective  # already resolve_layers-ed for these models; its teacher mode and alignment
                                # decide what the step reads (a teacher forward, records; aligned pairs)
  student: ModelConfig
  teacher: ModelConfig | None  # None: plain LM training (only the `lm` term, no teacher forward)
  optim: OptimConfig
  dynamic_loss_scale: bool = False  # fp16 compute: scale the loss, skip and shrink on overflow
  eos_id: int = -1                  # the tokenizer's end of sequence: a sampled completion stops there (-1: none)


def train_step(state: TrainState, batch, teacher_params, vocab_map=None, *, setup: StepSetup):
  """One micro-batch: gradients of the guarded objective, accumulated; an update every k calls.

  With `on_policy.fraction` > 0 the micro-batch may first be replaced by sequences sampled from it
  (`_sampled_or_not`); the state's `sample_key` advances every call either way.

  Non-finite gradients (after unscaling) leave params and optimizer state untouched and count in
  `nonfinite['grads']`; with fp16 the dynamic loss scale shrinks on them and grows after a run of
  finite steps.
  """
  tx, lr_fn = make_optimizer(setup.optim)
  opt_step = state.opt_step
  scaler = state.loss_scaler(setup.dynamic_loss_scale)
  sample_key, step_key = jax.random.split(state.sample_key)

  def gradients(objective_batch, obj: ResolvedObjective):
    def loss_fn(trainable):
      total, metrics = objective(trainable, teacher_params, objective_batch, opt_step, obj, setup.student,
                                 setup.teacher, vocab_map=vocab_map)
      return scaler.scale(total), metrics

    return jax.grad(loss_fn, has_aux=True)(state.params)

  grads, metrics, sampled = _sampled_or_not(state, batch, teacher_params, step_key, gradients, setup)
  metrics["sampled"] = sampled.astype(jnp.float32)
  grads = scaler.unscale(grads)
  finite = jmp.all_finite(grads)
  params, opt_state = tx.apply(grads, state.params, state.opt_state, finite)
  nonfinite = {c: state.nonfinite[c] + metrics[f"nonfinite/{c}"].astype(jnp.int32) for c in COMPONENTS}
  nonfinite["grads"] = state.nonfinite["grads"] + (~finite).astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite,
                            skipped_streak=jnp.where(finite, 0, state.skipped_streak + 1), sample_key=sample_key)
  if setup.dynamic_loss_scale:
    adjusted = scaler.adjust(finite)
    new_state = new_state.replace(loss_scale=adjusted.loss_scale, loss_scale_good_steps=adjusted.counter)
  metrics.update({
      "opt_step": opt_step, "lr": lr_fn(opt_step), "grad_norm": optax.global_norm(grads),
      "skipped": (~finite).astype(jnp.float32), "loss_scale": state.loss_scale,
      **{f"count/nonfinite/{k}": v for k, v in nonfinite.items()}})
  return new_state, metrics


def _sampled_or_not(state: TrainState, batch, teacher_params, key, gradients, setup: StepSetup):
  """(grads, metrics, whether the micro-batch was sampled): `gradients(batch, objective)` of the data
  micro-batch, or with probability `on_policy.fraction` (from progress `on_policy.start` on) of sequences
  sampled from it (on_policy.py).

  A mixed fraction draws the choice from `key` and runs one branch of a `lax.cond`: a step pays for the
  sampler only when it samples.
  """
  obj = setup.objective
  spec = obj.on_policy
  if not spec.enabled:
    return (*gradients(batch, obj), jnp.zeros((), bool))
  coin_key, sample_key = jax.random.split(key)

  def on_samples(_):
    writer, cfg = ((state.params["student"], setup.student) if spec.source == "student"
                   else (teacher_params, setup.teacher))
    samples = on_policy.sample_batch(writer, cfg, batch, sample_key, spec, setup.eos_id)
    return gradients(samples, obj.on_samples())

  if spec.always:
    return (*on_samples(None), jnp.ones((), bool))
  sampled = jax.random.bernoulli(coin_key, spec.probability(curriculum.progress(state.opt_step, obj.total_steps)))
  return (*jax.lax.cond(sampled, on_samples, lambda _: gradients(batch, obj), None), sampled)


def eval_step(state: TrainState, batch, teacher_params, vocab_map=None, *, setup: StepSetup):
  """The training objective at the state's step, plus plain metrics, and token counts for reduction.

  With an offline teacher (`cfg.teacher == 'records'`) the objective reads records made here from the
  live teacher, exactly as training makes them. Plain metrics: student and teacher LM loss and perplexity,
  KL(teacher || student) at T = 1 over the full vocabulary, and top-1 agreement (the student's alone with no
  teacher); with two tokenizers KL is the cross-vocabulary kd at T = 1 and agreement compares tokens by
  their bytes, both over aligned pairs (each model's LM loss stays per its own tokens). `count/tokens` (KD tokens),
  `count/label_tokens` (LM targets), `count/teacher_label_tokens` and, with two tokenizers, `count/pairs`
  let the caller form token-weighted means over a whole split (`metrics.EvalReducer`). With
  `on_policy.eval_samples` (one tokenizer) the student also continues each row's prompt with a fixed key:
  `samples/teacher_nll` and `samples/reverse_kl` over `count/sample_tokens` (`on_policy.sample_metrics`).
  """
  cfg, student, teacher = setup.objective, setup.student, setup.teacher
  models_out = run_models(state.params["student"], teacher_params, batch, cfg, student, teacher,
                          live_teacher=cfg.teacher != "none")
  student_out, student_qk, teacher_out, _ = models_out
  objective_batch = batch
  if cfg.teacher == "records":  # records from the live teacher, as training makes them: comparable losses
    record = offline_teacher.record_from_output(teacher_out, batch["teacher_attention_mask"], cfg,
                                                min(student.vocab_size, teacher.vocab_size))
    objective_batch = {**batch, offline_teacher.RECORD_KEY: record}
    models_out = (student_out, student_qk, None, {})
  _, metrics = objective(state.params, teacher_params, objective_batch, state.opt_step, cfg, student, teacher,
                         models_out=models_out, vocab_map=vocab_map)
  mask_BxL = batch["student_attention_mask"]
  labels_BxL, label_mask_BxL = losses.next_token_labels(batch["student_input_ids"], mask_BxL)
  chunk_size = cfg.distill.chunk_size
  student_lm = losses.lm_loss(student_out.logits_BxLxV, labels_BxL, label_mask_BxL, chunk_size=chunk_size)
  mask = mask_BxL.astype(jnp.float32)
  metrics.update({
      "opt_step": state.opt_step, "student_lm_loss": student_lm, "student_ppl": jnp.exp(student_lm),
      "count/tokens": jnp.sum(mask), "count/label_tokens": jnp.sum(label_mask_BxL.astype(jnp.float32)),
  })
  if teacher is None:
    return metrics
  teacher_labels_BxL, teacher_label_mask_BxL = losses.next_token_labels(batch["teacher_input_ids"],
                                                                        batch["teacher_attention_mask"])
  teacher_lm = losses.lm_loss(teacher_out.logits_BxLxV, teacher_labels_BxL, teacher_label_mask_BxL,
                              chunk_size=chunk_size)
  metrics.update({"teacher_lm_loss": teacher_lm, "teacher_ppl": jnp.exp(teacher_lm),
                  "count/teacher_label_tokens": jnp.sum(teacher_label_mask_BxL.astype(jnp.float32))})
  sampled = cfg.on_policy.fitted(batch["student_input_ids"].shape[1],
                                 min(student.max_position_embeddings, teacher.max_position_embeddings))
  if cfg.on_policy.eval_samples and sampled is not None and not cfg.aligned:
    metrics.update(_sample_metrics(state.params["student"], teacher_params, batch, sampled, setup))
  if cfg.aligned:
    metrics["count/pairs"] = jnp.sum(batch["align_mask"].astype(jnp.float32))
    at_s = cross_vocab.gather_positions(student_out.logits_BxLxV, batch["align_student"])
    at_t = cross_vocab.gather_positions(teacher_out.logits_BxLxV, batch["align_teacher"])
    pairs_BxA = batch["align_mask"]
    metrics.update({
        "kl_t1": cross_vocab.kd_across(cfg.distill.cross_vocab_kd, at_s, at_t, pairs_BxA, vocab_map, temperature=1.0,
                                       uld_top_k=cfg.distill.uld_top_k, chunk_size=chunk_size),
        "top1_agreement": cross_vocab.top1_agreement(at_s, at_t, pairs_BxA, vocab_map.student_to_teacher_Vs)})
    return metrics
  vocab = min(student.vocab_size, teacher.vocab_size)
  student_logits, teacher_logits = student_out.logits_BxLxV[..., :vocab], teacher_out.logits_BxLxV[..., :vocab]
  agree_BxL = (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
  metrics.update({
      "kl_t1": losses.kd_loss(student_logits, teacher_logits, mask_BxL, temperature=1.0, chunk_size=chunk_size),
      "top1_agreement": jnp.sum(agree_BxL * mask) / jnp.maximum(jnp.sum(mask), 1.0),
  })
  return metrics


def _sample_metrics(student_params, teacher_params, batch, spec: on_policy.OnPolicySpec, setup: StepSetup) -> dict:
  """The teacher's NLL of completions the student samples for the batch's prompts, and the reverse KL on
  them (`on_policy.sample_metrics`), with the fixed key `on_policy.EVAL_SEED`."""
  samples = on_policy.sample_batch(student_params, setup.student, batch, jax.random.key(on_policy.EVAL_SEED), spec,
                                   setup.eos_id)
  ids_BxT, mask_BxT = samples["student_input_ids"], samples["student_attention_mask"]
  student_logits = forward(student_params, setup.student, ids_BxT, mask_BxT, right_padded=True).logits_BxLxV
  teacher_logits = forward(teacher_params, setup.teacher, ids_BxT, mask_BxT, right_padded=True).logits_BxLxV
  return on_policy.sample_metrics(student_logits, teacher_logits, samples,
                                  min(setup.student.vocab_size, setup.teacher.vocab_size))


def jit_train_step(plan: MeshPlan | None = None, state=None, donate: bool = True):
  """`train_step` jitted (setup static); with a `plan`, its state and metrics leave it with fixed shardings.

  Pinning the new state to the shardings of `state` (what `plan.state_shardings` gave it) keeps every
  step's input and output layout one, so the donated buffers are reused in place.
  """
  donate_argnames = "state" if donate else ()
  if plan is None:
    return jax.jit(train_step, static_argnames="setup", donate_argnames=donate_argnames)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return plan.bind(jax.jit(train_step, static_argnames="setup", donate_argnames=donate_argnames,
                           out_shardings=(shardings, plan.replicated)))


def compile_steps(setup: StepSetup, teacher_params, vocab_map=None, plan: MeshPlan | None = None, state=None):
  """(train_step(state, batch), eval_step(state, batch)), jitted once, the state donated in training.

  `vocab_map` (a `cross_vocab.VocabMap`) when teacher and student have different tokenizers. With a
  `plan`, `state` (already placed by the plan) fixes the layout the train step keeps, and metrics come
  back replicated.
  """
  jit_train = jit_train_step(plan, state)
  jit_eval = jax.jit(eval_step, static_argnames="setup",
                     **({"out_shardings": plan.replicated} if plan is not None else {}))
  if plan is not None:
    jit_eval = plan.bind(jit_eval)
  return (functools.partial(jit_train, teacher_params=teacher_params, vocab_map=vocab_map, setup=setup),
          functools.partial(jit_eval, teacher_params=teacher_params, vocab_map=vocab_map, setup=setup))
