"""The offline teacher: what the objective reads of the teacher, computed once per train row and reused.

With `offline_teacher.top_k = K > 0`, the teacher's contribution to every train row is a *record*:

  topk_logits [L, K]  the K largest teacher logits per position, minus that position's largest
                      (descending; the teacher's compute dtype)
  topk_ids    [L, K]  their token ids
  lse         [L, P]  logsumexp_v(z_v / T_p) - max_v z_v / T_p for each curriculum phase's temperature T_p
                      (float32), so the teacher's probabilities at T_p are exact on the K tokens and so
                      is the mass of the rest
  ...                 and what each enabled component keeps besides (its registry `record`: the layerwise
                      loss's teacher states `hidden` [L, M, D], the contrastive loss's pooled state `pooled` [D])

The record is made from the live teacher the first time a row is seen (epoch 1), written to disk
(`OfflineTeacher`), and read back in later epochs instead of running the teacher. Training always
computes kd from the record, fresh or read back, so every epoch optimises the same objective, and
evaluation makes records from the live teacher the same way, so train and eval losses stay comparable.

kd from a record compares the two models over the K tokens plus one outcome holding the rest of the
mass (`losses.sparse_log_probs` 'other_bucket'): a lower bound of the full-vocabulary KL, equal to it
when the teacher's tail holds no mass, and exactly the live loss when `distill.kd_top_k` <= K (the
live top-k kd then reads the same tokens). Attention maps and expert outputs are too large to keep
per token: a component that reads them is declared `records=False` in the registry, and a non-zero
weight for it with records is a ConfigError (`objective.ResolvedObjective`).
"""

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.errors import ConfigError
from jaxdistill.models import ModelConfig, forward
from jaxdistill.objective import curriculum, losses

_FORMAT = 1
RECORD_KEY = "teacher_record"   # the batch entry that carries a record into the objective


@dataclasses.dataclass(frozen=True)
class OfflineTeacherSpec:
  """The `offline_teacher` group."""
  top_k: int = 0                  # teacher logits kept per token; 0: the live teacher at every step
  dir: str = ""                   # where records are kept; '': WORKDIR/offline_teacher


def record_from_output(teacher_out, teacher_mask_BxL, cfg, vocab: int) -> dict[str, jax.Array]:
  """A batch's records from a live teacher output (see the module docstring); `vocab`: the shared ids."""
  logits_BxLxV = teacher_out.logits_BxLxV[..., :vocab]
  dtype = logits_BxLxV.dtype
  temperatures = jnp.asarray(cfg.curriculum.temperature, jnp.float32)

  def per_token(logits_NxV):
    z_NxV = logits_NxV.astype(jnp.float32)
    top_NxK, ids_NxK = jax.lax.top_k(z_NxV, cfg.offline_top_k)
    z_max_Nx1 = top_NxK[:, :1]
    lse_NxP = jax.vmap(lambda t: jax.nn.logsumexp((z_NxV - z_max_Nx1) / t, axis=-1), out_axes=-1)(temperatures)
    return (top_NxK - z_max_Nx1).astype(dtype), ids_NxK.astype(jnp.int32), lse_NxP

  top_BxLxK, ids_BxLxK, lse_BxLxP = losses.token_chunks(per_token, (logits_BxLxV,), cfg.distill.chunk_size)
  record = {"topk_logits": top_BxLxK, "topk_ids": ids_BxLxK, "lse": lse_BxLxP}
  for part in _parts(cfg):
    record.update(part.arrays(teacher_out, teacher_mask_BxL, cfg))
  return jax.lax.stop_gradient(record)


def _parts(cfg) -> list:
  """The `RecordPart`s of the enabled components (what records keep besides the top-k logits)."""
  return [c.record for c in cfg.components() if c.record is not None]


@functools.partial(jax.jit, static_argnames=("cfg", "student", "teacher"))
def compute_records(teacher_params, batch, *, cfg, student: ModelConfig, teacher: ModelConfig):
  """The live teacher on a batch, reduced to its records: the only teacher work of a step in epoch 1."""
  out = forward(teacher_params, teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                output_hidden_states=cfg.needs_teacher_states, right_padded=True)
  return record_from_output(out, batch["teacher_attention_mask"], cfg, min(student.vocab_size, teacher.vocab_size))


