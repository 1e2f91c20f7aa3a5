"""Logit distillation between two vocabularies, on positions where both models have read the same text.

The student's distribution q (over V_s) and the teacher's p (over V_t) at one aligned position
predict the same continuation of the same text, in different tokens. The vocabularies share a set
M of tokens that stand for identical bytes (`data.alignment.vocab_mapping`: teacher id j <-> student
id sigma(j)); the rest, U_t and U_s, have no counterpart. The loss is KL's chain rule over the
partition {M, U}, with the unmatched part compared vocabulary-free:

  kd_x = T^2 [ sum_{j in M} p_j log(p_j / q_sigma(j))          exact KL on the shared tokens
               + u_p log(u_p / u_q)                            the unmatched mass, as one outcome
               + u_p * ULD(p|U_t, q|U_s) ]                     the unmatched tails, vocabulary-free

with u_p = sum_{U_t} p, u_q = sum_{U_s} q (so the first two terms are KL over the matched tokens
plus one "other" outcome), and ULD the Universal Logit Distillation distance: the L1 distance
between the two conditional tail distributions, each sorted in decreasing order (compared rank by
rank, over their `uld_top_k` largest probabilities). With identical vocabularies U is empty,
u_p = 0, and kd_x is exactly the forward KL of `losses.kd_loss`.

References:
  Boizard et al., Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
  LLMs, 2024 (the sorted-probability distance).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.objective.losses import lm_loss, masked_mean, next_token_labels, token_chunks

_EPS = 1e-12


CROSS_VOCAB_KD = ("prefix", "uld")  # distill.cross_vocab_kd: prefix_kd_loss | cross_vocab_kd_loss


@flax.struct.dataclass
class VocabMap:
  """How two vocabularies correspond, as arrays the jitted step takes."""
  teacher_ids_M: jax.Array          # int32 teacher ids of the shared tokens (identical bytes)
  student_ids_M: jax.Array          # int32 student ids, pairwise with teacher_ids_M
  student_to_teacher_Vs: jax.Array  # int32 teacher id of every student id, -1 when it has none
  teacher_to_student_Vt: jax.Array  # int32 student id of the longest prefix of every teacher token, -1: none

  @classmethod
  def from_pairs(cls, teacher_ids_M, student_ids_M, student_vocab: int, teacher_to_student=None,
                 teacher_vocab: int | None = None) -> "VocabMap":
    """From the shared pairs and (optional) the prefix map; vocabularies as large as the models' outputs.

    Without a prefix map the shared pairs are the whole map (ids outside them map nowhere).
    """
    teacher_ids_M, student_ids_M = np.asarray(teacher_ids_M, np.int32), np.asarray(student_ids_M, np.int32)
    student_to_teacher_Vs = np.full((student_vocab,), -1, np.int32)
    student_to_teacher_Vs[student_ids_M] = teacher_ids_M
    if teacher_vocab is None:
      teacher_vocab = max(len(teacher_to_student) if teacher_to_student is not None else 0,
                          int(teacher_ids_M.max(initial=-1)) + 1)
    teacher_to_student_Vt = np.full((teacher_vocab,), -1, np.int32)
    if teacher_to_student is None:
      teacher_to_student_Vt[teacher_ids_M] = student_ids_M
    else:
      teacher_to_student_Vt[:len(teacher_to_student)] = teacher_to_student
    return cls(jnp.asarray(teacher_ids_M), jnp.asarray(student_ids_M), jnp.asarray(student_to_teacher_Vs),
               jnp.asarray(teacher_to_student_Vt))


def gather_positions(x_BxLx: jax.Array, positions_BxA: jax.Array) -> jax.Array:
  """x[b, positions[b, a], ...] -> [B, A, ...]: one model's values at its aligned positions."""
  index = positions_BxA.reshape(positions_BxA.shape + (1,) * (x_BxLx.ndim - 2))
  return jnp.take_along_axis(x_BxLx, index.astype(jnp.int32), axis=1)


def _unmatched(vocab: int, matched_ids_M: jax.Array) -> jax.Array:
  return jnp.ones((vocab,), bool).at[matched_ids_M].set(False)


