"""On-policy, mixed and sequence-level distillation: completions sampled inside the step, scored by the teacher.

With `on_policy.fraction` = lambda > 0 a micro-batch is, with probability lambda (from training progress
`on_policy.start` on), replaced by sampled sequences: the first `prompt_length` tokens of each data row,
continued by `completion_length` tokens sampled (KV-cached, `sampling.sample`, on the step's device
buffers) from the current student (`source='student'`: on-policy distillation, GKD) or from the teacher
(`source='teacher'`: sequence-level KD). Both models then read the same sequence, and that micro-batch's loss is the kd
component computed with `divergence` at T = 1 over the completion tokens alone, with weight 1
(`ResolvedObjective.on_samples`): reverse KL by default (what on-policy distillation minimises), forward
KL, or the generalised JSD with `jsd_beta`; `top_k` > 0 restricts it to the teacher's top-k tokens.
The other micro-batches keep the curriculum's objective. Sampling reads the params under stop_gradient
and yields integer ids, so no gradient flows through it; its key comes from the train state
(`TrainState.sample_key`), so a resumed run draws the same samples.

Evaluation (`eval_samples`) samples completions of the held-out rows' prompts from the student with a
fixed key and reports the teacher's NLL of the sampled tokens and the per-token reverse KL(student ||
teacher) on them: how well the student's own text pleases the teacher, beside held-out perplexity.

References: Agarwal et al., On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes (GKD), ICLR 2024; Kim and Rush, Sequence-Level Knowledge Distillation, 2016.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxdistill import sampling
from jaxdistill.models import ModelConfig
from jaxdistill.objective import losses

SOURCES = ("student", "teacher")   # who writes the completions: on-policy | sequence-level KD
EVAL_SEED = 0                      # evaluation's samples: fixed prompts (the held-out rows), a fixed key


@dataclasses.dataclass(frozen=True)
class OnPolicySpec:
  """The `on_policy` group: which micro-batches are sampled, how, and the divergence on them."""
  fraction: float = 0.0           # lambda: probability that a micro-batch is sampled; 0 off-policy only, 1 always
  start: float = 0.0              # progress (fraction of the optimizer steps) before which nothing is sampled:
                                  # a random student's samples are noise, so it first learns from the data
  source: str = "student"         # student: on-policy distillation | teacher: sequence-level KD
  prompt_length: int = 32         # tokens of each data row kept as the prompt (<= data.seq_len)
  completion_length: int = 32     # tokens sampled after it (rows stop early at the tokenizer's eos)
  temperature: float = 1.0        # sampling temperature (> 0); the divergence itself is taken at T = 1
  divergence: str = "reverse_kl"  # forward_kl | reverse_kl | jsd, on the completion tokens
  jsd_beta: float = 0.5           # beta of the generalised JSD (0: forward KL, 1: reverse KL)
  top_k: int = 0                  # the divergence over the teacher's top-k tokens (renormalised); 0: full vocabulary
  eval_samples: bool = True       # evaluation also samples from the student: the teacher's NLL of its samples and
                                  # the reverse KL on them (`samples/teacher_nll`, `samples/reverse_kl`), with the
                                  # lengths above cut to fit the rows and the models (`fitted`)

  @property
  def enabled(self) -> bool:
    return self.fraction > 0

  def probability(self, progress: jax.Array) -> jax.Array:
    """The chance that a micro-batch at training progress `progress` (in [0, 1]) is sampled."""
    return jnp.where(progress >= self.start, jnp.float32(self.fraction), jnp.float32(0.0))

  @property
  def always(self) -> bool:
    """Every micro-batch is sampled (no draw needed)."""
    return self.fraction >= 1 and self.start == 0

  @property
  def length(self) -> int:
    """Tokens of a sampled sequence: prompt plus completion."""
    return self.prompt_length + self.completion_length

  def fitted(self, seq_len: int, positions: int) -> "OnPolicySpec | None":
    """These settings with the prompt cut to rows of `seq_len` tokens and the completion to models of
    `positions` positions (evaluation's samples, which a config need not size); None when nothing fits."""
    prompt = min(self.prompt_length, seq_len)
    completion = min(self.completion_length, positions - prompt)
    return dataclasses.replace(self, prompt_length=prompt, completion_length=completion) if completion >= 1 else None


def sample_batch(params, cfg: ModelConfig, batch: dict, key: jax.Array, spec: OnPolicySpec, eos_id: int) -> dict:
  """Sampled sequences [B, P + N] from the data rows' prompts, as a batch both models read.

  Args:
    params: the params of the model that writes (student or teacher); read under stop_gradient.
    cfg: its config (static).
    batch: the data micro-batch; its student rows [B, L] give the prompts (the first P tokens).
    key: the sampling key.
    spec: the `on_policy` settings.
    eos_id: the tokenizer's end-of-sequence id (-1: none): a row ends after it.

  Returns:
    `student_input_ids`, `student_attention_mask` and the same `teacher_` pair (one tokenizer), and
    `loss_mask` [B, P + N]: 1 at the positions whose next token is a sampled one (P - 1 ... P + N - 2,
    up to the row's eos). A row whose prompt is not P real tokens (a short last row) has no loss tokens.
  """
  prompt_ids_BxP = batch["student_input_ids"][:, :spec.prompt_length]
  prompt_mask_BxP = batch["student_attention_mask"][:, :spec.prompt_length].astype(jnp.int32)
  whole_B = jnp.all(prompt_mask_BxP == 1, axis=1)
  new_ids_BxN, lengths_B = sampling.sample(
      jax.lax.stop_gradient(params), cfg, prompt_ids_BxP, prompt_mask_BxP, key, jnp.float32(spec.temperature),
      jnp.float32(1.0), jnp.int32(0), jnp.int32(eos_id), max_new_tokens=spec.completion_length, greedy=False)
  written_BxN = (jnp.arange(spec.completion_length)[None, :] < lengths_B[:, None]).astype(jnp.int32)
  ids_BxT = jnp.concatenate([prompt_ids_BxP, new_ids_BxN], axis=1)
  mask_BxT = jnp.concatenate([prompt_mask_BxP, written_BxN], axis=1)
  targets_BxT = jnp.concatenate([jnp.zeros_like(prompt_mask_BxP), written_BxN * whole_B[:, None]], axis=1)
  loss_mask_BxT = jnp.concatenate([targets_BxT[:, 1:], jnp.zeros_like(targets_BxT[:, :1])], axis=1)
  samples = {"student_input_ids": ids_BxT, "student_attention_mask": mask_BxT, "teacher_input_ids": ids_BxT,
             "teacher_attention_mask": mask_BxT, "loss_mask": loss_mask_BxT}
  if "inject_nonfinite" in batch:  # the guard drill reaches sampled micro-batches too
    samples["inject_nonfinite"] = batch["inject_nonfinite"]
  return samples


def sample_metrics(student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array, samples: dict,
                   vocab: int) -> dict:
  """The teacher's NLL of the sampled tokens and KL(student || teacher) at T = 1 on them, as token means.

  Both are means over `samples['loss_mask']` (the positions whose next token was sampled), reduced over
  an evaluation by `count/sample_tokens`. The KL compares the first `vocab` ids (those both models have).
  """
  mask_BxT = samples["loss_mask"]
  labels_BxT, _ = losses.next_token_labels(samples["student_input_ids"], samples["student_attention_mask"])
  teacher_nll = losses.lm_loss(teacher_logits_BxTxV, labels_BxT, mask_BxT)
  reverse_kl = losses.kd_loss(student_logits_BxTxV[..., :vocab], teacher_logits_BxTxV[..., :vocab], mask_BxT,
                              temperature=1.0, mode="reverse_kl")
  return {"samples/teacher_nll": teacher_nll, "samples/reverse_kl": reverse_kl,
          "count/sample_tokens": jnp.sum(mask_BxT.astype(jnp.float32))}
