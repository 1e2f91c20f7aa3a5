"""TRL's and Tunix's distillation losses against jaxdistill's kd: which jaxdistill settings reproduce them.

    python -m pip install --target /tmp/refpkgs --no-deps trl==1.16.0 google-tunix==0.1.7 accelerate==1.15.0
    PYTHONPATH=/tmp/refpkgs python -m bench.trl_tunix_parity

The reference packages go to their own folder with `--no-deps`, so the venv's torch and jax are the ones
used (nothing is replaced). Nothing in the test suite imports this script.

On fixed random logits (B = 2 rows, L = 7 positions, V = 50; row 0: 3 prompt + 4 completion tokens,
row 1: 2 prompt + 2 completion + 3 padding) it computes, in float32:

- TRL: `GKDTrainer.generalized_jsd_loss` (beta, temperature, its reductions), `GKDTrainer.compute_loss` and
  `GOLDTrainer.compute_loss` (the real methods, run on a stand-in `self` and fixed-logit models), and the
  `DistillationTrainer`'s `_chunked_divergence_loss` (fed the logits as hidden states and an identity
  `lm_head`, so it projects back to the same logits);
- Tunix: `LogitStrategy.compute_loss` (the real one, loaded from the installed files without
  `tunix/__init__.py`, whose import chain needs tensorflow_datasets, metrax and more), called the way the
  Tunix logit-distillation tutorial calls it: logits[:, :-1] and one-hot next-token labels times
  `input_mask[:, 1:]` (`input_mask` 1 on the completion, as Tunix's translation dataset builds it);
- jaxdistill: `objective.objective` (the whole objective with the models' outputs given, so the curriculum's
  temperature and weights and the batch's masks are the ones a step uses), and `losses.lm_loss` for the
  hard-label part of Tunix's mix.

Each row pairs a reference value with the jaxdistill setting that reproduces it. "match" rows must agree
to `--tolerance` (the script exits 1 otherwise); "differs" rows show, on purpose, what changes when a
convention is not matched (which tokens count, where T^2 goes, how accumulation averages).
"""

from jaxdistill import cli

cli.quiet_environment()

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxdistill.models import ModelConfig  # noqa: E402
from jaxdistill.models.transformer import LMOutput  # noqa: E402
from jaxdistill.objective import (ENTRIES, DistillSpec, ResolvedObjective, curriculum_config, losses,  # noqa: E402
                                  objective)
from jaxdistill.objective.on_policy import OnPolicySpec  # noqa: E402

PIP = ("python -m pip install --target /tmp/refpkgs --no-deps trl==1.16.0 google-tunix==0.1.7 accelerate==1.15.0\n"
       "then: PYTHONPATH=/tmp/refpkgs python -m bench.trl_tunix_parity")
B, L, V = 2, 7, 50
PROMPT, COMPLETION = (3, 2), (4, 2)  # per row; the rest of the row is padding


# --------------------------------------------------------------------------------------------
# The reference packages.

def _reference_modules():
  """(GKDTrainer, GOLDTrainer, distillation_trainer module, Tunix's logit module, versions), or exit naming pip."""
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  try:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    from trl.experimental.gold.gold_trainer import GOLDTrainer
    from trl.trainer import distillation_trainer
  except ImportError as e:
    sys.exit(f"bench.trl_tunix_parity needs TRL (and accelerate) importable ({e}). "
             f"Install them beside the venv:\n{PIP}")
  spec = importlib.util.find_spec("tunix")
  if spec is None or spec.origin is None:
    sys.exit(f"bench.trl_tunix_parity needs Tunix (PyPI: google-tunix). Install it beside the venv:\n{PIP}")
  # Tunix's package __init__ imports its trainers (tensorflow_datasets, metrax, ...); the strategy modules
  # themselves need only jax, flax and optax. Stand-in parent packages point at the real folders, so the
  # real logit.py and base_strategy.py are what runs.
  root = os.path.dirname(spec.origin)
  for name, sub in (("tunix", ""), ("tunix.distillation", "distillation"),
                    ("tunix.distillation.strategies", os.path.join("distillation", "strategies"))):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, sub)]
    sys.modules[name] = package
  logit = importlib.import_module("tunix.distillation.strategies.logit")
  versions = {name: importlib.metadata.version(name) for name in ("trl", "google-tunix", "accelerate")}
  return GKDTrainer, GOLDTrainer, distillation_trainer, logit, versions


