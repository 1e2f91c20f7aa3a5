"""kd: logit distillation, T^2 * D(softmax(z_t / T), softmax(z_s / T)), a masked token mean.

D is `distill.kd_mode` (forward KL by default; `losses.kd_loss`), over the ids both vocabularies cover,
at the curriculum's temperature. The teacher enters three ways, fixed by the objective's static mode:
its live logits; its offline records (`offline_teacher.kd_loss`: the top-k logits plus the rest of the
mass as one outcome); or, across two tokenizers, its logits at the aligned pairs against the student's
(`cross_vocab.kd_across`), with the unaligned student positions matched to the data's next token.
"""

from jaxdistill.errors import ConfigError
from jaxdistill.objective import cross_vocab, losses, offline_teacher
from jaxdistill.objective.component import Component, Entry, Needs, Term, TermContext


def term(ctx: TermContext) -> Term:
  d = ctx.obj.distill
  if ctx.obj.aligned:
    def across(student_logits, teacher_logits, pairs, positions, ids, mask, vocab_map, temperature):
      at_pairs = cross_vocab.kd_across(d.cross_vocab_kd, cross_vocab.gather_positions(student_logits, positions),
                                       teacher_logits, pairs, vocab_map, temperature=temperature,
                                       uld_top_k=d.uld_top_k, chunk_size=d.chunk_size)
      if not d.fill_unaligned:
        return at_pairs
      return cross_vocab.fill_unaligned(at_pairs, student_logits, ids, mask, positions, pairs,
                                        temperature=temperature, chunk_size=d.chunk_size)

    return across, (ctx.student_out.logits_BxLxV, ctx.at_teacher(ctx.teacher_out.logits_BxLxV), ctx.pairs_BxA,
                    ctx.batch["align_student"], ctx.batch["student_input_ids"], ctx.mask_BxL, ctx.vocab_map,
                    ctx.kd_temperature)
  vocab, obj = ctx.shared_vocab, ctx.obj
  if obj.teacher == "records":
    def from_records(student_logits, record, mask, step, temperature):
      return offline_teacher.kd_loss(student_logits[..., :vocab], record, mask, step, obj, temperature=temperature)

    return from_records, (ctx.student_out.logits_BxLxV, ctx.record, ctx.mask_BxL, ctx.opt_step, ctx.kd_temperature)

  def live(student_logits, teacher_logits, mask, temperature):
    return losses.kd_loss(student_logits[..., :vocab], teacher_logits[..., :vocab], mask, temperature=temperature,
                          mode=d.kd_mode, jsd_beta=d.jsd_beta, top_k=d.kd_top_k, topk_tail=d.kd_topk_tail,
                          chunk_size=d.chunk_size)

  return live, (ctx.student_out.logits_BxLxV, ctx.teacher_out.logits_BxLxV, ctx.mask_BxL, ctx.kd_temperature)


def check(obj) -> None:
  """The kd settings two tokenizers and records cannot serve."""
  d = obj.distill
  if obj.aligned and d.kd_mode != "forward_kl":
    raise ConfigError("distill.kd_mode", d.kd_mode, "forward_kl when the teacher's tokenizer differs from the run's "
                      "(cross-vocabulary kd is a forward KL over the shared tokens plus ULD on the rest)")
  if obj.aligned and d.kd_top_k:
    raise ConfigError("distill.kd_top_k", d.kd_top_k, "0 when the teacher's tokenizer differs from the run's "
                      "(distill.uld_top_k bounds the vocabulary-free part instead)")
  if obj.teacher != "records":
    return
  cur = obj.curriculum
  if cur.ramp_fraction > 0 and len(set(cur.temperature)) > 1:
    raise ConfigError("curriculum.ramp_fraction", cur.ramp_fraction, "0 with offline_teacher.top_k > 0 and "
                      "temperatures that differ by phase (records keep the normaliser of each phase's temperature, "
                      "not of the ramp's)")
  if d.kd_top_k > obj.offline_top_k:
    raise ConfigError("distill.kd_top_k", d.kd_top_k, f"at most offline_teacher.top_k={obj.offline_top_k}")


COMPONENT = Component("kd", Entry("kd", (0.7, 0.7, 0.7)), term, Needs(teacher=True), scale="curriculum.alpha_kd",
                      records=True, two_tokenizers=True, check=check)
