"""The distillation objective: the models' forward passes, then every enabled registry component.

`objective(...)` runs the teacher (no gradient) and the student on one batch and returns the total
loss and a flat metrics dict: for each registry component `raw/<c>` (unweighted, after the guard),
`weight/<c>` and `loss/<c>` (weighted); `loss` is the sum of the `loss/<c>`. It is a pure function of
its inputs and the optimizer step, so training and evaluation at the same step compute the same
thing. How the teacher enters (live, records, none) and whether batches are aligned across two
tokenizers is the objective's static setup (`ResolvedObjective.teacher`, `.aligned`), never read off
the batch.
"""

import jax
import jax.numpy as jnp

from jaxdistill.models import ModelConfig, forward
from jaxdistill.objective import attention_maps, cross_vocab, curriculum, losses, offline_teacher, router
from jaxdistill.objective.component import TermContext
from jaxdistill.objective.guard import guard
from jaxdistill.objective.heads import DistillHeads
from jaxdistill.objective.registry import REGISTRY
from jaxdistill.objective.spec import ResolvedObjective, component_weights


def run_models(student_params, teacher_params, batch, cfg: ResolvedObjective, student: ModelConfig,
               teacher: ModelConfig | None, live_teacher: bool | None = None):
  """Student forward (differentiable) and teacher forward (stop_gradient), with what the enabled components read.

  Returns (student output, {block: its QueriesKeys}, teacher output, {block: its QueriesKeys}); the
  attention losses recompute map rows from those q and k. The teacher runs when `live_teacher`
  (default: `cfg.teacher == 'live'`; evaluation with records runs it to make them); otherwise its
  output is None. Batches are the pipeline's packed rows, padded only at their end (`right_padded`:
  the fused attention kernel then takes the causal mask alone).
  """
  student_attn, teacher_attn = cfg.attention_blocks(student)
  student_out = forward(student_params, student, batch["student_input_ids"], batch["student_attention_mask"],
                        output_hidden_states=cfg.needs_heads, qk_layers=student_attn, right_padded=True)
  student_qk = dict(zip(student_attn, student_out.queries_keys))
  if not (cfg.teacher == "live" if live_teacher is None else live_teacher):
    return student_out, student_qk, None, {}
  teacher_out = forward(teacher_params, teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                        output_hidden_states=cfg.needs_teacher_states, qk_layers=teacher_attn,
                        expert_layers=cfg.expert_blocks(), right_padded=True)
  teacher_out = jax.lax.stop_gradient(teacher_out)
  return student_out, student_qk, teacher_out, dict(zip(teacher_attn, teacher_out.queries_keys))


def _alignment(batch, aligned: bool):
  """(student positions -> aligned, teacher positions -> aligned, each model's q/k -> its `MapView`, pair mask).

  A batch from two tokenizers carries `align_student`, `align_teacher` and `align_mask` [B, A]: pair a
  is a student and a teacher position after which both models have read exactly the same text; the
  attention losses then compare the aligned rows over the aligned keys. With one tokenizer every
  position is its own pair, the positions are identities and the views are whole maps.
  """
  s_mask = batch["student_attention_mask"]
  t_mask = batch.get("teacher_attention_mask", s_mask)  # absent in plain LM training
  if not aligned:
    same = lambda x: x  # noqa: E731
    return (same, same, lambda qk: attention_maps.full_view(qk, s_mask),
            lambda qk: attention_maps.full_view(qk, t_mask), s_mask)
  if "align_mask" not in batch:
    raise ValueError("the objective is aligned across two tokenizers, but the batch has no align_student, "
                     "align_teacher, align_mask (data.pipeline makes them with a teacher tokenizer)")
  s_pos, t_pos, pairs = batch["align_student"], batch["align_teacher"], batch["align_mask"]
  return (lambda x: cross_vocab.gather_positions(x, s_pos),
          lambda x: cross_vocab.gather_positions(x, t_pos),
          lambda qk: attention_maps.aligned_view(qk, s_mask, s_pos, pairs),
          lambda qk: attention_maps.aligned_view(qk, t_mask, t_pos, pairs),
          pairs)


