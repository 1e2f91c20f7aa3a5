"""bench/torch_reference.py: the PyTorch reference computes jaxdistill's step, and times it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench import torch_reference
from jaxdistill import models
from jaxdistill.config import arch_group
from jaxdistill.objective import DistillSpec, ResolvedObjective, component_weights, init_heads, losses, objective
from jaxdistill.training.optim import OptimConfig

# Student 2 heads, teacher 6: align_heads averages groups of 3 teacher heads. The teacher's larger
# vocabulary exercises kd's cut to the shared 80 tokens.
STUDENT = models.families.from_arch(arch_group("llama", 80, 32, 2, 2, 1, 64, 64, True))
TEACHER = models.families.from_arch(arch_group("llama", 96, 48, 3, 6, 2, 96, 64, False))
OPTIM = OptimConfig(learning_rate=1e-3, heads_learning_rate=1e-3, warmup_steps=10, total_steps=100,
                    accumulation_steps=2)
OPT_STEP = 80  # phase 3 of the default curriculum: kd, lm, attention, feature, layerwise, contrastive all > 0
BATCH, LENGTH = 2, 16
# Relative tolerance of the fp32 step comparison: both sides are float32 with different reduction
# orders (XLA vs ATen); observed differences are <= 4e-7, so 1e-4 leaves margin without hiding a
# wrong formula (a wrong mask or a missing T^2 moves a value by far more).
RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """One intra-op thread: on a 2-core CPU VM two made a bare transformers training step ~100x slower
  (about 1 s instead of 10 ms), which would make the test slow and its timing meaningless."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _random_params(cfg, seed: int):
  """jaxdistill params drawn in numpy (no init compile): unit norms, weights normal(0, 0.16).

  Eight times the init's 0.02: at 0.02 attention is nearly uniform, and the KL between nearly
  uniform rows (~1e-4) is a difference of far larger terms, so float32 rounding alone moves it by
  ~1e-3 relative. Peaked attention keeps every component well conditioned at RTOL.
  """
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "scale"
                       else rng.normal(0, 0.16, s.shape).astype(np.float32)), models.param_shapes(cfg))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(teacher dir, student dir, teacher params, student params): tiny random models saved for transformers."""
  teacher_params, student_params = _random_params(TEACHER, 0), _random_params(STUDENT, 1)
  teacher_dir = models.save_pretrained(teacher_params, TEACHER, str(tmp_path_factory.mktemp("teacher")))
  student_dir = models.save_pretrained(student_params, STUDENT, str(tmp_path_factory.mktemp("student")))
  return teacher_dir, student_dir, teacher_params, student_params


def _batches():
  """Two micro-batches of shared-tokenizer ids; the first pads the last 5 tokens of its second row."""
  rng = np.random.RandomState(0)
  out = []
  for _ in range(OPTIM.accumulation_steps):
    ids_BxL = rng.randint(0, STUDENT.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask_BxL = np.ones_like(ids_BxL)
    out.append({"student_input_ids": ids_BxL, "student_attention_mask": mask_BxL,
                "teacher_input_ids": ids_BxL, "teacher_attention_mask": mask_BxL.copy()})
  out[0]["student_attention_mask"][1, -5:] = 0
  out[0]["teacher_attention_mask"][1, -5:] = 0
  return out


def test_reference_step_matches_jaxdistill_objective_and_is_timed(checkpoints):
  """Every component of the first micro-batch, before any update, equals jaxdistill's in fp32."""
  teacher_dir, student_dir, teacher_params, student_params = checkpoints
  cfg = ResolvedObjective(total_steps=OPTIM.total_steps).resolve_layers(STUDENT, TEACHER)
  # The default objective weighs every component the reference has a torch term for, and only those.
  assert set(torch_reference.TORCH_TERMS) == {c.name for c in cfg.components()}
  heads = init_heads(cfg, STUDENT, TEACHER, jax.random.key(1))
  batches = _batches()

  result = torch_reference.run_reference(teacher_dir, student_dir, batches, cfg, OPT_STEP, heads, OPTIM,
                                         repeats=2, warmup=1)

  jax_batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  _, expected = jax.jit(objective, static_argnums=(4, 5, 6))(
      {"student": student_params, "heads": heads}, teacher_params, jax_batch, jnp.int32(OPT_STEP), cfg, STUDENT,
      TEACHER)
  weights = component_weights(jnp.int32(OPT_STEP), cfg)
  for c in torch_reference.TORCH_TERMS:
    assert float(weights[c]) > 0, c  # every component is live at this step...
    assert float(expected[f"raw/{c}"]) > 0.05, c  # ...and well above 0, so a match means something
    assert result["metrics"][f"raw/{c}"] == pytest.approx(float(expected[f"raw/{c}"]), rel=RTOL), c
  assert result["metrics"]["loss"] == pytest.approx(float(expected["loss"]), rel=RTOL)

  tokens = OPTIM.accumulation_steps * BATCH * LENGTH  # padding included
  assert result["step_ms"] > 0
  assert result["tokens_per_s"] == pytest.approx(tokens / (result["step_ms"] / 1e3), rel=1e-9)
  assert result["peak_bytes"] is None  # CPU


