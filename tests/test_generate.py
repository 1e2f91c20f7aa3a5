"""Next-token rules by hand; `sampling.generate` against a step-by-step reference, its uncached loop and
transformers' `generate`; the KV cache against `forward`; and the generate CLI."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILY_CONFIGS, VOCAB, save_torch_models
from jaxdistill import models, sampling
from jaxdistill.data.tokenizer import byte_tokenizer
from jaxdistill.errors import ConfigError
from jaxdistill.generate import Completion, SamplingSettings, encode_prompts
from jaxdistill.models import transformer

TOKENIZER = byte_tokenizer()  # 257 tokens, eos = pad = 256
EOS = TOKENIZER.eos_token_id
CFG = models.ModelConfig(family="llama", vocab_size=len(TOKENIZER), hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32)
PROMPT_TEXTS = ["def ", "import"]
PROMPTS = [list(text.encode()) for text in PROMPT_TEXTS]  # byte ids; left-padded to P = 6
NEW = 8
# Probabilities 0.5, 0.3, 0.15, 0.05; the second row holds them in the opposite order.
PROBS_V = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS_BxV = np.log(np.stack([PROBS_V, PROBS_V[::-1]])).astype(np.float32)
DRAWS = 4000
# Configs the cache must follow the uncached loop on, beside CFG (Llama, one scan): Gemma 2 style (windowed and
# global layers in one scan, score and logit soft-caps, post-norms, (1 + w) norms, a query scale, prefill in
# query blocks of 4), GPT-2 (learned positions, inverse-layer scaling, LayerNorm, biases) and a Qwen3-MoE
# style unrolled model (a dense and a sparse stack, q/k norms, a sliding window on every layer).
CACHE_CONFIGS = {
    "llama": CFG,
    "gemma2_style": dataclasses.replace(
        CFG, family="gemma2", sliding_window=3, full_attention_layers=(1,), attn_logit_softcap=50.0,
        final_logit_softcap=30.0, post_norms=True, norm_unit_offset=True, scale_embeddings=True,
        query_pre_attn_scalar=16, activation="gelu_pytorch_tanh", tie_word_embeddings=True, attention_block=4),
    "gpt2": dataclasses.replace(
        CFG, family="gpt2", norm="layer", activation="gelu_new", gated_mlp=False, rope=None, qkv_bias=True,
        o_bias=True, mlp_bias=True, scale_attn_by_inverse_layer_idx=True, num_kv_heads=4),
    "qwen3_moe_unrolled": dataclasses.replace(
        CFG, family="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_only_layers=(0,), norm_topk_prob=True, sliding_window=3, scan_layers=False),
}
# transformers models whose greedy `generate` the cached sampler must reproduce token for token.
HF_CONFIGS = {
    "llama_gqa_untied": FAMILY_CONFIGS["llama_gqa_untied"],
    "gemma2": ("Gemma2Config", dict(  # layer 0 windowed (3 keys), layer 1 global; soft-caps
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0)),
}


@functools.partial(jax.jit, static_argnames=("temperature",))
def next_token(logits_BxV, rng, temperature: float, top_p=1.0, top_k=0):
  """The generation loop's choice of one token: greedy at temperature 0, else sampled."""
  if temperature == 0:
    return sampling.greedy_token(logits_BxV)
  return sampling.sampled_token(logits_BxV, rng, temperature, top_p, top_k)


@pytest.fixture(scope="module")
def flat_params():
  """The plain normal(0.02) init: next-token distributions close to uniform over the 257 tokens."""
  return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def peaked_params(flat_params):
  """The same weights scaled up 5x: greedy picks win by logit gaps far above float error."""
  return jax.tree.map(lambda x: 5 * x, flat_params)


@pytest.fixture(scope="module")
def batch():
  return sampling.left_pad(PROMPTS, pad_id=0)