# --------------------------------------------------------------------------------------------
# Fixed data.

def fixed_batch(seed: int = 0) -> dict:
  """Logits and masks, numpy. Positions index the logits: position t predicts token t + 1."""
  rng = np.random.default_rng(seed)
  student = (2.0 * rng.standard_normal((B, L, V))).astype(np.float32)
  teacher = (3.0 * rng.standard_normal((B, L, V))).astype(np.float32)
  ids = rng.integers(1, V, size=(B, L)).astype(np.int32)
  attention = np.zeros((B, L), np.int32)
  completion = np.zeros((B, L), np.int32)
  for row, (p, c) in enumerate(zip(PROMPT, COMPLETION)):
    attention[row, :p + c] = 1
    completion[row, p:p + c] = 1
  ids[attention == 0] = 0  # pad id
  labels = np.where(completion == 1, ids, -100)  # TRL's collators: -100 on prompt and padding
  pad = lambda x: np.concatenate([x, np.zeros((B, 1), np.int32)], axis=1)  # noqa: E731
  return {
      "student": student, "teacher": teacher, "ids": ids, "attention": attention, "completion": completion,
      "labels": labels,
      # Token sets, as masks over the L logit positions:
      "next_is_completion": pad(completion[:, 1:]),   # TRL: labels[:, 1:] != -100 (6 positions)
      "all_but_last": pad(np.ones((B, L - 1), np.int32)),  # Tunix: every position of logits[:, :-1] (12)
      "next_is_real": pad(attention[:, 1:]),          # of those, the ones whose next token is real (9)
      "next_is_pad": pad(1 - attention[:, 1:]),       # and the ones whose next token is padding (3)
  }


# --------------------------------------------------------------------------------------------
# jaxdistill.

_MODEL = ModelConfig(family="llama", vocab_size=V, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                     head_dim=8, intermediate_size=8, max_position_embeddings=16)


def jaxdistill_kd(d: dict, *, mode: str, beta: float = 0.5, temperature: float = 1.0, kd_weight: float = 1.0,
                  top_k: int = 0, loss_mask: str | None = None, rows=slice(None), on_policy: bool = False) -> float:
  """jaxdistill's objective with only kd on, the models' outputs given.

  `curriculum.temperature=(T,)`, `curriculum.kd=(kd_weight,)`, `distill.kd_mode`, `distill.jsd_beta`,
  `distill.kd_top_k`; every other curriculum entry 0. `loss_mask` names one of `fixed_batch`'s token sets
  and is put in the batch as `loss_mask` (what jaxdistill's on-policy micro-batches carry); None leaves
  jaxdistill's own data-batch convention, the student attention mask. `on_policy`: the objective of a
  sampled micro-batch (`on_policy.fraction=1`, `on_policy.divergence`, `on_policy.jsd_beta`; T = 1).
  """
  if on_policy:
    cfg = ResolvedObjective(on_policy=OnPolicySpec(fraction=1.0, divergence=mode, jsd_beta=beta),
                            total_steps=1).on_samples()
  else:
    weights = {e.name: (0.0,) for e in ENTRIES} | {"kd": (kd_weight,)}
    cfg = ResolvedObjective(distill=DistillSpec(kd_mode=mode, jsd_beta=beta, kd_top_k=top_k),
                            curriculum=curriculum_config(boundaries=(), temperature=(temperature,), **weights),
                            total_steps=1)
  ids, att = jnp.asarray(d["ids"][rows]), jnp.asarray(d["attention"][rows])
  batch = {"student_input_ids": ids, "student_attention_mask": att, "teacher_input_ids": ids,
           "teacher_attention_mask": att}
  if loss_mask is not None:
    batch["loss_mask"] = jnp.asarray(d[loss_mask][rows])

  def out(logits):
    logits = jnp.asarray(logits[rows])
    return LMOutput(logits_BxLxV=logits, final_hidden_BxLxD=jnp.zeros(logits.shape[:2] + (8,)), hidden_states=None,
                    attentions=())

  total, _ = objective({"student": {}, "heads": {}}, {}, batch, jnp.int32(0), cfg, _MODEL, _MODEL,
                       models_out=(out(d["student"]), {}, out(d["teacher"]), {}))
  return float(total)


