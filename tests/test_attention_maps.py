"""attention_maps.py: the blockwise attention-transfer and router-alignment losses equal the whole-map ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch
from jaxdistill.models.attention import QueriesKeys, full_maps
from jaxdistill.objective import attention_maps, cross_vocab, losses, router

B, L, K = 3, 9, 8
BLOCKS = (2, 4, 512)   # 2 and 4: several blocks, the last one padded (L = 9); 512: one block


def _qk(heads: int, kv_heads: int, seed: int) -> QueriesKeys:
  rng = np.random.RandomState(seed)
  return QueriesKeys(jnp.asarray(rng.normal(size=(B, L, heads, K)), jnp.float32),
                     jnp.asarray(rng.normal(size=(B, L, kv_heads, K)), jnp.float32), jnp.float32(K ** -0.5))


def _aligned(mask_BxL, seed):
  """Increasing real positions of each row as aligned pairs, the last pair of row 0 unreal."""
  rng = np.random.RandomState(seed)
  pairs = 5
  positions, valid = np.zeros((B, pairs), np.int32), np.ones((B, pairs), np.int32)
  for b in range(B):
    real = np.flatnonzero(mask_BxL[b])
    positions[b] = np.sort(rng.choice(real, pairs, replace=False))
  valid[0, -1] = 0
  return positions, valid


def _views_and_maps(side, aligned):
  """(student views, teacher views, student maps, teacher maps, mask) for two layer pairs."""
  _, mask_BxL = padded_batch(side)
  mask_BxL = jnp.asarray(mask_BxL)
  student = [_qk(2, 1, 0), _qk(2, 2, 1)]     # GQA, and plain multi-head
  teacher = [_qk(4, 2, 2), _qk(6, 3, 3)]     # 4 heads: groups of 2 per student head; 6 heads as well
  s_maps = [full_maps(qk, mask_BxL) for qk in student]
  t_maps = [full_maps(qk, mask_BxL) for qk in teacher]
  if not aligned:
    return ([attention_maps.full_view(qk, mask_BxL) for qk in student],
            [attention_maps.full_view(qk, mask_BxL) for qk in teacher], s_maps, t_maps, mask_BxL)
  s_pos, pairs = _aligned(np.asarray(mask_BxL), 4)
  t_pos, _ = _aligned(np.asarray(mask_BxL), 5)   # the teacher's own positions for the same pairs
  return ([attention_maps.aligned_view(qk, mask_BxL, s_pos, pairs) for qk in student],
          [attention_maps.aligned_view(qk, mask_BxL, t_pos, pairs) for qk in teacher],
          [cross_vocab.aligned_attention(m, s_pos, pairs) for m in s_maps],
          [cross_vocab.aligned_attention(m, t_pos, pairs) for m in t_maps], jnp.asarray(pairs))


@pytest.mark.parametrize("side,aligned", [("left", False), ("right", False), ("left", True),
                                          ("right", True)])
def test_blockwise_attention_loss_equals_the_whole_map_loss(side, aligned):
  s_views, t_views, s_maps, t_maps, mask = _views_and_maps(side, aligned)
  expected = float(losses.attention_loss(s_maps, t_maps, mask))
  assert expected > 0.05   # random maps differ: the comparison is not of zeros

  def whole(student_qk):
    maps = [full_maps(qk, v.key_mask_BxL) for qk, v in zip(student_qk, s_views)]
    if aligned:
      maps = [cross_vocab.aligned_attention(m, v.index_BxQ, v.column_mask_BxQ) for m, v in zip(maps, s_views)]
    return losses.attention_loss(maps, t_maps, mask)

  def blockwise(student_qk, block):
    views = [v._replace(qk=qk) for qk, v in zip(student_qk, s_views)]
    return attention_maps.attention_loss(views, t_views, mask, block)

  student_qk = [v.qk for v in s_views]
  grad_whole = jax.grad(whole)(student_qk)
  for block in BLOCKS:
    value, grad = jax.jit(jax.value_and_grad(blockwise), static_argnums=1)(student_qk, block)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, err_msg=f"block {block}")
    for ours, theirs in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_whole)):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7, err_msg=f"block {block}")


def test_no_gradient_reaches_the_teacher():
  s_views, t_views, _, _, mask = _views_and_maps("left", False)
  grad = jax.grad(lambda t: attention_maps.attention_loss(s_views, [v._replace(qk=qk) for qk, v in zip(t, t_views)],
                                                          mask, 2))([v.qk for v in t_views])
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("experts,aligned", [(1, False), (3, False), (3, True)])
def test_blockwise_router_alignment_equals_the_whole_map_loss(experts, aligned):
  s_views, t_views, s_maps, t_maps, mask = _views_and_maps("left", aligned)
  queries = mask.shape[1]
  expert_views = [t_views[e % 2] for e in range(experts)]
  expert_maps = [t_maps[e % 2] for e in range(experts)]
  gates_BxQxE = jax.nn.softmax(jnp.asarray(np.random.RandomState(7).normal(size=(B, queries, experts)), jnp.float32))
  expected = router.attention_alignment_loss(s_maps[0], expert_maps, gates_BxQxE, mask)

  def whole(qk, gates):
    student_map = full_maps(qk, s_views[0].key_mask_BxL)
    if aligned:
      student_map = cross_vocab.aligned_attention(student_map, s_views[0].index_BxQ, s_views[0].column_mask_BxQ)
    return router.attention_alignment_loss(student_map, expert_maps, gates, mask)

  def blockwise(qk, gates, block):
    return router.attention_alignment_blockwise(s_views[0]._replace(qk=qk), expert_views, gates, mask, block)

  grads_whole = jax.grad(whole, argnums=(0, 1))(s_views[0].qk, gates_BxQxE)
  assert float(expected) > 0.05
  for block in BLOCKS:
    value, grads = jax.jit(jax.value_and_grad(blockwise, argnums=(0, 1)), static_argnums=2)(
        s_views[0].qk, gates_BxQxE, block)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5, err_msg=f"block {block}")
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_whole)):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7, err_msg=f"block {block}")


def test_rows_keep_the_layer_window_and_soft_cap():
  """A windowed, soft-capped layer (window 3, scores capped at 1): the loss-side rows are its map's rows."""
  _, mask_BxL = padded_batch("left")
  qk = _qk(4, 2, 8).replace(window=3, softcap=1.0)
  maps_BxHxLxL = np.asarray(full_maps(qk, jnp.asarray(mask_BxL)))
  assert np.abs(maps_BxHxLxL - np.asarray(full_maps(qk.replace(softcap=0.0), jnp.asarray(mask_BxL)))).max() > 0.05
  seen = maps_BxHxLxL[:, :, 8]   # the last query sees keys 6..8 only, and |score| < 1 bounds their ratios by e^2
  assert (seen[..., :6] == 0).all() and seen[..., 6:].max() / seen[..., 6:].min() < np.e ** 2
  view = attention_maps.full_view(qk, jnp.asarray(mask_BxL))
  index_BxQ = jnp.asarray([[8, 3]] * B)
  np.testing.assert_allclose(attention_maps.rows(view, index_BxQ), maps_BxHxLxL[:, :, [8, 3]], rtol=1e-6, atol=1e-7)
