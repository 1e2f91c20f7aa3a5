"""Shared fixtures: tiny random transformers models of every supported family, saved in HF format."""

import os
import subprocess
import sys
import tempfile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; a hub id must fail fast with our message
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the whole session, shared with the CLI subprocesses:
# identical programs (the same step jitted through another wrapper, a config run twice) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxdistill-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity needs full-precision dots

# tests/multidevice needs several devices: a process started with this variable simulates that many CPU
# devices (tests/test_parallel.py starts one); every other process has one device and skips that directory.
CPU_DEVICES_ENV = "JAXDISTILL_TEST_CPU_DEVICES"
if os.environ.get(CPU_DEVICES_ENV):
  jax.config.update("jax_num_cpu_devices", int(os.environ[CPU_DEVICES_ENV]))
collect_ignore = [] if os.environ.get(CPU_DEVICES_ENV) else ["multidevice"]

VOCAB = 97
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

# name -> (transformers config class name, kwargs): one per family and feature the parity tests cover.
FAMILY_CONFIGS = {
    "llama_gqa_untied": ("LlamaConfig", dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_tied": ("LlamaConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling=ROPE_LLAMA3, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # A window of 3 keys: the 9-token test rows (padded_batch) see it slide.
    "mistral_window": ("MistralConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, tie_word_embeddings=False)),
    # Fused qkv (uneven under GQA) and gate/up weights, a window of 4.
    "phi3_gqa_window": ("Phi3Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
}


def make_torch_model(name: str, seed: int = 0, configs: dict | None = None):
  """A transformers model with random weights large enough that errors would show (eager attention).

  `configs`: name -> (config class name, kwargs, ...); FAMILY_CONFIGS by default.
  """
  import torch
  import transformers

  class_name, kwargs = (configs or FAMILY_CONFIGS)[name][:2]
  config = getattr(transformers, class_name)(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb everything
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """name -> (directory with config.json + model.safetensors, the transformers model)."""
  return save_torch_models(tmp_path_factory, FAMILY_CONFIGS)


def save_torch_models(tmp_path_factory, configs: dict) -> dict:
  """name -> (a directory transformers' save_pretrained wrote, the model) for every entry of `configs`."""
  out = {}
  for name in configs:
    model = make_torch_model(name, configs=configs)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (path, model)
  return out


def padded_batch(side: str, batch: int = 3, length: int = 9, seed: int = 0):
  """Token ids and a mask padded on `side` ('left', 'right' or 'none'): rows pad 0, 2 and 4 tokens."""
  rng = np.random.RandomState(seed)
  ids_BxL = rng.randint(0, VOCAB, (batch, length)).astype(np.int32)
  mask_BxL = np.ones((batch, length), np.int32)
  if side != "none":
    for row in range(batch):
      pad = 2 * row
      if pad:
        mask_BxL[row, :pad] = 0 if side == "left" else 1
        mask_BxL[row, length - pad:] = 1 if side == "left" else 0
  return ids_BxL, mask_BxL


class CountingTokenizer:
  """Delegates to a tokenizer and counts the tokenizing calls."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.inner(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# End-to-end runs of `python -m jaxdistill.train` (tests/test_train.py, tests/test_run_safety.py).

SMOKE = "configs/cpu_demo.py:smoke"
# The demo's distillation stage alone: no teacher training before it, no scratch baseline after it.
DISTILL_ONLY = ["--config.stages.teacher_steps=0", "--config.stages.scratch_baseline=False"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """Subprocess environment: offline, CPU, this session's persistent compilation cache, a private user cache
  (where the demo keeps its trained teachers)."""
  return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
          "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("user_cache"))}


def train_command(workdir, *args, config=SMOKE) -> list[str]:
  return [sys.executable, "-m", "jaxdistill.train", f"--config={config}", f"--workdir={workdir}", *args]


def run_train(env, workdir, *args, config=SMOKE, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *args, config=config), capture_output=True, text=True, env=env,
                        timeout=timeout)


def read_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl, in order."""
  import json

  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