def jaxdistill_lm(d: dict, mask: str) -> float:
  """`losses.lm_loss` (what the lm component calls) of the next tokens over token set `mask`."""
  labels = np.concatenate([d["ids"][:, 1:], np.zeros((B, 1), np.int32)], axis=1)
  return float(losses.lm_loss(jnp.asarray(d["student"]), jnp.asarray(labels), jnp.asarray(d[mask])))


# --------------------------------------------------------------------------------------------
# TRL.

class FixedLM(torch.nn.Module):
  """A causal LM stand-in whose forward returns fixed logits."""

  def __init__(self, logits: np.ndarray):
    super().__init__()
    self.register_buffer("fixed", torch.from_numpy(logits))

  def forward(self, input_ids, attention_mask=None, **_):
    assert input_ids.shape == self.fixed.shape[:2]
    return types.SimpleNamespace(logits=self.fixed)


def trl_inputs(d: dict, rows=slice(None)) -> dict:
  return {"input_ids": torch.from_numpy(d["ids"][rows]).long(),
          "attention_mask": torch.from_numpy(d["attention"][rows]).long(),
          "labels": torch.from_numpy(d["labels"][rows]).long()}


def gkd_compute_loss(GKDTrainer, d, *, beta, temperature, rows=slice(None), num_items_in_batch=None) -> float:
  """`GKDTrainer.compute_loss` itself, on a stand-in `self` holding the trainer's fields."""
  fake = types.SimpleNamespace(teacher_model=FixedLM(d["teacher"][rows]), beta=beta, temperature=temperature,
                               generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
  with torch.no_grad():
    return float(GKDTrainer.compute_loss(fake, FixedLM(d["student"][rows]), trl_inputs(d, rows),
                                         num_items_in_batch=num_items_in_batch))


def gold_compute_loss(GOLDTrainer, d, *, beta, temperature) -> float:
  """`GOLDTrainer.compute_loss` itself (one tokenizer: no ULD), on a stand-in `self`."""
  fake = types.SimpleNamespace(teacher_model=FixedLM(d["teacher"]), beta=beta, temperature=temperature,
                               use_uld_loss=False, teacher_tokenizer=None,
                               _MODEL_INPUT_RESERVED_KEYS=GOLDTrainer._MODEL_INPUT_RESERVED_KEYS,
                               generalized_jsd_loss=GOLDTrainer.generalized_jsd_loss)
  fake._get_model_forward_kwargs = types.MethodType(GOLDTrainer._get_model_forward_kwargs, fake)
  with torch.no_grad():
    return float(GOLDTrainer.compute_loss(fake, FixedLM(d["student"]), trl_inputs(d)))


def distillation_trainer_loss(distillation_trainer, d, *, beta, temperature) -> float:
  """`_chunked_divergence_loss`, as `DistillationTrainer._compute_loss` calls it: hidden states aligned to the
  completion tokens (here the shifted logits), the lm_head (here the identity), the completion mask."""
  eye = torch.eye(V)
  mask = torch.from_numpy(d["completion"][:, 1:])
  with torch.no_grad():
    loss, _, _ = distillation_trainer._chunked_divergence_loss(
        torch.from_numpy(d["student"][:, :-1]), torch.from_numpy(d["teacher"][:, :-1]), eye, eye, mask, beta,
        temperature=temperature)
  return float(loss)


# --------------------------------------------------------------------------------------------
# Tunix.

def tunix_loss(logit, d, *, temperature, alpha, top_k=0) -> tuple[float, dict]:
  """`LogitStrategy.compute_loss` on the tutorial's inputs: (combined loss, its metrics)."""
  strategy = logit.LogitStrategy(lambda model, **kw: None, lambda model, **kw: None, lambda **kw: None,
                                 temperature=temperature, alpha=alpha, distill_top_k=top_k)
  # The tutorial's model_forward_fn returns logits[:, :-1]; its labels_fn one_hot(tokens[:, 1:]) * input_mask[:, 1:].
  labels = jax.nn.one_hot(jnp.asarray(d["ids"][:, 1:]), V) * jnp.asarray(d["completion"][:, 1:], jnp.float32)[..., None]
  loss, metrics = strategy.compute_loss(student_output=jnp.asarray(d["student"][:, :-1]),
                                        teacher_output=jnp.asarray(d["teacher"][:, :-1]), labels=labels)
  return float(loss), {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------

def rows(refs, d: dict) -> list[tuple[str, str, float, str, float, bool]]:
  """(group, reference setting, reference value, jaxdistill setting, jaxdistill value, must match)."""
  GKDTrainer, GOLDTrainer, distillation_trainer, logit, _ = refs
  gjsd = GKDTrainer.generalized_jsd_loss
  t = lambda key: torch.from_numpy(d[key])  # noqa: E731
  s_shift, t_shift, labels_shift = t("student")[:, :-1], t("teacher")[:, :-1], t("labels")[:, 1:].long()
  n_completion = int(d["next_is_completion"].sum())
  out = []

  def add(group, ref_setting, ref, jd_setting, jd, match=True):
    out.append((group, ref_setting, ref, jd_setting, jd, match))

  mode_of = {0.0: "forward_kl", 1.0: "reverse_kl"}
  # 1. The function: beta and temperature, TRL's default reduction, labels masking.
  for temperature in (1.0, 2.0):
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
      ref = float(gjsd(s_shift, t_shift, labels=labels_shift, beta=beta, temperature=temperature))
      mode = mode_of.get(beta, "jsd")
      setting = f"kd_mode={mode}" + (f", jsd_beta={beta}" if mode == "jsd" else "")
      jd = jaxdistill_kd(d, mode=mode, beta=beta, temperature=temperature, kd_weight=1 / temperature ** 2,
                         loss_mask="next_is_completion")
      add("TRL generalized_jsd_loss", f"beta={beta}, T={temperature:g}, labels, batchmean", ref,
          f"{setting}, T={temperature:g}, kd weight 1/T^2={1 / temperature ** 2:g}; mask: next token is completion",
          jd)
  ref = float(gjsd(s_shift, t_shift, labels=labels_shift, beta=0.0))
  add("TRL generalized_jsd_loss", "beta=0, T=1 (orientation check)", ref,
      "kd_mode=reverse_kl (the wrong pairing)", jaxdistill_kd(d, mode="reverse_kl", loss_mask="next_is_completion"),
      False)
  ref = float(gjsd(s_shift, t_shift, labels=labels_shift, beta=0.5, temperature=2.0))
  add("TRL generalized_jsd_loss", "beta=0.5, T=2 (T^2 check)", ref,
      "kd_mode=jsd, T=2, kd weight 1 (jaxdistill's T^2 kept)",
      jaxdistill_kd(d, mode="jsd", temperature=2.0, loss_mask="next_is_completion"), False)
  ref = float(gjsd(s_shift, t_shift, labels=labels_shift, beta=0.5))
  add("TRL generalized_jsd_loss", "beta=0.5, T=1 (token-set check)", ref,
      "kd_mode=jsd; jaxdistill's own mask: every real token (11, prompt and last included)",
      jaxdistill_kd(d, mode="jsd"), False)

  # 2. Its other reductions (beta 0.5, T = 1), against the per-token mean times a count.
  per_token = jaxdistill_kd(d, mode="jsd", loss_mask="next_is_completion")
  per_token_all = jaxdistill_kd(d, mode="jsd", loss_mask="all_but_last")
  add("TRL reductions", "num_items_in_batch=6 (Trainer's count)",
      float(gjsd(s_shift, t_shift, labels=labels_shift, num_items_in_batch=torch.tensor(n_completion))),
      "kd_mode=jsd; mask: next token is completion", per_token)
  add("TRL reductions", "reduction='sum', labels", float(gjsd(s_shift, t_shift, labels=labels_shift, reduction="sum")),
      f"the same x {n_completion} tokens", per_token * n_completion)
  add("TRL reductions", "reduction='mean', labels",
      float(gjsd(s_shift, t_shift, labels=labels_shift, reduction="mean")), f"the same / V={V}", per_token / V)
  add("TRL reductions", "reduction='batchmean', no labels", float(gjsd(s_shift, t_shift)),
      f"kd_mode=jsd; mask: all {2 * (L - 1)} positions of logits[:, :-1], x {L - 1} (sum per row / B)",
      per_token_all * (L - 1))

  # 3. The trainers' own calls.
  for beta in (0.5, 1.0):
    mode = mode_of.get(beta, "jsd")
    add("TRL GKDTrainer.compute_loss", f"beta={beta}, args.temperature=2 (sampling only)",
        gkd_compute_loss(GKDTrainer, d, beta=beta, temperature=2.0),
        f"on_policy.fraction=1, on_policy.divergence={mode}" + (f", jsd_beta={beta}" if mode == "jsd" else "")
        + " (T=1; loss_mask: next token sampled)", jaxdistill_kd(d, mode=mode, beta=beta, on_policy=True,
                                                                  loss_mask="next_is_completion"))
  add("TRL GKDTrainer.compute_loss", "beta=0.5, num_items_in_batch=6",
      gkd_compute_loss(GKDTrainer, d, beta=0.5, temperature=0.9, num_items_in_batch=torch.tensor(n_completion)),
      "the same", jaxdistill_kd(d, mode="jsd", on_policy=True, loss_mask="next_is_completion"))
  counts = [int(d["next_is_completion"][r].sum()) for r in range(B)]
  accumulated = sum(gkd_compute_loss(GKDTrainer, d, beta=0.5, temperature=0.9, rows=slice(r, r + 1),
                                     num_items_in_batch=torch.tensor(n_completion)) for r in range(B))
  per_micro = [jaxdistill_kd(d, mode="jsd", loss_mask="next_is_completion", rows=slice(r, r + 1)) for r in range(B)]
  add("TRL GKDTrainer.compute_loss", f"beta=0.5, 2 micro-batches of {counts[0]} and {counts[1]} tokens, "
      f"num_items_in_batch={n_completion}", accumulated,
      "accumulation_steps=2: mean of the 2 micro-batch token means", float(np.mean(per_micro)), False)
  add("TRL GKDTrainer.compute_loss", "the same", accumulated, "both rows in one micro-batch (one token mean)",
      per_token)
  for temperature in (0.9, 2.0):
    add("TRL GOLDTrainer.compute_loss", f"beta=0.5, args.temperature={temperature:g}",
        gold_compute_loss(GOLDTrainer, d, beta=0.5, temperature=temperature),
        f"kd_mode=jsd, T={temperature:g}, kd weight 1/T^2={1 / temperature ** 2:.6g}; mask: next token is completion",
        jaxdistill_kd(d, mode="jsd", temperature=temperature, kd_weight=1 / temperature ** 2,
                      loss_mask="next_is_completion"))
  for beta, temperature in ((1.0, 1.0), (1.0, 2.0), (0.5, 2.0)):
    mode = mode_of.get(beta, "jsd")
    add("TRL DistillationTrainer loss", f"beta={beta}, T={temperature:g}",
        distillation_trainer_loss(distillation_trainer, d, beta=beta, temperature=temperature),
        f"kd_mode={mode}, T={temperature:g}, kd weight 1/T^2={1 / temperature ** 2:g}; mask: next token is completion",
        jaxdistill_kd(d, mode=mode, beta=beta, temperature=temperature, kd_weight=1 / temperature ** 2,
                      loss_mask="next_is_completion"))

  # 4. Tunix's LogitStrategy.
  n_all, n_real = int(d["all_but_last"].sum()), int(d["next_is_real"].sum())
  for temperature in (1.0, 2.0):
    loss, _ = tunix_loss(logit, d, temperature=temperature, alpha=1.0)
    add("Tunix LogitStrategy", f"T={temperature:g}, alpha=1", loss,
        f"kd_mode=forward_kl, T={temperature:g}; mask: all {n_all} positions of logits[:, :-1], padding included",
        jaxdistill_kd(d, mode="forward_kl", temperature=temperature, loss_mask="all_but_last"))
  loss, _ = tunix_loss(logit, d, temperature=2.0, alpha=1.0)
  add("Tunix LogitStrategy", "T=2, alpha=1 (padding check)", loss,
      f"the same over the {n_real} positions whose next token is real, x {n_real}/{n_all}",
      jaxdistill_kd(d, mode="forward_kl", temperature=2.0, loss_mask="next_is_real") * n_real / n_all, False)
  add("Tunix LogitStrategy", "the same", loss,
      f"x {n_real}/{n_all}, plus the kd of the {n_all - n_real} positions whose next token is padding x "
      f"{n_all - n_real}/{n_all}",
      jaxdistill_kd(d, mode="forward_kl", temperature=2.0, loss_mask="next_is_real") * n_real / n_all
      + jaxdistill_kd(d, mode="forward_kl", temperature=2.0, loss_mask="next_is_pad") * (n_all - n_real) / n_all)
  loss, _ = tunix_loss(logit, d, temperature=2.0, alpha=1.0, top_k=5)
  add("Tunix LogitStrategy", "T=2, alpha=1, distill_top_k=5", loss,
      "kd_mode=forward_kl, T=2, kd_top_k=5, kd_topk_tail=renormalize; mask: all positions",
      jaxdistill_kd(d, mode="forward_kl", temperature=2.0, top_k=5, loss_mask="all_but_last"))
  loss, metrics = tunix_loss(logit, d, temperature=2.0, alpha=0.5)
  lm = jaxdistill_lm(d, "next_is_completion")
  add("Tunix LogitStrategy", "T=2, alpha=0.5: metric distill/hard_loss", metrics["distill/hard_loss"],
      f"lm_loss over the {n_completion} completion positions x {n_completion}/{n_all}", lm * n_completion / n_all)
  add("Tunix LogitStrategy", "T=2, alpha=0.5: the loss", loss,
      f"0.5 x kd (T=2, all positions) + 0.5 x {n_completion}/{n_all} x lm (completion positions)",
      0.5 * jaxdistill_kd(d, mode="forward_kl", temperature=2.0, loss_mask="all_but_last")
      + 0.5 * lm * n_completion / n_all)
  add("Tunix LogitStrategy", "the same", loss,
      "curriculum kd=0.5, lm=0.5, T=2, each a mean over its own token set (no /all-positions factor)",
      0.5 * jaxdistill_kd(d, mode="forward_kl", temperature=2.0, loss_mask="all_but_last") + 0.5 * lm, False)
  return out


def markdown(table) -> str:
  lines = ["| reference | setting | reference value | jaxdistill setting | jaxdistill value | abs diff | |",
           "| --- | --- | ---: | --- | ---: | ---: | --- |"]
  for group, ref_setting, ref, jd_setting, jd, match in table:
    lines.append(f"| {group} | {ref_setting} | {ref:.7f} | {jd_setting} | {jd:.7f} | {abs(ref - jd):.1e} | "
                 f"{'match' if match else 'differs'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0, help="seed of the fixed random logits")
  parser.add_argument("--tolerance", type=float, default=1e-5, help="largest abs diff allowed on 'match' rows")
  args = parser.parse_args(argv)
  refs = _reference_modules()
  versions = refs[-1]
  print(f"trl {versions['trl']}, google-tunix {versions['google-tunix']}, accelerate {versions['accelerate']}, "
        f"torch {torch.__version__}, jax {jax.__version__}; float32 logits B={B}, L={L}, V={V}, seed {args.seed}")
  table = rows(refs, fixed_batch(args.seed))
  print(markdown(table))
  matched = [abs(ref - jd) for _, _, ref, _, jd, match in table if match]
  unmatched = [abs(ref - jd) for _, _, ref, _, jd, match in table if not match]
  print(f"\nmatch rows: {len(matched)}, max abs diff {max(matched):.1e}; "
        f"differs rows: {len(unmatched)}, smallest abs diff {min(unmatched):.1e}")
  bad = max(matched) > args.tolerance or min(unmatched) <= args.tolerance
  if bad:
    print(f"FAILED: a 'match' row differs by more than {args.tolerance:g}, or a 'differs' row agrees")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
