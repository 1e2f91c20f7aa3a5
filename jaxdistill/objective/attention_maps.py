"""Rows of attention maps for the losses, recomputed a block of queries at a time.

The attention-transfer and router attention-alignment losses compare rows of attention maps. Whole
maps are B x H x L x L per layer (float32); instead the model returns a layer's queries and keys
(`models.attention.QueriesKeys`), and each loss recomputes the rows of one block of queries inside a
rematerialised loop (`models.attention.query_blocks`): the step holds O(B x H x block x L), never
O(B x H x L x L), in the forward and the backward pass. The rows are the materialised path's rows,
so the losses equal their whole-map definitions (`losses.attention_loss`,
`router.attention_alignment_loss`).

A `MapView` says which rows of one model's map a loss reads: every query over every key (one
tokenizer), or with two tokenizers the aligned positions over the aligned keys, renormalised
(`cross_vocab.aligned_attention`, one row block at a time).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdistill.models.attention import QueriesKeys, attention_probs, query_blocks
from jaxdistill.objective import cross_vocab, losses


class MapView(NamedTuple):
  """The compared rows of one layer's attention map.

  qk: the layer's queries and keys. key_mask_BxL: the model's attention mask (what its softmax saw).
  index_BxQ: the sequence index of each compared query (Q = L, or the A aligned positions).
  columns_BxQ, column_mask_BxQ: with two tokenizers, the aligned keys (the same positions) and the real
  pairs among them; None: all L keys.
  """
  qk: QueriesKeys
  key_mask_BxL: jax.Array
  index_BxQ: jax.Array
  columns_BxQ: jax.Array | None = None
  column_mask_BxQ: jax.Array | None = None


def full_view(qk: QueriesKeys, mask_BxL: jax.Array) -> MapView:
  """Every query's row over every key (one tokenizer)."""
  batch, length = mask_BxL.shape
  return MapView(qk, mask_BxL, jnp.broadcast_to(jnp.arange(length), (batch, length)))


def aligned_view(qk: QueriesKeys, mask_BxL: jax.Array, positions_BxA: jax.Array, pairs_BxA: jax.Array) -> MapView:
  """The rows of the aligned positions over the aligned keys of real pairs (two tokenizers)."""
  positions_BxA = positions_BxA.astype(jnp.int32)
  return MapView(qk, mask_BxL, positions_BxA, positions_BxA, pairs_BxA)


def rows(view: MapView, index_BxQ: jax.Array) -> jax.Array:
  """Float32 rows [B, H, Q, K] of the queries at sequence indices `index_BxQ` (K: L keys, or A aligned)."""
  q_BxQxNxK = jnp.take_along_axis(view.qk.q_BxLxNxK, index_BxQ[:, :, None, None], axis=1)
  probs_BxHxQxL = attention_probs(q_BxQxNxK, view.qk.k_BxLxGxK, index_BxQ, view.key_mask_BxL, view.qk.scale,
                                  view.qk.window, view.qk.softcap)
  if view.columns_BxQ is None:
    return probs_BxHxQxL
  return cross_vocab.aligned_columns(probs_BxHxQxL, view.columns_BxQ, view.column_mask_BxQ)


def per_query(fn: Callable, views: tuple[MapView, ...], per_query_arrays: tuple, block: int) -> jax.Array:
  """`fn(rows of each view, *per_query_arrays)` -> [B, Q] values, `block` queries at a time.

  The views must compare the same number Q of queries (query q of one is query q of the other).
  `per_query_arrays` ([B, Q, ...]) are sliced alongside, e.g. the router's gates.
  """
  count = len(views)

  def one_block(*arrays):
    index_blocks, extra = arrays[:count], arrays[count:]
    return fn(tuple(rows(v, i) for v, i in zip(views, index_blocks)), *extra)

  return query_blocks(one_block, tuple(v.index_BxQ for v in views) + tuple(per_query_arrays), block)


def attention_loss(student_views, teacher_views, mask_BxQ: jax.Array, block: int) -> jax.Array:
  """`losses.attention_loss` from q and k, a block of queries at a time.

  Mean over layer pairs of the masked query mean of `losses.rows_kl`(teacher row || student row), heads
  aligned with `losses.align_heads`; no gradient reaches the teacher. `mask_BxQ` marks the real queries,
  and the keys compared over (the attention mask with one tokenizer, the real pairs with two).
  """
  def pair_kl(view_rows):
    student_BxHxQxK, teacher_BxHxQxK = losses.align_heads(view_rows[0], jax.lax.stop_gradient(view_rows[1]))
    return losses.rows_kl(teacher_BxHxQxK, student_BxHxQxK, mask_BxQ)

  values = [losses.masked_mean(per_query(pair_kl, (s, t), (), block), mask_BxQ)
            for s, t in zip(student_views, teacher_views)]
  return jnp.mean(jnp.stack(values))