def _jitted(loss_fn, *arrays, **options) -> float:
  """jaxdistill's loss under jax.jit (one compile instead of one per eager op)."""
  return float(jax.jit(functools.partial(loss_fn, **options))(*arrays))


def test_loss_options_match_jaxdistill():
  """The options the step test leaves at their defaults: kd modes and top-k tails, label smoothing, cosine.

  Forward KL over the full vocabulary is also computed by hand in float64.
  """
  rng = np.random.RandomState(1)
  student_BxLxV, teacher_BxLxV = (rng.normal(0, 2, (2, 3, 7)).astype(np.float32) for _ in range(2))
  mask_BxL = np.array([[1, 1, 1], [1, 0, 0]], np.int32)
  as_torch = lambda *arrays: [torch.from_numpy(a) for a in arrays]  # noqa: E731
  # Each mode once and each tail once: every branch of the divergence and of the top-k selection.
  for mode, top_k, tail in (("forward_kl", 3, "other_bucket"), ("reverse_kl", 3, "renormalize"), ("jsd", 0, "")):
    cfg = DistillSpec(kd_mode=mode, jsd_beta=0.3, kd_top_k=top_k, kd_topk_tail=tail)
    ours = torch_reference.kd_loss(*as_torch(student_BxLxV, teacher_BxLxV, mask_BxL), cfg, 1.5)
    theirs = _jitted(losses.kd_loss, student_BxLxV, teacher_BxLxV, mask_BxL, temperature=1.5, mode=mode,
                     jsd_beta=0.3, top_k=top_k, topk_tail=tail)
    assert float(ours) == pytest.approx(theirs, rel=1e-5), mode

  z_t, z_s = teacher_BxLxV.astype(np.float64) / 1.5, student_BxLxV.astype(np.float64) / 1.5
  log_p = z_t - np.log(np.exp(z_t).sum(-1, keepdims=True))
  log_q = z_s - np.log(np.exp(z_s).sum(-1, keepdims=True))
  by_hand = 1.5 ** 2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)[mask_BxL == 1].mean()
  ours = torch_reference.kd_loss(*as_torch(student_BxLxV, teacher_BxLxV, mask_BxL), DistillSpec(), 1.5)
  assert float(ours) == pytest.approx(by_hand, rel=1e-5)

  ids_BxL = np.array([[3, 1, 4], [1, 5, 0]], np.int32)
  labels_BxL = np.array([[1, 4, 0], [5, 0, 0]], np.int32)  # next_token_labels by hand: the next id, 0 at the end
  label_mask_BxL = np.array([[1, 1, 0], [0, 0, 0]], np.int32)  # ...counting where this and the next token are real
  ours = torch_reference.lm_loss(*as_torch(student_BxLxV, ids_BxL, mask_BxL), label_smoothing=0.1)
  theirs = _jitted(losses.lm_loss, student_BxLxV, labels_BxL, label_mask_BxL, label_smoothing=0.1)
  assert float(ours) == pytest.approx(theirs, rel=1e-5)
  ours = torch_reference.hidden_distance(*as_torch(student_BxLxV, teacher_BxLxV, mask_BxL), "cosine")
  theirs = _jitted(losses.hidden_distance, student_BxLxV, teacher_BxLxV, mask_BxL, distance="cosine")
  assert float(ours) == pytest.approx(theirs, rel=1e-5)


def test_reference_rejects_what_it_does_not_cover(monkeypatch):
  cfg = ResolvedObjective(total_steps=OPTIM.total_steps).resolve_layers(STUDENT, TEACHER)
  aligned = [dict(_batches()[0], align_mask=np.ones((BATCH, LENGTH), np.int32))]
  with pytest.raises(ValueError, match="one tokenizer"):
    torch_reference.run_reference("unused", "unused", aligned, cfg, OPT_STEP, {"x": 0}, OPTIM)
  moe = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, experts="moe"))
  with pytest.raises(ValueError, match="router.experts='moe'"):
    torch_reference.run_reference("unused", "unused", _batches(), moe, OPT_STEP, {"x": 0}, OPTIM)
  with pytest.raises(ValueError, match="heads_params is empty"):
    torch_reference.run_reference("unused", "unused", _batches(), cfg, OPT_STEP, {}, OPTIM)
  # An enabled registry component without a torch term is named, not silently left out of the comparison.
  monkeypatch.delitem(torch_reference.TORCH_TERMS, "contrastive")
  assert torch_reference.uncovered(cfg) == ["contrastive"]
  with pytest.raises(ValueError, match=r"no term for contrastive .* set its curriculum weight to 0"):
    torch_reference.run_reference("unused", "unused", _batches(), cfg, OPT_STEP, {"x": 0}, OPTIM)
  off = dataclasses.replace(cfg, curriculum=cfg.curriculum.replace(contrastive=(0.0,)))
  assert torch_reference.uncovered(off) == []