def kd_loss(student_logits_BxLxV: jax.Array, record: dict, mask_BxL: jax.Array, opt_step: jax.Array, cfg, *,
            temperature: jax.Array) -> jax.Array:
  """kd at `temperature` (the curriculum's at `opt_step`) against a record, T^2-scaled, a masked token mean.

  The teacher's log-probabilities on its K kept tokens are (z_k - z_max) / T - lse_T; the student's
  come from its full log-softmax. `distill.kd_top_k` > 0 keeps the first kd_top_k of them with the
  live loss's tail rule; otherwise the rest of each distribution is one more outcome.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  d = cfg.distill
  phase = curriculum.phase(opt_step, cfg.total_steps, cfg.curriculum)
  lse_BxL = jnp.take(record["lse"], phase, axis=-1)
  kept = d.kd_top_k or cfg.offline_top_k
  tail = d.kd_topk_tail if d.kd_top_k else "other_bucket"

  def per_token(student_NxV, top_NxK, ids_NxK, lse_N):
    log_q_NxV = jax.nn.log_softmax(student_NxV.astype(jnp.float32) / temperature, axis=-1)
    log_q = jnp.take_along_axis(log_q_NxV, ids_NxK[:, :kept], axis=-1)
    log_p = top_NxK[:, :kept].astype(jnp.float32) / temperature - lse_N[:, None]
    log_p, log_q = losses.sparse_log_probs(log_p, log_q, tail)
    return losses.divergence(log_p, log_q, d.kd_mode, d.jsd_beta)

  per_token_BxL = losses.token_chunks(per_token, (student_logits_BxLxV, record["topk_logits"], record["topk_ids"],
                                                  lse_BxL), d.chunk_size)
  return temperature ** 2 * losses.masked_mean(per_token_BxL, mask_BxL)


# ---------------------------------------------------------------------------------------------
# On disk.

def layout(cfg, teacher: ModelConfig, seq_len: int, vocab: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Array name -> (storage dtype, shape of one row) of a record; ids as uint16 where the vocabulary allows."""
  k, dtype = cfg.offline_top_k, teacher.dtype
  arrays = {"topk_logits": (dtype, (seq_len, k)), "topk_ids": ("uint16" if vocab <= 2 ** 16 else "int32", (seq_len, k)),
            "lse": ("float32", (seq_len, len(cfg.curriculum.temperature)))}
  for part in _parts(cfg):
    arrays.update(part.layout(cfg, teacher, seq_len))
  return arrays


def bytes_per_row(arrays: dict[str, tuple[str, tuple[int, ...]]]) -> int:
  return sum(int(np.prod(shape)) * jnp.dtype(dtype).itemsize for dtype, shape in arrays.values())


