"""Picking next tokens (greedy, temperature, top-k, nucleus) and generating text from a causal LM.

`generate` is for reading samples of small models, not for serving: there is no KV cache, so every
new token re-runs the forward pass over the whole fixed-size buffer of prompt plus completion. In
exchange the shapes never change, the loop is one `fori_loop` and the function compiles once per
(config, batch shape, `max_new_tokens`, greedy or not).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.errors import ConfigError
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.transformer import default_positions, forward, unembed


def greedy_token(logits_BxV: jax.Array) -> jax.Array:
  """The most probable token of each row (the lowest id among ties)."""
  return jnp.argmax(logits_BxV.astype(jnp.float32), axis=-1).astype(jnp.int32)


@jax.jit
def allowed_tokens(logits_BxV: jax.Array, top_p, top_k) -> jax.Array:
  """Which tokens survive top-k and nucleus (top-p) filtering, as a bool mask [B, V].

  A token is kept when it is among the `top_k` most probable (`top_k` = 0: no limit) and in the
  nucleus: the smallest set of most probable tokens whose probability mass reaches `top_p`, i.e. a
  token is in it when the mass of the tokens ranked above it is below `top_p`. Both filters are
  computed on the same (unfiltered) distribution, so the result is the shorter of the two prefixes
  of the sorted vocabulary; the most probable token always survives. Tokens tied with the last kept
  one are kept too (the cut is a logit threshold).

  Args:
    logits_BxV: next-token logits (already divided by the temperature).
    top_p: nucleus mass in (0, 1]; 1 keeps everything. May be traced.
    top_k: number of tokens to keep; 0 keeps everything. May be traced.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  vocab = logits_BxV.shape[-1]
  sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)  # most probable first
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_above_BxV = jnp.concatenate(
      [jnp.zeros_like(probs_BxV[:, :1]), jnp.cumsum(probs_BxV, axis=-1)[:, :-1]], axis=-1)
  rank_V = jnp.arange(vocab)
  keep_BxV = (mass_above_BxV < top_p) & ((top_k <= 0) | (rank_V < top_k))[None, :]
  keep_BxV = keep_BxV.at[:, 0].set(True)
  threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
  return logits_BxV >= threshold_B[:, None]


def sampled_token(logits_BxV: jax.Array, rng: jax.Array, temperature, top_p, top_k) -> jax.Array:
  """A token per row drawn from softmax(logits / temperature), restricted by `allowed_tokens`.

  Computed in float32. `temperature` must be > 0; it, `top_p` and `top_k` may be traced.
  """
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  keep_BxV = allowed_tokens(scaled_BxV, top_p, top_k)
  filtered_BxV = jnp.where(keep_BxV, scaled_BxV, -jnp.inf)
  return jax.random.categorical(rng, filtered_BxV, axis=-1).astype(jnp.int32)


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts of different lengths as `(ids_BxP, mask_BxP)`, left-padded so every prompt ends at column P-1."""
  if not token_lists or min(len(tokens) for tokens in token_lists) == 0:
    raise ValueError("every prompt needs at least one token")
  length = max(len(tokens) for tokens in token_lists)
  ids_BxP = np.full((len(token_lists), length), pad_id, np.int32)
  mask_BxP = np.zeros((len(token_lists), length), np.int32)
  for row, tokens in enumerate(token_lists):
    ids_BxP[row, length - len(tokens):] = tokens
    mask_BxP[row, length - len(tokens):] = 1
  return ids_BxP, mask_BxP


def check_length(cfg: ModelConfig, prompt_length: int, max_new_tokens: int) -> None:
  """Prompt plus completion must fit in the model's positions; else a ConfigError on --max_new_tokens."""
  room = cfg.max_position_embeddings - prompt_length
  if prompt_length + max_new_tokens > cfg.max_position_embeddings:
    raise ConfigError("--max_new_tokens", max_new_tokens,
                      f"at most {max(room, 0)} after a prompt of {prompt_length} tokens "
                      f"(the model has {cfg.max_position_embeddings} positions)")