@pytest.fixture(scope="module")
def ragged_batch():
  """Three prompts of 6, 1 and 4 tokens, left-padded to P = 6."""
  return sampling.left_pad([PROMPTS[1], [7], PROMPTS[0]], pad_id=0)


@pytest.fixture(scope="module")
def greedy_ids(peaked_params, batch):
  new_ids_BxN, lengths_B = sampling.generate(peaked_params, CFG, *batch, jax.random.key(0), max_new_tokens=NEW,
                                             temperature=0.0)
  np.testing.assert_array_equal(lengths_B, [NEW, NEW])  # no eos_id: rows never finish early
  return np.asarray(new_ids_BxN)


def _draws(logits_BxV, temperature, top_p=1.0, top_k=0):
  """`next_token` for DRAWS different keys -> ids [DRAWS, B]."""
  keys = jax.random.split(jax.random.key(1), DRAWS)
  return np.asarray(jax.vmap(lambda key: next_token(logits_BxV, key, temperature, top_p, top_k))(keys))


def _frequencies(ids_DxB, row, vocab=4):
  return np.bincount(ids_DxB[:, row], minlength=vocab) / len(ids_DxB)


def test_left_pad_puts_every_prompt_at_the_end():
  ids_BxP, mask_BxP = sampling.left_pad([[7], [1, 2, 3]], pad_id=9)
  np.testing.assert_array_equal(ids_BxP, [[9, 9, 7], [1, 2, 3]])
  np.testing.assert_array_equal(mask_BxP, [[0, 0, 1], [1, 1, 1]])
  with pytest.raises(ValueError, match="at least one token"):
    sampling.left_pad([[1], []], pad_id=0)


