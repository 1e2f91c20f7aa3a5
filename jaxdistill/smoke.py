"""Model smoke run: load or build the configured teacher and student, run both, export the student.

    python -m jaxdistill.smoke --config configs/cpu_demo.py --workdir runs/smoke

It tokenizes a few sentences, runs both forwards, reports parameter counts, each model's LM loss,
KL(teacher || student), top-1 agreement and forward throughput, writes the student to
`WORKDIR/student_hf/` in Hugging Face format and, when PyTorch is installed, reloads that directory
with `transformers` and reports the largest logit difference from the Flax forward.
"""

from jaxdistill import cli

cli.quiet_environment()

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill.build import build_model, build_tokenizer  # noqa: E402
from jaxdistill.errors import ConfigError  # noqa: E402
from jaxdistill.models import forward, save_pretrained  # noqa: E402

SAMPLE_TEXTS = (
    "Knowledge distillation trains a small student model to imitate a larger teacher.",
    "The teacher's soft targets carry more information per token than one-hot labels.",
    "A temperature above one flattens both distributions before they are compared.",
    "Evaluation must compute exactly the objective that training optimised at that step.",
)

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "runs/smoke", "Where the exported student is written.")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _token_nll(logits_BxLxV: np.ndarray, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> float:
  """Mean next-token negative log-likelihood over real tokens, float64."""
  logp_BxLxV = _log_softmax(logits_BxLxV[:, :-1])
  target_mask = (mask_BxL[:, :-1] * mask_BxL[:, 1:]).astype(bool)
  picked_BxL = np.take_along_axis(logp_BxLxV, ids_BxL[:, 1:, None], axis=-1)[..., 0]
  return float(-picked_BxL[target_mask].mean())


def run(cfg: config_lib.Config, workdir: str) -> dict:
  """Runs the smoke check and returns its figures (also written to WORKDIR/smoke.json)."""
  tokenizer = build_tokenizer(cfg)
  teacher_rng, student_rng = jax.random.split(jax.random.key(cfg.seed))
  teacher = build_model(cfg.teacher, len(tokenizer), teacher_rng, "teacher")
  student = build_model(cfg.student, len(tokenizer), student_rng, "student")

  texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(cfg.data.batch_size)]
  batch = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.data.seq_len,
                    return_tensors="np")
  ids_BxL, mask_BxL = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)

  results = {}
  logits = {}
  for name, model in (("teacher", teacher), ("student", student)):
    out = forward(model.params, model.config, ids_BxL, mask_BxL)
    jax.block_until_ready(out.logits_BxLxV)
    start = time.perf_counter()
    out = jax.block_until_ready(forward(model.params, model.config, ids_BxL, mask_BxL))
    seconds = time.perf_counter() - start
    logits[name] = np.asarray(out.logits_BxLxV, np.float32)
    results[name] = {
        "family": model.config.family,
        "params": int(sum(x.size for x in jax.tree.leaves(model.params))),
        "lm_loss": _token_nll(logits[name], ids_BxL, mask_BxL),
        "forward_tokens_per_s": float(mask_BxL.sum() / seconds),
    }

  shared_vocab = min(teacher.config.vocab_size, student.config.vocab_size)
  valid = mask_BxL.astype(bool)
  log_p = _log_softmax(logits["teacher"][..., :shared_vocab])[valid]
  log_q = _log_softmax(logits["student"][..., :shared_vocab])[valid]
  results["kl_teacher_student"] = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
  results["top1_agreement"] = float((log_p.argmax(-1) == log_q.argmax(-1)).mean())

  export_dir = save_pretrained(student.params, student.config, os.path.join(workdir, "student_hf"),
                               hf_config=student.hf_config, tokenizer=tokenizer)
  results["export_dir"] = export_dir
  results["export_max_abs_logit_diff"] = _reload_with_transformers(export_dir, ids_BxL, mask_BxL, logits["student"])
  with open(os.path.join(workdir, "smoke.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _reload_with_transformers(path: str, ids_BxL, mask_BxL, flax_logits) -> float | None:
  """Largest |logit| difference between transformers (PyTorch) on the export and the Flax forward."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    return None
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  positions = np.maximum(np.cumsum(mask_BxL, axis=1) - 1, 0)
  with torch.no_grad():
    torch_logits = model(input_ids=torch.from_numpy(ids_BxL.astype(np.int64)),
                         attention_mask=torch.from_numpy(mask_BxL.astype(np.int64)),
                         position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
  valid = mask_BxL.astype(bool)
  return float(np.abs(torch_logits - flax_logits)[valid].max())


def _report(results: dict) -> str:
  lines = ["[SMOKE]"]
  for name in ("teacher", "student"):
    r = results[name]
    lines.append(f"  {name:8s} {r['family']:6s} params={r['params']:,}  lm_loss={r['lm_loss']:.4f}  "
                 f"forward={r['forward_tokens_per_s']:,.0f} tok/s")
  lines.append(f"  KL(teacher||student)={results['kl_teacher_student']:.4f}  "
               f"top-1 agreement={results['top1_agreement']:.3f}")
  lines.append(f"  student exported to {results['export_dir']}")
  diff = results["export_max_abs_logit_diff"]
  lines.append("  transformers reload: " + ("skipped (PyTorch not installed)" if diff is None
                                            else f"max |logit diff| = {diff:.2e}"))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  cfg = config_lib.parse(config_lib.loaded_config(_CONFIG))
  try:
    os.makedirs(_WORKDIR.value, exist_ok=True)
  except OSError as e:
    raise ConfigError("--workdir", _WORKDIR.value, f"a writable directory ({e.strerror})") from None
  print(_report(run(cfg, _WORKDIR.value)))


if __name__ == "__main__":
  cli.run(main)
