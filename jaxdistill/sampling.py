"""Picking next tokens (greedy, temperature, top-k, nucleus) and generating text from a causal LM.

`sample` is the compiled generator: one prefill of the left-padded prompts into a KV cache
(`transformer.forward_cached`), then a `fori_loop` of one-token decode steps that each run one token
per row through the model and attend to the cache. The cache holds every layer's keys and values for
the P + N - 1 columns that are ever fed back: L x B x (P + N - 1) x G x K x 2 numbers in the compute
dtype (G key/value heads of K dims): 1.2 MB in float32 for the bench's demo student (2 layers, 8 rows,
P = 32, N = 256, G = 2, K = 16). Shapes never change, so it compiles once per (config, batch shape,
`max_new_tokens`, greedy or not), and it is jittable inside another program (a training step) on
traced params. `generate` is its host-facing wrapper. `generate(..., kv_cache=False)` runs the
uncached reference loop instead, which re-runs the whole P + N buffer for every new token (O(N (P + N))
tokens of compute): kept to test the cache against and to benchmark it (`bench/generate.py`).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.errors import ConfigError
from jaxdistill.models.config import ModelConfig
from jaxdistill.models.transformer import default_positions, forward, forward_cached, init_cache, unembed


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
  """At least one new token, and prompt plus completion must fit in the model's positions; else a ConfigError
  on --max_new_tokens."""
  if max_new_tokens < 1:
    raise ConfigError("--max_new_tokens", max_new_tokens, "an integer >= 1")
  room = cfg.max_position_embeddings - prompt_length
  if prompt_length + max_new_tokens > cfg.max_position_embeddings:
    raise ConfigError("--max_new_tokens", max_new_tokens,
                      f"at most {max(room, 0)} after a prompt of {prompt_length} tokens "
                      f"(the model has {cfg.max_position_embeddings} positions)")


def generate(params, cfg: ModelConfig, prompt_ids_BxP, prompt_mask_BxP, rng: jax.Array, *,
             max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | None = None, kv_cache: bool = True) -> tuple[jax.Array, jax.Array]:
  """Continues left-padded prompts by `max_new_tokens` tokens each (validates, then calls `sample`).

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
    kv_cache: False runs the uncached reference loop instead (the same tokens; N forwards of P + N).

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
  return (sample if kv_cache else _sample_uncached)(
      params, cfg, jnp.asarray(prompt_ids_BxP, jnp.int32), jnp.asarray(prompt_mask_BxP, jnp.int32), rng,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p), jnp.int32(top_k),
      jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def sample(params, cfg: ModelConfig, prompt_ids_BxP, prompt_mask_BxP, rng, temperature, top_p, top_k, eos_id, *,
           max_new_tokens: int, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """`max_new_tokens` tokens after each left-padded prompt, with a KV cache: what `generate` compiles.

  Jittable on traced params (a training step may call it); the sampling settings are arrays, traced, so
  changing them does not recompile. Positions are counted over the real tokens (`default_positions`).

  Args:
    params, cfg, prompt_ids_BxP, prompt_mask_BxP, rng: as for `generate` (ids and mask int32).
    temperature: float32 > 0 (unused when greedy); top_p: float32 in (0, 1]; top_k: int32, 0 for no limit.
    eos_id: int32 end-of-sequence token, -1 for none.
    max_new_tokens: N (static); P + N must not exceed `cfg.max_position_embeddings`.
    greedy: argmax instead of sampling (static).

  Returns:
    (new_ids_BxN int32, lengths_B int32), as `generate` describes them.
  """
  check_length(cfg, prompt_ids_BxP.shape[1], max_new_tokens)
  batch = prompt_ids_BxP.shape[0]

  def pick(i, logits_BxV, state):
    """Token i of every row, recorded in state = (token_B, finished_B, new_ids_BxN, lengths_B)."""
    _, finished_B, new_ids_BxN, lengths_B = state
    if greedy:
      token_B = greedy_token(logits_BxV)
    else:
      token_B = sampled_token(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p, top_k)
    token_B = jnp.where(finished_B, eos_id, token_B)
    new_ids_BxN = jax.lax.dynamic_update_slice_in_dim(new_ids_BxN, token_B[:, None], i, axis=1)
    ends_now_B = ~finished_B & (token_B == eos_id)
    return token_B, finished_B | ends_now_B, new_ids_BxN, jnp.where(ends_now_B, i + 1, lengths_B)

  # The last token is never fed back: P + N - 1 columns.
  cache = init_cache(cfg, batch, prompt_ids_BxP.shape[1] + max_new_tokens - 1)
  prefill, cache = forward_cached(params, cfg, prompt_ids_BxP, cache, prompt_mask_BxP, compute_logits=False)
  state = (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), jnp.zeros((batch, max_new_tokens), jnp.int32),
           jnp.full((batch,), max_new_tokens, jnp.int32))
  state = pick(0, unembed(params, cfg, prefill.final_hidden_BxLxD[:, -1:])[:, 0], state)

  def step(i, carry):
    cache, state = carry
    out, cache = forward_cached(params, cfg, state[0][:, None], cache)
    return cache, pick(i, out.logits_BxLxV[:, 0], state)

  _, (_, _, new_ids_BxN, lengths_B) = jax.lax.fori_loop(1, max_new_tokens, step, (cache, state))
  return new_ids_BxN, lengths_B


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def _sample_uncached(params, cfg: ModelConfig, prompt_ids_BxP, prompt_mask_BxP, rng, temperature, top_p, top_k,
                     eos_id, *, max_new_tokens: int, greedy: bool):
  """`sample` without a cache, the reference: every step re-runs `forward` over the whole P + N buffer.

  The loop `generate` ran before the cache, kept apart from `sample`'s code so the tests compare two
  implementations. Causal attention means the not-yet-written columns after P-1+i cannot change the
  hidden state read at step i, so the buffer keeps one shape and this compiles once too.
  """
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