def generate(params, cfg: ModelConfig, prompt_ids_BxP, prompt_mask_BxP, rng: jax.Array, *,
             max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues left-padded prompts by `max_new_tokens` tokens each.

  Cost: there is no KV cache. Each of the N new tokens re-runs the forward pass over the whole
  buffer of P+N columns, so a call costs N forwards of length P+N, O(N*(P+N)) tokens of compute
  (and attention O(N*(P+N)^2)) instead of the O(P+N) of a cached decoder. That is fine for reading
  samples of small models; it is not a serving engine. The payoff is one compilation: the buffer has
  a fixed shape, and causal attention means the not-yet-written columns after P-1+i cannot change
  the hidden state read at step i.

  Args:
    params: the params pytree of `CausalLM(cfg)`.
    cfg: the architecture (static).
    prompt_ids_BxP: int token ids, LEFT-padded so that all prompts end at column P-1.
    prompt_mask_BxP: 1 for real tokens, 0 for padding; every row needs at least one real token.
    rng: PRNG key; step i uses `fold_in(rng, i)`. Unused when greedy.
    max_new_tokens: N, the number of tokens generated per row (static).
    temperature: a Python float; 0 is greedy argmax (a separately compiled branch), > 0 samples.
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep only the k most probable tokens; 0 disables it.
    eos_id: end-of-sequence token; a row that produced it is finished and its later tokens are
      `eos_id`. None: rows never finish early.

  Returns:
    new_ids_BxN: the generated tokens (int32).
    lengths_B: tokens up to and including each row's first `eos_id`; N when it never appeared.

  Raises:
    ConfigError: P + N exceeds `cfg.max_position_embeddings` (named after --max_new_tokens).
  """
  check_length(cfg, prompt_ids_BxP.shape[1], max_new_tokens)
  if temperature < 0:
    raise ConfigError("--temperature", temperature, "a value >= 0 (0 is greedy)")
  greedy = temperature == 0
  return _generate(params, cfg, jnp.asarray(prompt_ids_BxP, jnp.int32), jnp.asarray(prompt_mask_BxP, jnp.int32),
                   rng, jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p), jnp.int32(top_k),
                   jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def _generate(params, cfg: ModelConfig, prompt_ids_BxP, prompt_mask_BxP, rng, temperature, top_p, top_k,
              eos_id, *, max_new_tokens: int, greedy: bool):
  """The compiled loop of `generate`; sampling settings are traced, so changing them does not recompile."""
  batch, prompt_length = prompt_ids_BxP.shape
  ids_BxT = jnp.concatenate([prompt_ids_BxP, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
  mask_BxT = jnp.concatenate([prompt_mask_BxP, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  positions_BxT = default_positions(mask_BxT)

  def step(i, carry):
    ids_BxT, finished_B, lengths_B = carry
    hidden_BxTxD = forward(params, cfg, ids_BxT, mask_BxT, positions_BxT, compute_logits=False).final_hidden_BxLxD
    last_Bx1xD = jax.lax.dynamic_slice_in_dim(hidden_BxTxD, prompt_length - 1 + i, 1, axis=1)
    logits_BxV = unembed(params, cfg, last_Bx1xD)[:, 0]
    if greedy:
      token_B = greedy_token(logits_BxV)
    else:
      token_B = sampled_token(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p, top_k)
    token_B = jnp.where(finished_B, eos_id, token_B)
    ids_BxT = jax.lax.dynamic_update_slice_in_dim(ids_BxT, token_B[:, None], prompt_length + i, axis=1)
    ends_now_B = ~finished_B & (token_B == eos_id)
    lengths_B = jnp.where(ends_now_B, i + 1, lengths_B)
    return ids_BxT, finished_B | ends_now_B, lengths_B

  carry = (ids_BxT, jnp.zeros((batch,), bool), jnp.full((batch,), max_new_tokens, jnp.int32))
  ids_BxT, _, lengths_B = jax.lax.fori_loop(0, max_new_tokens, step, carry)
  return ids_BxT[:, prompt_length:], lengths_B