def params_fingerprint(params) -> str:
  """A hash of a params pytree's structure and per-leaf sums (computed on device): which teacher this is."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sums = jax.device_get([(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))) for _, x in leaves])
  text = json.dumps([[jax.tree_util.keystr(p), list(x.shape), str(x.dtype), float(a), float(b)]
                     for (p, x), (a, b) in zip(leaves, sums)])
  return hashlib.sha256(text.encode()).hexdigest()


class OfflineTeacher:
  """Records of the train rows on disk: one memory-mapped file per array, rows in packing order.

  `filled` marks the rows whose record is complete (set after the record's arrays are written).
  The directory is named by a hash of `key` (teacher, rows, objective settings), so a different
  teacher or data never reads another's records; `flush` (at every checkpoint) makes the records
  written so far survive a restart, and a resumed run fills in the rest.
  """

  def __init__(self, root: str, key: dict, num_rows: int, arrays: dict[str, tuple[str, tuple[int, ...]]]):
    text = json.dumps({"format": _FORMAT, **key, "arrays": {n: [d, list(s)] for n, (d, s) in arrays.items()},
                       "rows": num_rows}, sort_keys=True)
    self.directory = os.path.join(root, hashlib.sha256(text.encode()).hexdigest()[:20])
    self.arrays, self.num_rows = arrays, num_rows
    os.makedirs(self.directory, exist_ok=True)
    meta_path = os.path.join(self.directory, "meta.json")
    fresh = True
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        fresh = json.load(f).get("key") != text
    mode = "w+" if fresh else "r+"
    self._files = {name: np.memmap(os.path.join(self.directory, f"{name}.bin"), dtype=jnp.dtype(dtype), mode=mode,
                                   shape=(num_rows,) + shape) for name, (dtype, shape) in arrays.items()}
    self._filled = np.memmap(os.path.join(self.directory, "filled.bin"), dtype=np.uint8, mode=mode, shape=(num_rows,))
    if fresh:
      with open(meta_path, "w") as f:
        json.dump({"key": text}, f)

  @property
  def rows_filled(self) -> int:
    return int(np.count_nonzero(self._filled))

  @property
  def bytes_per_token(self) -> float:
    seq_len = self.arrays["topk_ids"][1][0]
    return bytes_per_row(self.arrays) / seq_len

  def get(self, rows_B: np.ndarray) -> dict[str, np.ndarray] | None:
    """The records of rows `rows_B` (ids as int32), or None unless every one of them is filled."""
    rows_B = np.asarray(rows_B)
    if not np.all(self._filled[rows_B]):
      return None
    record = {name: np.asarray(array[rows_B]) for name, array in self._files.items()}
    record["topk_ids"] = record["topk_ids"].astype(np.int32)
    return record

  def put(self, rows_B: np.ndarray, record: dict) -> None:
    """Writes a batch's records (host or device arrays) for rows `rows_B`, then marks them filled."""
    rows_B = np.asarray(rows_B)
    for name, array in self._files.items():
      array[rows_B] = np.asarray(record[name]).astype(array.dtype)
    self._filled[rows_B] = 1

  def flush(self) -> None:
    for array in self._files.values():
      array.flush()
    self._filled.flush()


class RunRecords:
  """A training run's records: the store on disk and the compiled teacher that makes missing ones."""

  def __init__(self, store: OfflineTeacher, compute):
    self.store, self._compute = store, compute

  def batch_with_records(self, batch: dict, rows_B: np.ndarray, place=None):
    """(batch with its rows' records, None) when all are on disk; else (batch with fresh records,
    (rows, records) for the caller to `store.put` once the step is dispatched).

    `place`: puts records read from disk where the batch lives (`MeshPlan.global_batch`).
    """
    records = self.store.get(rows_B)
    if records is not None:
      return {**batch, RECORD_KEY: place(records) if place else records}, None
    records = self._compute(batch)
    return {**batch, RECORD_KEY: records}, (rows_B, records)


def for_run(root: str, cfg, student: ModelConfig, teacher, data) -> RunRecords:
  """Opens (or creates) a run's records under `root`, keyed by everything they depend on.

  `teacher`: the loaded teacher (`hf_io.Pretrained`); `data`: the run's `DataPipeline` (one tokenizer).
  """
  vocab = min(student.vocab_size, teacher.config.vocab_size)
  if cfg.offline_top_k > vocab:
    raise ConfigError("offline_teacher.top_k", cfg.offline_top_k, f"at most the vocabulary ({vocab} ids)")
  key = {"teacher": params_fingerprint(teacher.params),
         "teacher_config": repr(teacher.config.architecture()),
         "rows": hashlib.sha256(np.ascontiguousarray(data.train_sequences).tobytes()).hexdigest(),
         "temperatures": list(cfg.curriculum.temperature), "vocab": vocab}
  store = OfflineTeacher(os.path.expanduser(root), key, data.num_train_sequences,
                         layout(cfg, teacher.config, data.cfg.seq_len, vocab))
  compute = functools.partial(compute_records, teacher.params, cfg=cfg, student=student, teacher=teacher.config)
  return RunRecords(store, compute)
