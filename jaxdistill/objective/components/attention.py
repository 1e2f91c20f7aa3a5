"""attention: attention transfer, KL(teacher row || student row) over unmasked keys, mean over heads,
real queries and `distill.attention_pairs` (default: the last blocks).

The rows are recomputed from each block's queries and keys a block of queries at a time
(`attention_maps.attention_loss`), never the whole map. Records cannot keep attention maps.
"""

from jaxdistill.objective import attention_maps
from jaxdistill.objective.component import Component, Entry, Needs, Term, TermContext


def blocks(obj, student) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(student blocks, teacher blocks) of the attention pairs."""
  return tuple(s for s, _ in obj.attention_pairs), tuple(t for _, t in obj.attention_pairs)


def term(ctx: TermContext) -> Term:
  block = ctx.student.attention_block

  def attention_transfer(student_views, teacher_views, mask):
    return attention_maps.attention_loss(student_views, teacher_views, mask, block)

  pairs = ctx.obj.attention_pairs
  return attention_transfer, ([ctx.student_view(ctx.student_qk[s]) for s, _ in pairs],
                              [ctx.teacher_view(ctx.teacher_qk[t]) for _, t in pairs], ctx.pairs_BxA)


COMPONENT = Component("attention", Entry("attention", (0.0, 0.1, 0.1)), term, Needs(attention=blocks))