def objective(trainable, teacher_params, batch, opt_step: jax.Array, cfg: ResolvedObjective, student: ModelConfig,
              teacher: ModelConfig | None, models_out=None, vocab_map: cross_vocab.VocabMap | None = None):
  """Total loss and metrics at optimizer step `opt_step`.

  Args:
    trainable: {'student': student params, 'heads': DistillHeads params}.
    teacher_params: the teacher's params (no gradient flows into them); None with no teacher.
    batch: student_/teacher_ input_ids and attention_mask ([B, Ls], [B, Lt]); with `cfg.aligned`
      also `align_student`, `align_teacher`, `align_mask` [B, A] (see `_alignment`): every
      teacher-student comparison is then made on aligned pairs only; with `cfg.teacher == 'records'`
      the teacher's records (`offline_teacher.RECORD_KEY`), read instead of running it. Optionally
      `inject_nonfinite` [len(COMPONENTS)], added to the raw component values (0 normally; NaN/Inf to
      drill the guard and the run monitor), and `loss_mask` [B, L] (a sampled batch: the tokens the
      token-mean terms average over, its completions; the attention mask otherwise).
    opt_step: int32 optimizer step; drives the curriculum and the router schedules.
    cfg, student, teacher: static configs (cfg already `resolve_layers`-ed); teacher None for
      plain LM training (`cfg.teacher == 'none'`).
    models_out: precomputed `run_models` output (eval reuses it for its plain metrics).
    vocab_map: the shared tokens of two vocabularies (`cross_vocab.VocabMap`); required with
      `cfg.aligned`, where kd is `cross_vocab.kd_across` (`distill.cross_vocab_kd`).
  """
  if models_out is None:
    models_out = run_models(trainable["student"], teacher_params, batch, cfg, student, teacher)
  student_out, student_qk, teacher_out, teacher_qk = models_out
  # The tokens the token means average over: a sampled batch's completion tokens (on_policy.py), else every token.
  mask_BxL = batch.get("loss_mask", batch["student_attention_mask"])
  record = None
  if cfg.teacher == "records":
    if offline_teacher.RECORD_KEY not in batch:
      raise ValueError(f"the objective reads the teacher's records (offline_teacher.top_k={cfg.offline_top_k}), but "
                       f"the batch has no {offline_teacher.RECORD_KEY!r} (offline_teacher.compute_records)")
    record = batch[offline_teacher.RECORD_KEY]
  heads_out = None
  if cfg.needs_heads:
    pooled_BxD = losses.masked_mean_pool(student_out.hidden_states[-1], mask_BxL)
    heads_out = DistillHeads(cfg, teacher.hidden_size).apply({"params": trainable["heads"]},
                                                             student_out.hidden_states, pooled_BxD)
  at_student, at_teacher, student_view, teacher_view, pairs_BxA = _alignment(batch, cfg.aligned)
  kd_temperature = curriculum.temperature(opt_step, cfg.total_steps, cfg.curriculum)
  top_k, gate_temperature = router.schedule(curriculum.progress(opt_step, cfg.total_steps), cfg.router)
  ctx = TermContext(obj=cfg, student=student, teacher=teacher, batch=batch, student_out=student_out,
                    student_qk=student_qk, teacher_out=teacher_out, teacher_qk=teacher_qk, record=record,
                    heads_out=heads_out, mask_BxL=mask_BxL, pairs_BxA=pairs_BxA, at_student=at_student,
                    at_teacher=at_teacher, student_view=student_view, teacher_view=teacher_view, opt_step=opt_step,
                    kd_temperature=kd_temperature, router_top_k=top_k, gate_temperature=gate_temperature,
                    vocab_map=vocab_map)
  inject = batch.get("inject_nonfinite", jnp.zeros(len(REGISTRY), jnp.float32))
  weights = component_weights(opt_step, cfg)
  metrics, total = {}, jnp.zeros((), jnp.float32)
  for index, component in enumerate(REGISTRY):
    if cfg.enabled(component.name):
      fn, args = component.term(ctx)
      # Traced values enter as arguments: a custom_vjp function may not close over them.
      raw, nonfinite = guard(lambda *a, fn=fn: fn(*a[:-1]) + a[-1])(*args, inject[index])
    else:
      raw, nonfinite = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    name = component.name
    weighted = weights[name] * raw
    total = total + weighted
    metrics.update({f"raw/{name}": raw, f"weight/{name}": weights[name], f"loss/{name}": weighted,
                    f"nonfinite/{name}": nonfinite})
  metrics.update({"loss": total, "temperature": kd_temperature, "router/top_k": top_k.astype(jnp.float32),
                  "router/temperature": gate_temperature})
  return total, metrics