def _sorted_tail(probs_NxV: jax.Array, unmatched_V: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """(the unmatched probabilities renormalised, largest first, top_k of them; their total mass u)."""
  tail_NxV = jnp.where(unmatched_V[None, :], probs_NxV, 0.0)
  mass_N = jnp.sum(tail_NxV, axis=-1)
  top_NxK, _ = jax.lax.top_k(tail_NxV, top_k)
  return top_NxK / jnp.maximum(mass_N, _EPS)[:, None], mass_N


def cross_vocab_kd_loss(student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
                        teacher_ids_M: jax.Array, student_ids_M: jax.Array, *, temperature: jax.Array | float,
                        uld_top_k: int = 128, chunk_size: int | None = None) -> jax.Array:
  """The module docstring's kd_x as a masked mean over aligned positions.

  Args:
    student_logits_BxAxVs, teacher_logits_BxAxVt: each model's logits at its aligned positions
      (`gather_positions`); computed in float32 chunk by chunk.
    mask_BxA: which aligned pairs count.
    teacher_ids_M, student_ids_M: int32 ids of the shared tokens, pairwise (one to one).
    temperature: T > 0, traced or not.
    uld_top_k: ranks compared by the ULD term (clipped to the smaller vocabulary).
    chunk_size: aligned positions per float32 chunk; None: all at once.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  vocab_s, vocab_t = student_logits_BxAxVs.shape[-1], teacher_logits_BxAxVt.shape[-1]
  unmatched_s, unmatched_t = _unmatched(vocab_s, student_ids_M), _unmatched(vocab_t, teacher_ids_M)
  top_k = min(uld_top_k, vocab_s, vocab_t)

  def per_position(student_NxVs, teacher_NxVt):
    log_q = jax.nn.log_softmax(student_NxVs.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_NxVt).astype(jnp.float32) / temperature, axis=-1)
    log_p_M, log_q_M = log_p[:, teacher_ids_M], log_q[:, student_ids_M]
    p_M = jnp.exp(log_p_M)
    exact_N = jnp.sum(jnp.where(p_M > 0, p_M * (log_p_M - log_q_M), 0.0), axis=-1)
    tail_p, mass_p = _sorted_tail(jnp.exp(log_p), unmatched_t, top_k)
    tail_q, mass_q = _sorted_tail(jnp.exp(log_q), unmatched_s, top_k)
    other_N = jnp.where(mass_p > 0, mass_p * (jnp.log(jnp.maximum(mass_p, _EPS)) - jnp.log(jnp.maximum(mass_q, _EPS))),
                        0.0)
    uld_N = jnp.sum(jnp.abs(tail_p - tail_q), axis=-1)
    return exact_N + other_N + mass_p * uld_N

  per_position_BxA = token_chunks(per_position, (student_logits_BxAxVs, teacher_logits_BxAxVt), chunk_size)
  return temperature ** 2 * masked_mean(per_position_BxA, mask_BxA)


def prefix_kd_loss(student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
                   teacher_to_student_Vt: jax.Array, *, temperature: jax.Array | float,
                   chunk_size: int | None = None) -> jax.Array:
  """kd across vocabularies by projecting the teacher's distribution onto the student's vocabulary.

  Every teacher token j carries its probability p_j to the student token pi(j) that starts the same text:
  itself where the vocabularies share its bytes, else the longest student token that is a prefix of
  it (`data.alignment.prefix_mapping`). With p~_v = sum_{j: pi(j) = v} p_j / sum_{j: pi(j) >= 0} p_j,

    kd_prefix = T^2 KL(p~ || q) = T^2 sum_v p~_v log(p~_v / q_v),

  masked mean over aligned pairs. Unlike the hybrid (`cross_vocab_kd_loss`), no mass is left
  unmatched: a teacher that would write ' return' in one token still tells the student that ' re' (its
  own token) comes next. Identical vocabularies map every id to itself: exactly `losses.kd_loss`.
  Teacher ids past the map (padded output rows) and specials other than eos are dropped.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  vocab_s, vocab_t = student_logits_BxAxVs.shape[-1], teacher_logits_BxAxVt.shape[-1]
  target_Vt = jnp.full((vocab_t,), -1, jnp.int32).at[:min(vocab_t, teacher_to_student_Vt.shape[0])].set(
      teacher_to_student_Vt[:vocab_t])
  kept_Vt = target_Vt >= 0

  def per_position(student_NxVs, teacher_NxVt):
    log_q = jax.nn.log_softmax(student_NxVs.astype(jnp.float32) / temperature, axis=-1)
    p = jax.nn.softmax(jax.lax.stop_gradient(teacher_NxVt).astype(jnp.float32) / temperature, axis=-1)
    p = jnp.where(kept_Vt[None, :], p, 0.0)
    projected_NxVs = jnp.zeros((p.shape[0], vocab_s), jnp.float32).at[:, jnp.where(kept_Vt, target_Vt, 0)].add(p)
    projected_NxVs = projected_NxVs / jnp.maximum(jnp.sum(projected_NxVs, axis=-1, keepdims=True), _EPS)
    log_p = jnp.log(jnp.maximum(projected_NxVs, _EPS))
    return jnp.sum(jnp.where(projected_NxVs > 0, projected_NxVs * (log_p - log_q), 0.0), axis=-1)

  per_position_BxA = token_chunks(per_position, (student_logits_BxAxVs, teacher_logits_BxAxVt), chunk_size)
  return temperature ** 2 * masked_mean(per_position_BxA, mask_BxA)


def kd_across(mode: str, student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
              vocab_map: VocabMap, *, temperature, uld_top_k: int, chunk_size: int | None) -> jax.Array:
  """kd between two vocabularies on aligned pairs: `prefix_kd_loss` or the hybrid `cross_vocab_kd_loss`."""
  if mode == "prefix":
    return prefix_kd_loss(student_logits_BxAxVs, teacher_logits_BxAxVt, mask_BxA, vocab_map.teacher_to_student_Vt,
                          temperature=temperature, chunk_size=chunk_size)
  return cross_vocab_kd_loss(student_logits_BxAxVs, teacher_logits_BxAxVt, mask_BxA, vocab_map.teacher_ids_M,
                             vocab_map.student_ids_M, temperature=temperature, uld_top_k=uld_top_k,
                             chunk_size=chunk_size)


def fill_unaligned(at_pairs: jax.Array, student_logits_BxLxV: jax.Array, input_ids_BxL: jax.Array,
                   mask_BxL: jax.Array, positions_BxA: jax.Array, pairs_BxA: jax.Array, *, temperature,
                   chunk_size: int | None = None) -> jax.Array:
  """kd over every student position: `at_pairs` (a mean over aligned pairs) with the unaligned ones added.

  A student position inside a teacher token (no shared boundary there) has no teacher distribution to
  match; its target is the data's next token, one-hot: T^2 KL(onehot || softmax(z/T)) = T^2 CE at T.
  The result is the mean over aligned pairs and unaligned LM targets together, so the positions the
  teacher cannot speak to keep kd's weight instead of dropping to lm's (between two tokenizers about
  one student position in five is unaligned).
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  labels_BxL, label_mask_BxL = next_token_labels(input_ids_BxL, mask_BxL)
  batch_index = jnp.arange(mask_BxL.shape[0])[:, None]
  aligned_BxL = jnp.zeros(mask_BxL.shape, bool).at[batch_index, positions_BxA].max(pairs_BxA.astype(bool))
  unaligned_BxL = label_mask_BxL.astype(bool) & ~aligned_BxL
  data_kd = temperature ** 2 * lm_loss(student_logits_BxLxV / temperature, labels_BxL, unaligned_BxL,
                                       chunk_size=chunk_size)
  num_pairs = jnp.sum(pairs_BxA.astype(jnp.float32))
  num_unaligned = jnp.sum(unaligned_BxL.astype(jnp.float32))
  return (at_pairs * num_pairs + data_kd * num_unaligned) / jnp.maximum(num_pairs + num_unaligned, 1.0)


def aligned_attention(maps_BxHxLxL: jax.Array, positions_BxA: jax.Array, mask_BxA: jax.Array) -> jax.Array:
  """One model's attention among its aligned positions: rows and columns gathered, rows renormalised.

  Row a of the result is query `positions[a]` attending over the keys `positions[0..A)`, restricted
  to real pairs (mask 1) and renormalised to sum to 1, so two models' maps over the same aligned
  text are comparable distributions ([B, H, A, A]).
  """
  index_Bx1xAx1 = positions_BxA.astype(jnp.int32)[:, None, :, None]
  return aligned_columns(jnp.take_along_axis(maps_BxHxLxL, index_Bx1xAx1, axis=2), positions_BxA, mask_BxA)


def aligned_columns(rows_BxHxQxL: jax.Array, positions_BxA: jax.Array, mask_BxA: jax.Array) -> jax.Array:
  """Attention rows over all L keys -> over the aligned keys `positions` only (real pairs), renormalised.

  The second half of `aligned_attention`, for any set of Q query rows ([B, H, Q, A], float32).
  """
  index_Bx1x1xA = positions_BxA.astype(jnp.int32)[:, None, None, :]
  sub_BxHxQxA = jnp.take_along_axis(rows_BxHxQxL, index_Bx1x1xA, axis=3).astype(jnp.float32)
  sub_BxHxQxA = jnp.where(mask_BxA.astype(bool)[:, None, None, :], sub_BxHxQxA, 0.0)
  return sub_BxHxQxA / jnp.maximum(jnp.sum(sub_BxHxQxA, axis=-1, keepdims=True), _EPS)


def top1_agreement(student_logits_BxAxVs: jax.Array, teacher_logits_BxAxVt: jax.Array, mask_BxA: jax.Array,
                   student_to_teacher_Vs: jax.Array) -> jax.Array:
  """Share of real aligned pairs where the student's top token is the teacher's top token (by bytes).

  `student_to_teacher_Vs` maps each student id to its teacher id, or -1 when it has none.
  """
  mapped_BxA = student_to_teacher_Vs[jnp.argmax(student_logits_BxAxVs, -1)]
  agree_BxA = (mapped_BxA == jnp.argmax(teacher_logits_BxAxVt, -1)).astype(jnp.float32)
  return masked_mean(agree_BxA, mask_BxA)
