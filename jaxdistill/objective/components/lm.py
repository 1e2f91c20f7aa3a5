"""lm: the student's next-token cross-entropy on the data, padding excluded, optionally label-smoothed.

The one component that needs no teacher: plain LM training (mode 'lm', the teacher and scratch
stages) weighs it 1 in every phase and nothing else.
"""

from jaxdistill.objective import losses
from jaxdistill.objective.component import Component, Entry, Needs, Term, TermContext


def term(ctx: TermContext) -> Term:
  d = ctx.obj.distill

  def lm(student_logits, ids, mask):
    labels, label_mask = losses.next_token_labels(ids, mask)
    return losses.lm_loss(student_logits, labels, label_mask, label_smoothing=d.label_smoothing,
                          chunk_size=d.chunk_size)

  return lm, (ctx.student_out.logits_BxLxV, ctx.batch["student_input_ids"], ctx.mask_BxL)


COMPONENT = Component("lm", Entry("lm", (0.3, 0.3, 0.3), plain_lm=1.0), term, Needs(teacher=False), records=True)
