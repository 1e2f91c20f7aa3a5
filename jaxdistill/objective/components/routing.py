"""The student-aware router's three components, all weighted by the curriculum's `feature` entry.

The router (a DistillHeads part, `router.py`) reads the student's final state and gates, per token,
over E teacher experts: the routed experts of one sparse block of a mixture-of-experts teacher, or
the outputs of E teacher blocks. With g the gates at the step's top-k and temperature:

  routing_feature:              mean_d (P(h_s) - sum_e g_e t_e / rms(t_e))^2, a masked token mean
  routing_load_balance:         E * sum_e f_e P_e (Switch Transformer), x router.load_balance_coef
  routing_attention_alignment:  KL(sum_e g_e A_e || A_s) per query row, x router.attention_alignment_coef

Records keep neither expert outputs nor attention maps.
"""

import jax.numpy as jnp

from jaxdistill.objective import router
from jaxdistill.objective.component import Component, Entry, Needs, Term, TermContext

FEATURE = Entry("feature", (0.0, 0.1, 0.1))


def expert_blocks(obj) -> tuple[int, ...]:
  """The teacher blocks behind the router's experts: the MoE block, or the blocks of `expert_layers`."""
  return (obj.router.moe_layer,) if obj.router.experts == "moe" else tuple(e - 1 for e in obj.expert_layers)


def _moe_experts(obj) -> tuple[int, ...]:
  return (obj.router.moe_layer,) if obj.router.experts == "moe" else ()


def _alignment_blocks(obj, student) -> tuple[tuple[int, ...], tuple[int, ...]]:
  return (student.num_layers - 1,), expert_blocks(obj)


def _gate_logits(ctx: TermContext):
  return ctx.at_student(ctx.heads_out["gate_logits"])


def feature_term(ctx: TermContext) -> Term:
  if ctx.obj.router.experts == "moe":  # every routed expert's output [B, Lt, E, D] -> [E, B, A, D]
    experts = router.normalized_experts(jnp.moveaxis(ctx.at_teacher(ctx.teacher_out.expert_outputs[0]), 2, 0))
  else:
    experts = router.normalized_experts([ctx.at_teacher(ctx.teacher_out.hidden_states[e])
                                         for e in ctx.obj.expert_layers])

  def routing_feature(gate_logits, routed, mask, experts, top_k, temperature):
    return router.feature_loss(routed, router.gates(gate_logits, top_k, temperature), experts, mask)

  return routing_feature, (_gate_logits(ctx), ctx.at_student(ctx.heads_out["routed"]), ctx.pairs_BxA, experts,
                           ctx.router_top_k, ctx.gate_temperature)


def load_balance_term(ctx: TermContext) -> Term:
  def routing_load_balance(gate_logits, mask, top_k, temperature):
    return router.load_balance_loss(gate_logits, router.gates(gate_logits, top_k, temperature), temperature, mask)

  return routing_load_balance, (_gate_logits(ctx), ctx.pairs_BxA, ctx.router_top_k, ctx.gate_temperature)


def attention_alignment_term(ctx: TermContext) -> Term:
  block = ctx.student.attention_block

  def routing_attention_alignment(gate_logits, student_rows, expert_rows, mask, top_k, temperature):
    return router.attention_alignment_blockwise(student_rows, expert_rows, router.gates(gate_logits, top_k,
                                                                                       temperature), mask, block)

  return routing_attention_alignment, (
      _gate_logits(ctx), ctx.student_view(ctx.student_qk[ctx.student.num_layers - 1]),
      [ctx.teacher_view(ctx.teacher_qk[b]) for b in expert_blocks(ctx.obj)], ctx.pairs_BxA, ctx.router_top_k,
      ctx.gate_temperature)


ROUTING_FEATURE = Component("routing_feature", FEATURE, feature_term,
                            Needs(heads=True, teacher_states=True, experts=_moe_experts))
ROUTING_LOAD_BALANCE = Component("routing_load_balance", FEATURE, load_balance_term, Needs(teacher=False, heads=True),
                                 scale="router.load_balance_coef")
ROUTING_ATTENTION_ALIGNMENT = Component("routing_attention_alignment", FEATURE, attention_alignment_term,
                                        Needs(heads=True, attention=_alignment_blocks),
                                        scale="router.attention_alignment_coef")