def test_allowed_tokens_by_hand():
  def allowed(top_p, top_k):
    return np.asarray(sampling.allowed_tokens(LOGITS_BxV, top_p, top_k))

  # Mass above each rank: 0, 0.5, 0.8, 0.95.
  np.testing.assert_array_equal(allowed(1.0, 0), np.ones((2, 4), bool))
  np.testing.assert_array_equal(allowed(0.4, 0), [[1, 0, 0, 0], [0, 0, 0, 1]])  # always the top token
  np.testing.assert_array_equal(allowed(0.75, 0), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(allowed(0.9, 0), [[1, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(allowed(1.0, 2), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(allowed(0.9, 1), [[1, 0, 0, 0], [0, 0, 0, 1]])  # the tighter filter wins
  np.testing.assert_array_equal(allowed(0.4, 3), [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_next_token_greedy_and_top_k_1_are_the_argmax():
  np.testing.assert_array_equal(next_token(LOGITS_BxV, jax.random.key(0), 0.0), [0, 3])
  np.testing.assert_array_equal(_draws(LOGITS_BxV, 0.0), np.tile([0, 3], (DRAWS, 1)))
  np.testing.assert_array_equal(_draws(LOGITS_BxV, 1.0, top_k=1), np.tile([0, 3], (DRAWS, 1)))


def test_next_token_nucleus_renormalises_over_the_top_two():
  ids_DxB = _draws(LOGITS_BxV, 1.0, top_p=0.75)  # covers 0.5 + 0.3 and not the third token
  expected_V = np.array([0.5, 0.3, 0, 0]) / 0.8  # 0.625, 0.375: both drawn, nothing else ever
  np.testing.assert_array_equal(_frequencies(ids_DxB, 0) == 0, expected_V == 0)
  np.testing.assert_array_equal(_frequencies(ids_DxB, 1) == 0, expected_V[::-1] == 0)
  # One binomial standard deviation here is sqrt(0.625 * 0.375 / 4000) < 0.008.
  np.testing.assert_allclose(_frequencies(ids_DxB, 0), expected_V, atol=0.04)
  np.testing.assert_allclose(_frequencies(ids_DxB, 1), expected_V[::-1], atol=0.04)


def test_next_token_temperature_sharpens_the_distribution():
  np.testing.assert_allclose(_frequencies(_draws(LOGITS_BxV, 1.0), 0), PROBS_V, atol=0.04)
  sharpened_V = PROBS_V ** 2 / np.sum(PROBS_V ** 2)  # T = 0.5: p^(1/T), renormalised: 0.685, 0.247, ...
  np.testing.assert_allclose(_frequencies(_draws(LOGITS_BxV, 0.5), 0), sharpened_V, atol=0.04)


def test_greedy_is_deterministic(peaked_params, batch, greedy_ids):
  again, _ = sampling.generate(peaked_params, CFG, *batch, jax.random.key(123), max_new_tokens=NEW,
                               temperature=0.0)
  np.testing.assert_array_equal(again, greedy_ids)


def test_greedy_matches_a_step_by_step_reference(peaked_params, greedy_ids):
  """Each prompt alone, unpadded at the front, one forward per new token, argmax of the last real position.

  The growing sequence sits at the start of a fixed 16-column row whose trailing columns are masked
  padding, so `forward` compiles once instead of once per length.
  """
  width = 16
  for row, prompt in enumerate(PROMPTS):
    tokens = list(prompt)
    for _ in range(NEW):
      ids_1xW = np.zeros((1, width), np.int32)
      ids_1xW[0, :len(tokens)] = tokens
      mask_1xW = (np.arange(width) < len(tokens)).astype(np.int32)[None]
      logits_1xWxV = models.forward(peaked_params, CFG, ids_1xW, mask_1xW).logits_BxLxV
      tokens.append(int(np.argmax(logits_1xWxV[0, len(tokens) - 1])))
    np.testing.assert_array_equal(greedy_ids[row], tokens[len(prompt):])
  assert len(set(greedy_ids.ravel().tolist())) > 4  # the model does not just repeat one token


def test_eos_finishes_a_row(peaked_params, batch, greedy_ids):
  eos_id = int(greedy_ids[0, 2])
  new_ids_BxN, lengths_B = sampling.generate(peaked_params, CFG, *batch, jax.random.key(0), max_new_tokens=NEW,
                                             temperature=0.0, eos_id=eos_id)
  for row in range(2):
    hits = np.flatnonzero(greedy_ids[row] == eos_id)
    length = int(hits[0]) + 1 if hits.size else NEW
    expected_N = np.where(np.arange(NEW) < length, greedy_ids[row], eos_id)
    np.testing.assert_array_equal(new_ids_BxN[row], expected_N)
    assert lengths_B[row] == length
  assert lengths_B[0] <= 3 and new_ids_BxN[0, -1] == eos_id


def test_sampling_is_reproducible_and_depends_on_the_key(flat_params, batch):
  def sample(seed, temperature=1.0, top_p=0.95, top_k=50):
    new_ids_BxN, _ = sampling.generate(flat_params, CFG, *batch, jax.random.key(seed), max_new_tokens=NEW,
                                       temperature=temperature, top_p=top_p, top_k=top_k)
    return np.asarray(new_ids_BxN)

  first = sample(0)
  np.testing.assert_array_equal(sample(0), first)
  # Near-uniform over ~50 tokens: two keys agree on all 16 tokens with probability ~50^-16.
  assert np.any(sample(1) != first)
  assert first.min() >= 0 and first.max() < CFG.vocab_size and len(set(first.ravel().tolist())) > 4
  compiled = sampling.sample._cache_size()
  sample(2, temperature=0.7, top_p=0.5, top_k=0)  # sampling settings are traced: no recompilation
  assert sampling.sample._cache_size() == compiled


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_greedy_equals_the_uncached_loop(name, ragged_batch):
  """Token for token, without and then with an eos_id the first row produces at its third step."""
  cfg = CACHE_CONFIGS[name]
  params = jax.tree.map(lambda x: 5 * x, models.init_params(cfg, jax.random.key(0)))  # logit gaps >> float error

  def both(eos_id):
    return [sampling.generate(params, cfg, *ragged_batch, jax.random.key(0), max_new_tokens=NEW, temperature=0.0,
                              eos_id=eos_id, kv_cache=kv_cache) for kv_cache in (True, False)]

  (cached, cached_lengths), (uncached, uncached_lengths) = both(None)
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached_lengths, [NEW] * 3)
  assert len(set(np.asarray(cached).ravel().tolist())) > 3  # not one token repeated
  eos_id = int(uncached[0, 2])
  (cached, cached_lengths), (uncached, uncached_lengths) = both(eos_id)
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached_lengths, uncached_lengths)
  assert cached_lengths[0] <= 3 and cached[0, -1] == eos_id


def test_cached_sampling_equals_the_uncached_loop_inside_another_jit(flat_params, ragged_batch):
  """`sample` called from a jitted function on traced params and settings draws what the uncached loop draws."""
  @jax.jit
  def draw(params, rng, temperature, top_p, top_k):
    return sampling.sample(params, CFG, *ragged_batch, rng, temperature, top_p, top_k, jnp.int32(-1),
                           max_new_tokens=NEW, greedy=False)

  for seed in (0, 1):
    cached, lengths = draw(flat_params, jax.random.key(seed), jnp.float32(1.0), jnp.float32(0.9), jnp.int32(5))
    uncached, _ = sampling.generate(flat_params, CFG, *ragged_batch, jax.random.key(seed), max_new_tokens=NEW,
                                    temperature=1.0, top_p=0.9, top_k=5, kv_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(lengths, [NEW] * 3)
    assert cached.dtype == lengths.dtype == jnp.int32 and len(set(np.asarray(cached).ravel().tolist())) > 8


def test_prefill_and_decode_steps_give_the_forward_logits():
  """A left-padded sequence run as a prefill of 6, a chunk of 2 and 4 single tokens: `forward`'s logits at every
  real position, and the cache's mask and index account for every column."""
  cfg = CACHE_CONFIGS["gemma2_style"]
  params = models.init_params(cfg, jax.random.key(1))
  ids_BxL = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 12)).astype(np.int32)
  mask_BxL = np.ones((3, 12), np.int32)
  mask_BxL[1, :2] = mask_BxL[2, :5] = 0
  expected_BxLxV = np.asarray(models.forward(params, cfg, ids_BxL, mask_BxL).logits_BxLxV)

  cache = transformer.init_cache(cfg, batch=3, length=13)  # one column to spare
  out, cache = transformer.forward_cached(params, cfg, ids_BxL[:, :6], cache, mask_BxL[:, :6])
  pieces = [out.logits_BxLxV]
  for start, stop in [(6, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:
    out, cache = transformer.forward_cached(params, cfg, ids_BxL[:, start:stop], cache)
    pieces.append(out.logits_BxLxV)
  got_BxLxV = np.concatenate(pieces, axis=1)
  real = mask_BxL.astype(bool)
  np.testing.assert_allclose(got_BxLxV[real], expected_BxLxV[real], atol=1e-5, rtol=0)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.mask_BxT, np.concatenate([mask_BxL, np.zeros((3, 1), np.int32)], axis=1))
  assert cache.k_BxLxTxGxK.shape == (3, cfg.num_layers, 13, cfg.num_kv_heads, cfg.head_dim)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  pytest.importorskip("torch")
  return save_torch_models(tmp_path_factory, HF_CONFIGS)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_cached_greedy_equals_transformers_generate(hf_models, name):
  """transformers' greedy `generate` on the same left-padded prompts; its eos token ends rows in both."""
  import torch

  path, torch_model = hf_models[name]
  loaded = models.load_pretrained(path)
  rng = np.random.RandomState(0)
  ids_BxP, mask_BxP = sampling.left_pad([rng.randint(3, VOCAB, n).tolist() for n in (3, 7, 5)], pad_id=0)
  eos_id = loaded.hf_config["eos_token_id"]
  ours, lengths = sampling.generate(loaded.params, loaded.config, ids_BxP, mask_BxP, jax.random.key(0),
                                    max_new_tokens=NEW, temperature=0.0, eos_id=eos_id)
  with torch.no_grad():
    theirs = torch_model.generate(torch.from_numpy(ids_BxP).long(), attention_mask=torch.from_numpy(mask_BxP).long(),
                                  do_sample=False, max_new_tokens=NEW, pad_token_id=eos_id)
  theirs = theirs[:, ids_BxP.shape[1]:].numpy()  # fewer than NEW columns if every row ended early
  np.testing.assert_array_equal(np.asarray(ours)[:, :theirs.shape[1]], theirs)
  assert np.all(np.asarray(ours)[:, theirs.shape[1]:] == eos_id)
  assert len(set(theirs.ravel().tolist())) > 3


def test_too_many_or_no_new_tokens_is_a_config_error(flat_params, batch):
  with pytest.raises(ConfigError, match="at most 26 after a prompt of 6 tokens") as error:
    sampling.generate(flat_params, CFG, *batch, jax.random.key(0), max_new_tokens=27, temperature=0.0)
  assert error.value.field == "--max_new_tokens"
  with pytest.raises(ConfigError, match="an integer >= 1"):
    sampling.generate(flat_params, CFG, *batch, jax.random.key(0), max_new_tokens=0, temperature=0.0)


def test_sampling_settings_validate_and_describe():
  assert SamplingSettings().describe() == "greedy"
  assert SamplingSettings(temperature=0.8, top_p=0.9).describe() == "temperature 0.8, top_p 0.9"
  assert SamplingSettings(temperature=1.0, top_k=40).describe() == "temperature 1, top_k 40"
  for field, value in [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                       ("top_k", -1), ("num_samples", 0)]:
    with pytest.raises(ConfigError) as error:
      SamplingSettings(**{field: value}).check()
    assert error.value.field == f"--{field}"
  sampled = SamplingSettings(temperature=0.8, top_p=0.9)
  assert Completion(1, 2, "", 0).header(sampled) == "--- prompt 2, sample 3 (temperature 0.8, top_p 0.9) ---"


def test_prompts_are_encoded_without_special_tokens_and_empty_ones_start_at_bos():
  assert encode_prompts(TOKENIZER, ["hi", ""]) == [[104, 105], [256]]


def _cli(*args):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxdistill.generate", *args], capture_output=True, text=True,
                        env=env, timeout=120)


def test_cli_prints_the_greedy_completions_of_a_run_workdir(peaked_params, greedy_ids, tmp_path):
  """Same model, prompts and length as `greedy_ids`: the CLI must print exactly those tokens, decoded."""
  models.save_pretrained(peaked_params, CFG, str(tmp_path / "run" / "student_hf"), tokenizer=TOKENIZER)
  result = _cli("--model", str(tmp_path / "run"), "--prompt", PROMPT_TEXTS[0], "--prompt", PROMPT_TEXTS[1],
                "--max_new_tokens", str(NEW))
  assert result.returncode == 0, result.stderr[-3000:]

  expected = []
  for index, (prompt, new_ids) in enumerate(zip(PROMPTS, greedy_ids.tolist())):
    completion = new_ids[:new_ids.index(EOS)] if EOS in new_ids else new_ids  # eos ends it, unprinted
    expected += [f"--- prompt {index + 1}, sample 1 (greedy) ---", TOKENIZER.decode(prompt + completion)]
  assert result.stdout == "\n".join(expected) + "\n"
  assert result.stdout.startswith("--- prompt 1, sample 1 (greedy) ---\ndef ")

  bad = _cli("--model", str(tmp_path / "run"), "--prompt", "def ", "--top_p", "0")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == ["error: config field '--top_p' = 0.0 is not allowed: a value in (0, 1]"]
