"""KD across vocabularies: hand-computed values, reduction to plain KD, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.objective import losses
from jaxdistill.objective.cross_vocab import VocabMap, cross_vocab_kd_loss, gather_positions, kd_across, prefix_kd_loss


def _log(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_hand_computed_value_with_shared_and_unmatched_tokens():
  # Teacher p over 4 tokens, student q over 3; teacher ids 0, 1 are student ids 0, 1.
  p, q = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.5, 0.25, 0.25])
  exact = 0.4 * np.log(0.4 / 0.5) + 0.3 * np.log(0.3 / 0.25)
  other = 0.3 * np.log(0.3 / 0.25)                   # unmatched mass: teacher 0.3, student 0.25
  uld = abs(2 / 3 - 1.0) + abs(1 / 3 - 0.0) + 0.0    # sorted tails (2/3, 1/3, 0) vs (1, 0, 0), top 3
  loss = cross_vocab_kd_loss(_log(q)[None, None], _log(p)[None, None], jnp.ones((1, 1)),
                             jnp.array([0, 1]), jnp.array([0, 1]), temperature=1.0)
  assert float(loss) == pytest.approx(exact + other + 0.3 * uld, rel=1e-5)


def test_prefix_kd_hand_computed():
  # Teacher tokens a, b, ab, <special>; student tokens a, b. 'ab' starts with the student's 'a'; the special
  # maps nowhere. p = (0.2, 0.3, 0.4, 0.1) -> kept (a: 0.2 + 0.4, b: 0.3) / 0.9 = (2/3, 1/3).
  p, q = np.array([0.2, 0.3, 0.4, 0.1]), np.array([0.5, 0.5])
  expected = 2 / 3 * np.log((2 / 3) / 0.5) + 1 / 3 * np.log((1 / 3) / 0.5)
  loss = prefix_kd_loss(_log(q)[None, None], _log(p)[None, None], jnp.ones((1, 1)), jnp.array([0, 1, 0, -1]),
                        temperature=1.0)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # Zero when the student puts exactly the projected mass on its tokens; ids past the map are dropped too.
  matched = prefix_kd_loss(_log([2 / 3, 1 / 3])[None, None], _log(p)[None, None], jnp.ones((1, 1)),
                           jnp.array([0, 1, 0]), temperature=1.0)
  assert float(matched) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["prefix", "uld"])
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_vocabularies_give_exactly_the_plain_kd(chunk_size, temperature, mode):
  keys = jax.random.split(jax.random.key(0), 2)
  student_BxLxV = 3 * jax.random.normal(keys[0], (2, 7, 11))
  teacher_BxLxV = 3 * jax.random.normal(keys[1], (2, 7, 11))
  mask_BxL = jnp.ones((2, 7)).at[1, 5:].set(0)
  ids = np.arange(11)
  identity = VocabMap.from_pairs(ids, ids, 11)
  cross = lambda s: kd_across(mode, s, teacher_BxLxV, mask_BxL, identity, temperature=temperature, uld_top_k=128,
                              chunk_size=chunk_size)
  plain = lambda s: losses.kd_loss(s, teacher_BxLxV, mask_BxL, temperature=temperature, chunk_size=chunk_size)
  np.testing.assert_allclose(float(cross(student_BxLxV)), float(plain(student_BxLxV)), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(cross)(student_BxLxV), jax.grad(plain)(student_BxLxV), atol=1e-7)


def test_renaming_the_teacher_vocabulary_changes_nothing():
  keys = jax.random.split(jax.random.key(1), 2)
  student, teacher = jax.random.normal(keys[0], (1, 4, 6)), jax.random.normal(keys[1], (1, 4, 9))
  mask = jnp.ones((1, 4))
  teacher_ids, student_ids = jnp.array([0, 2, 5, 7]), jnp.array([1, 0, 3, 4])
  base = cross_vocab_kd_loss(student, teacher, mask, teacher_ids, student_ids, temperature=1.5)
  perm = np.random.default_rng(0).permutation(9)        # new teacher id of old id i: perm[i]
  renamed = jnp.zeros_like(teacher).at[..., perm].set(teacher)
  moved = cross_vocab_kd_loss(student, renamed, mask, jnp.asarray(perm)[teacher_ids], student_ids, temperature=1.5)
  assert float(moved) == pytest.approx(float(base), rel=1e-6)


def test_zero_when_the_student_matches_shared_tokens_and_the_sorted_tail():
  p = np.array([0.5, 0.2, 0.2, 0.1])              # teacher: ids 0, 1 shared; tail (0.2, 0.1)
  q = np.array([0.1, 0.5, 0.2, 0.0, 0.2])         # student: ids 1, 2 shared; tail (0.1, 0.2, 0.0) sorts alike
  q = np.where(q == 0, 1e-30, q)
  loss = cross_vocab_kd_loss(_log(q)[None, None], _log(p)[None, None], jnp.ones((1, 1)),
                             jnp.array([0, 1]), jnp.array([1, 2]), temperature=1.0)
  assert abs(float(loss)) < 1e-5


def test_no_gradient_reaches_the_teacher_and_masked_pairs_do_not_count():
  keys = jax.random.split(jax.random.key(2), 2)
  student, teacher = jax.random.normal(keys[0], (2, 3, 5)), jax.random.normal(keys[1], (2, 3, 7))
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  args = (jnp.array([0, 3]), jnp.array([4, 1]))
  grad_teacher = jax.grad(lambda t: cross_vocab_kd_loss(student, t, mask, *args, temperature=1.0))(teacher)
  assert float(jnp.abs(grad_teacher).max()) == 0.0
  garbage = teacher.at[0, 2].set(jnp.nan).at[1, 1:].set(jnp.inf)   # only in masked pairs
  assert float(cross_vocab_kd_loss(student, garbage, mask, *args, temperature=1.0)) == pytest.approx(
      float(cross_vocab_kd_loss(student, teacher, mask, *args, temperature=1.0)), rel=1e-6)


def test_gather_positions_by_hand():
  x_BxLxD = jnp.arange(2 * 4 * 3).reshape(2, 4, 3)
  got = gather_positions(x_BxLxD, jnp.array([[3, 0], [1, 1]]))
  np.testing.assert_array_equal(got, np.array([[[9, 10, 11], [0, 1, 2]], [[15, 16, 17], [15, 16, 17]]]))
  np.testing.assert_array_equal(gather_positions(jnp.arange(8).reshape(2, 4), jnp.array([[2], [0]])), [[2], [4]])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_unaligned_positions_are_filled_with_the_data_token(temperature):
  from jaxdistill.objective.cross_vocab import fill_unaligned

  # One row of 3 tokens (ids 2, 0, 1): position 0 is an aligned pair, position 1 is not, position 2 has no label.
  logits_1x3xV = jnp.log(jnp.asarray([[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]], jnp.float32))
  ids, mask = jnp.array([[2, 0, 1]]), jnp.ones((1, 3))
  positions, pairs = jnp.array([[0, 0]]), jnp.array([[1, 0]])  # the second slot is padding
  tempered = np.exp(np.log([0.6, 0.3, 0.1]) / temperature)
  data_kd = temperature ** 2 * -np.log(tempered[1] / tempered.sum())  # position 1 predicts id 1
  filled = fill_unaligned(jnp.float32(0.5), logits_1x3xV, ids, mask, positions, pairs, temperature=temperature)
  assert float(filled) == pytest.approx((0.5 * 1 + data_kd * 1) / 2, rel=1e-5)
  # Every label position aligned: nothing to fill, the pairs' mean is returned as it is.
  all_pairs = fill_unaligned(jnp.float32(0.5), logits_1x3xV, ids, mask, jnp.array([[0, 1]]), jnp.array([[1, 1]]),
                             temperature=temperature)
  assert float(all_pairs) == pytest.approx(0.5, rel=1e-6)
