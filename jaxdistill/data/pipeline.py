"""Input pipeline: documents -> train/eval split -> tokens -> packed sequences -> micro-batches.

The documents of `data.source` (see `corpus.py`) are split at the document level by a permutation
seeded with the run's seed. Each side is tokenized (no special tokens from the tokenizer; `eos` after
every document), concatenated and cut into sequences of exactly `seq_len` tokens, so a sequence can span
documents. Train drops the final partial sequence; eval keeps it, padded, with mask 0 on the padding.

Train batches are random access: `train_batch(micro_step)` is batch `micro_step` of an endless stream
(grain `shuffle -> batch -> repeat`), whose epoch `micro_step // batches_per_epoch` is its own permutation
of the train sequences. The same seed and micro_step always give the same batch, so a resumed run's data
position is just the number of micro-batches it has consumed.

With a teacher tokenizer (distillation across vocabularies), every document is tokenized by both
tokenizers and the stream is cut only at boundaries both share (see `alignment.py`), so that a row's two
sequences start at the same character: a row ends at the last shared boundary where at most `seq_len`
student and `teacher_seq_len` teacher tokens fit, and the rest of each sequence is padding (mask 0), in
train too. Each row also lists its aligned pairs: positions of the two sequences after which both models
have consumed exactly the same text.

With a `cache_dir`, the packed arrays are saved as `.npy` files under a key that hashes everything they
depend on (source and its files' sizes and times, encoding, split settings, seq_len, seed, tokenizers), and
reused; meta.json keeps the count of undecodable bytes replaced by U+FFFD, so a cached run reports it too.
"""

import codecs
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Iterator, NamedTuple

import grain
import numpy as np
from tqdm import tqdm

from jaxdistill.data import alignment, corpus
from jaxdistill.data.corpus import DataError
from jaxdistill.errors import ConfigError

_CACHE_FORMAT = 3                # bump when the packing or the cache layout changes
_TOKENIZE_CHUNK = 1000           # documents per tokenizer call (batched calls run in Rust, in parallel)
_PROGRESS_MIN_DOCUMENTS = 1000   # fewer documents tokenize in well under a second: no progress shown


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` group; a field out of range raises ConfigError naming `data.<field>`."""
  source: str = corpus.STDLIB_DOCS  # builtin:stdlib_docs | a .txt/.jsonl/.json/.parquet file or dir | hub dataset id
  subset: str = ""                  # hub dataset configuration (the `name` of load_dataset); '' for none
  split: str = "train"              # hub dataset split the documents come from (train and eval are cut from it)
  text_field: str = "text"          # .jsonl/.json field or .parquet/hub column holding the text
  seq_len: int = 512                # tokens per packed sequence
  teacher_seq_len: int = 0          # teacher tokens per sequence with a teacher tokenizer of its own; 0: seq_len
  batch_size: int = 8               # sequences per micro-batch
  eval_fraction: float = 0.05       # share of documents held out for eval (at least one document)
  max_eval_batches: int = 0         # eval batches per evaluation; 0: all
  max_documents: int = 0            # keep the first N documents of the source; 0: all
  encoding: str = "utf-8"           # text encoding of local .txt/.jsonl/.json files (any Python codec, e.g. latin-1)
  encoding_errors: str = "strict"   # strict: an undecodable byte stops the run | replace: U+FFFD, counted

  def __post_init__(self):
    for field in ("source", "subset", "split", "text_field", "encoding", "encoding_errors"):
      if not isinstance(getattr(self, field), str):
        raise ConfigError(f"data.{field}", getattr(self, field), "a string")
    if not self.source:
      raise ConfigError("data.source", self.source, corpus.SOURCES_ALLOWED)
    if not corpus.is_text_encoding(self.encoding):
      raise ConfigError("data.encoding", self.encoding, "a text encoding Python knows, e.g. 'utf-8', 'latin-1', "
                        "'cp1252', 'utf-16'")
    if self.encoding_errors not in corpus.ENCODING_ERRORS:
      raise ConfigError("data.encoding_errors", self.encoding_errors,
                        "strict (an undecodable byte stops the run) or replace (it becomes U+FFFD, counted)")
    for field, minimum in (("seq_len", 2), ("batch_size", 1), ("max_eval_batches", 0), ("max_documents", 0)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{field}", value, f"an integer >= {minimum}")
    teacher_len = self.teacher_seq_len
    if isinstance(teacher_len, bool) or not isinstance(teacher_len, int) or teacher_len < 0 or teacher_len == 1:
      raise ConfigError("data.teacher_seq_len", teacher_len, "0 (same as data.seq_len) or an integer >= 2")
    fraction = self.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
      raise ConfigError("data.eval_fraction", self.eval_fraction, "a number strictly between 0 and 1")

  @property
  def teacher_len(self) -> int:
    """Teacher tokens per packed sequence: `teacher_seq_len`, or `seq_len` where that is 0."""
    return self.teacher_seq_len or self.seq_len


def split_documents(num_documents: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) document indices: a seeded permutation, eval its first ceil(fraction * n) (>= 1)."""
  num_eval = max(1, math.ceil(eval_fraction * num_documents - 1e-9))  # 0.1 * 30 is 3.0000000000000004
  if num_documents - num_eval < 1:
    raise DataError(f"data.source: {num_documents} document(s) cannot be split into train and eval "
                    f"(data.eval_fraction={eval_fraction} holds out {num_eval}); add documents")
  order = np.random.default_rng(seed).permutation(num_documents)
  return order[num_eval:], order[:num_eval]


def pack_sequences(tokens_T: np.ndarray, seq_len: int, pad_id: int,
                   keep_remainder: bool) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a token stream into rows of `seq_len`: (ids_NxL, mask_NxL), int32.

  The final partial row is dropped, or with `keep_remainder` padded with `pad_id` under mask 0.
  """
  num_full = len(tokens_T) // seq_len
  ids_NxL = np.asarray(tokens_T[:num_full * seq_len], np.int32).reshape(num_full, seq_len)
  mask_NxL = np.ones_like(ids_NxL)
  rest = len(tokens_T) - num_full * seq_len
  if keep_remainder and rest:
    last_ids_1xL = np.full((1, seq_len), pad_id, np.int32)
    last_ids_1xL[0, :rest] = tokens_T[num_full * seq_len:]
    last_mask_1xL = (np.arange(seq_len) < rest).astype(np.int32)[None]
    ids_NxL = np.concatenate([ids_NxL, last_ids_1xL])
    mask_NxL = np.concatenate([mask_NxL, last_mask_1xL])
  return ids_NxL, mask_NxL


class _Progress:
  """Tokenizing progress on stderr: a tqdm bar on a terminal; elsewhere (a log file) one line once done."""

  def __init__(self, total: int, desc: str):
    self.total, self.desc, self.start = total, desc, time.perf_counter()
    shown = total >= _PROGRESS_MIN_DOCUMENTS
    self.line = shown and not sys.stderr.isatty()  # a log file: no carriage-return redraws
    self.bar = tqdm(total=total, desc=desc, unit="doc", disable=not shown or self.line)

  def __enter__(self):
    return self.bar

  def __exit__(self, *exc) -> None:
    self.bar.close()
    if self.line and exc[0] is None:
      print(f"{self.desc}: {self.total:,} documents in {time.perf_counter() - self.start:.1f} s", file=sys.stderr,
            flush=True)


def tokenize_documents(texts: list[str], tokenizer, eos_id: int, desc: str = "tokenizing") -> np.ndarray:
  """All documents' token ids, each followed by `eos_id`, concatenated: int32 [total tokens]."""
  pieces = []
  eos_1 = np.array([eos_id], np.int32)
  with _Progress(len(texts), desc) as bar:
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
      chunk = texts[start:start + _TOKENIZE_CHUNK]
      ids_per_document = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                                   return_token_type_ids=False, verbose=False)["input_ids"]
      for ids in ids_per_document:
        pieces += [np.asarray(ids, np.int32), eos_1]
      bar.update(len(chunk))
  return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def tokenize_aligned(texts: list[str], tokenizer, teacher_tokenizer, eos_id: int, teacher_eos_id: int,
                     desc: str = "tokenizing") -> alignment.AlignedTokens:
  """Both tokenizations of all documents, each followed by its eos, and the boundaries they share."""
  if alignment.same_tokenizer(tokenizer, teacher_tokenizer) and eos_id == teacher_eos_id:
    return alignment.identical(tokenize_documents(texts, tokenizer, eos_id, desc))
  student, teacher = alignment.untrimmed_offsets(tokenizer), alignment.untrimmed_offsets(teacher_tokenizer)
  parts = []
  with _Progress(len(texts), desc) as bar:
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
      chunk = texts[start:start + _TOKENIZE_CHUNK]
      parts.append(alignment.align_documents(chunk, student, teacher, eos_id, teacher_eos_id))
      bar.update(len(chunk))
  return alignment.concatenate(parts)


class _Teacher(NamedTuple):
  """The teacher's own tokenizer and its special ids."""
  tokenizer: object
  eos_id: int
  pad_id: int


class _Packed(NamedTuple):
  train: dict[str, np.ndarray]  # batch key -> int32 rows; without a teacher tokenizer only the ids
  eval: dict[str, np.ndarray]   # batch key -> int32 rows; at least the student's ids and mask
  num_documents: int
  decoding: corpus.DecodeStats  # undecodable byte sequences replaced while reading the documents


class DataPipeline:
  """Packed train/eval sequences of one data source, served as fixed-shape int32 micro-batches.

  Without a teacher tokenizer, every batch is a dict of [batch_size, seq_len] int32 arrays:
  `student_input_ids`, `student_attention_mask`, `teacher_input_ids`, `teacher_attention_mask` (one shared
  tokenizer, so the teacher entries are the student's arrays). With one, the teacher entries are
  [batch_size, teacher_seq_len] arrays of the teacher's tokenization of the same text, and `align_student`,
  `align_teacher`, `align_mask` [batch_size, seq_len] list the aligned position pairs of each row.
  """

  def __init__(self, cfg: DataConfig, tokenizer, seed: int, cache_dir: str | None = None,
               teacher_tokenizer=None):
    self.cfg, self.seed = cfg, seed
    eos_id = _eos_id(tokenizer, "the tokenizer")
    self.pad_id = _pad_id(tokenizer, eos_id)
    teacher = None
    if teacher_tokenizer is not None:
      teacher_eos_id = _eos_id(teacher_tokenizer, "the teacher's tokenizer")
      teacher = _Teacher(teacher_tokenizer, teacher_eos_id, _pad_id(teacher_tokenizer, teacher_eos_id))
    self.aligned = teacher is not None
    # What identifies the data beyond its config: the files behind the source and the tokenizers.
    self.identity = {"content": corpus.source_fingerprint(cfg.source), "tokenizer": _definition_sha256(tokenizer),
                     "teacher_tokenizer": _definition_sha256(teacher.tokenizer) if teacher else ""}
    files = _cache_files(self.aligned)
    packed = None
    if cache_dir:
      key = _cache_key(cfg, self.identity, tokenizer, seed, eos_id, self.pad_id, teacher)
      directory = os.path.join(cache_dir, f"packed-{hashlib.sha256(key.encode()).hexdigest()[:20]}")
      packed = _read_cache(directory, key, files, cfg)
    if packed is None:
      packed = _build(cfg, tokenizer, seed, eos_id, self.pad_id, teacher)
      if cache_dir:
        _write_cache(directory, key, files, packed)
    self._train = {key: _read_only(rows) for key, rows in packed.train.items()}
    self.num_documents = packed.num_documents
    self.decoding = packed.decoding
    if self.batches_per_epoch < 1:
      raise DataError(f"the train split packs into {self.num_train_sequences} sequence(s) of data.seq_len="
                      f"{cfg.seq_len} tokens, fewer than one batch (data.batch_size={cfg.batch_size}); "
                      "add documents or lower data.batch_size or data.seq_len")
    # Eval rows are padded up to whole batches so that every eval batch has the same shape.
    self.num_eval_sequences = len(packed.eval["student_input_ids"])
    num_pad_rows = -self.num_eval_sequences % cfg.batch_size
    fill = {"student_input_ids": self.pad_id, "teacher_input_ids": teacher.pad_id if teacher else self.pad_id}
    self._eval = {key: _read_only(np.concatenate([rows, np.full((num_pad_rows, rows.shape[1]), fill.get(key, 0),
                                                                 np.int32)]))
                  for key, rows in packed.eval.items()}  # padding rows: pad ids, mask 0, no aligned pairs
    self._train_stream = (grain.MapDataset.range(self.num_train_sequences).shuffle(seed=seed)
                          .batch(cfg.batch_size, drop_remainder=True).repeat(None))

  @property
  def num_train_sequences(self) -> int:
    return len(self._train["student_input_ids"])

  @property
  def batches_per_epoch(self) -> int:
    """Full micro-batches per pass; the sequences left over differ from epoch to epoch."""
    return self.num_train_sequences // self.cfg.batch_size

  @property
  def train_tokens(self) -> int:
    """Real (mask 1) student tokens in the packed train sequences (all of them without a teacher tokenizer)."""
    mask_NxL = self._train.get("student_attention_mask")
    return int(mask_NxL.sum()) if mask_NxL is not None else self._train["student_input_ids"].size

  @property
  def eval_tokens(self) -> int:
    """Real (mask 1) student tokens over all eval sequences, before `max_eval_batches`."""
    return int(self._eval["student_attention_mask"].sum())

  @property
  def train_sequences(self) -> np.ndarray:
    """The packed student train sequences, read-only int32 [num_train_sequences, seq_len], before shuffling."""
    return self._train["student_input_ids"]

  @property
  def train_rows(self) -> dict[str, np.ndarray]:
    """All packed train arrays, keyed like a batch, in packing order (before shuffling)."""
    return _batch(self._train)

  @property
  def alignment_rate(self) -> float:
    """Aligned pairs per real student token over the train split (1 without a teacher tokenizer)."""
    if not self.aligned:
      return 1.0
    return int(self._train["align_mask"].sum()) / max(1, self.train_tokens)

  @property
  def teacher_tokens_per_student_token(self) -> float:
    """Real teacher tokens per real student token over the train split (1 without a teacher tokenizer)."""
    if not self.aligned:
      return 1.0
    return int(self._train["teacher_attention_mask"].sum()) / max(1, self.train_tokens)

  @property
  def num_eval_batches(self) -> int:
    total = len(self._eval["student_input_ids"]) // self.cfg.batch_size
    return min(total, self.cfg.max_eval_batches) if self.cfg.max_eval_batches else total

  def train_batch(self, micro_step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Micro-batch number `micro_step` (0-based) of the endless shuffled stream.

    `rows`: which of its rows to read (a host of a multi-host run reads only its own).
    """
    rows_B = self.train_row_indices(micro_step)[rows]
    return _batch({key: array[rows_B] for key, array in self._train.items()})

  def train_row_indices(self, micro_step: int) -> np.ndarray:
    """Which packed train rows (indices in packing order) micro-batch `micro_step` holds, [batch_size]."""
    if micro_step < 0:
      raise ValueError(f"micro_step must be >= 0, got {micro_step}")
    return np.asarray(self._train_stream[int(micro_step)])

  def eval_batches(self, rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """The eval set in a fixed order, `num_eval_batches` batches (`rows` of each); padding rows have mask 0."""
    batch_size = self.cfg.batch_size
    for b in range(self.num_eval_batches):
      rows_B = np.arange(b * batch_size, (b + 1) * batch_size)[rows]
      yield _batch({key: array[rows_B] for key, array in self._eval.items()})

  def position(self, micro_step: int) -> dict[str, int]:
    """Where micro-batch `micro_step` lies in the data: its epoch and its index within that epoch."""
    epoch, batch_in_epoch = divmod(int(micro_step), self.batches_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

  def summary(self) -> str:
    """One line for the run log."""
    cfg = self.cfg
    line = (f"{cfg.source}: {self.num_documents:,} documents; train {self.num_train_sequences:,} x "
            f"{cfg.seq_len} tokens ({self.batches_per_epoch:,} batches of {cfg.batch_size} per epoch); "
            f"eval {self.num_eval_sequences:,} sequences, {self.eval_tokens:,} tokens, "
            f"{self.num_eval_batches:,} batches")
    if self.aligned:
      line += (f"; teacher tokenizer: {cfg.teacher_len} tokens per sequence, "
               f"{self.teacher_tokens_per_student_token:.3f} per student token, "
               f"{self.alignment_rate:.1%} of student tokens aligned")
    if self.decoding.replaced:
      line += f"; {self.decoding.describe()}"
    return line


def _batch(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A batch's dict; with one tokenizer the teacher entries are the student's arrays (train masks all 1)."""
  if "teacher_input_ids" in arrays:
    return {key: arrays[key] for key in alignment.ALIGNED_KEYS}
  ids_BxL = arrays["student_input_ids"]
  mask_BxL = arrays["student_attention_mask"] if "student_attention_mask" in arrays else np.ones_like(ids_BxL)
  return {"student_input_ids": ids_BxL, "student_attention_mask": mask_BxL,
          "teacher_input_ids": ids_BxL, "teacher_attention_mask": mask_BxL}


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


def _eos_id(tokenizer, described: str) -> int:
  """The tokenizer's eos id; DataError without one."""
  if tokenizer.eos_token_id is None:
    raise DataError(f"{described} has no eos token; packing needs one to mark where documents end")
  return tokenizer.eos_token_id


def _pad_id(tokenizer, eos_id: int) -> int:
  """The tokenizer's pad id, else its eos id."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id


def _build(cfg: DataConfig, tokenizer, seed: int, eos_id: int, pad_id: int, teacher: _Teacher | None) -> _Packed:
  documents, decoding = corpus.read_documents(cfg)
  train_docs, eval_docs = split_documents(len(documents), cfg.eval_fraction, seed)
  splits = {"train": [documents[i] for i in train_docs], "eval": [documents[i] for i in eval_docs]}
  if teacher is None:
    train_T = tokenize_documents(splits["train"], tokenizer, eos_id, "tokenizing train")
    eval_T = tokenize_documents(splits["eval"], tokenizer, eos_id, "tokenizing eval")
    train_ids_NxL, _ = pack_sequences(train_T, cfg.seq_len, pad_id, keep_remainder=False)
    eval_ids_MxL, eval_mask_MxL = pack_sequences(eval_T, cfg.seq_len, pad_id, keep_remainder=True)
    return _Packed({"student_input_ids": train_ids_NxL},
                   {"student_input_ids": eval_ids_MxL, "student_attention_mask": eval_mask_MxL}, len(documents),
                   decoding)
  # One definition check, not one per split: the same object is recognised at once.
  teacher_tokenizer = tokenizer if alignment.same_tokenizer(tokenizer, teacher.tokenizer) else teacher.tokenizer
  packed = {}
  for split, texts in splits.items():
    tokens = tokenize_aligned(texts, tokenizer, teacher_tokenizer, eos_id, teacher.eos_id, f"tokenizing {split}")
    packed[split] = alignment.pack_aligned(tokens, cfg.seq_len, cfg.teacher_len, pad_id, teacher.pad_id,
                                           keep_remainder=split == "eval")
  return _Packed(packed["train"], packed["eval"], len(documents), decoding)


# ---------------------------------------------------------------------------------------------
# Cache.

def _cache_files(aligned: bool) -> dict[str, tuple[str, str]]:
  """Cache file name (without `.npy`) -> (split, batch key) of each packed array."""
  if not aligned:
    return {"train_ids_NxL": ("train", "student_input_ids"), "eval_ids_MxL": ("eval", "student_input_ids"),
            "eval_mask_MxL": ("eval", "student_attention_mask")}
  return {f"{split}_{key}": (split, key) for split in ("train", "eval") for key in alignment.ALIGNED_KEYS}


def _definition_sha256(tokenizer) -> str:
  """A hash of everything that decides how the tokenizer splits text."""
  backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's full definition
  definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(definition.encode()).hexdigest()


def _cache_key(cfg: DataConfig, identity: dict, tokenizer, seed: int, eos_id: int, pad_id: int,
               teacher: _Teacher | None) -> str:
  """Everything the packed arrays depend on, as canonical JSON (hashed into the cache directory's name).

  `identity`: `DataPipeline.identity` (the source's files and the tokenizers' definition hashes).
  """
  key = {
      "format": _CACHE_FORMAT, "source": cfg.source, "content": identity["content"],
      "subset": cfg.subset, "split": cfg.split, "text_field": cfg.text_field,
      "encoding": codecs.lookup(cfg.encoding).name, "encoding_errors": cfg.encoding_errors,
      "max_documents": cfg.max_documents, "seq_len": cfg.seq_len, "eval_fraction": cfg.eval_fraction,
      "seed": seed, "tokenizer": type(tokenizer).__name__, "eos_id": eos_id, "pad_id": pad_id,
      "tokenizer_sha256": identity["tokenizer"],
  }
  if teacher is not None:
    key.update(teacher_seq_len=cfg.teacher_len, teacher_tokenizer=type(teacher.tokenizer).__name__,
               teacher_eos_id=teacher.eos_id, teacher_pad_id=teacher.pad_id,
               teacher_tokenizer_sha256=identity["teacher_tokenizer"])
  return json.dumps(key, sort_keys=True)


def _read_cache(directory: str, key: str, files: dict[str, tuple[str, str]], cfg: DataConfig) -> _Packed | None:
  """The cached arrays, or None when absent, unreadable or inconsistent (then they are rebuilt)."""
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta["key"] != key:
      raise ValueError("key mismatch (hash collision)")
    splits = {"train": {}, "eval": {}}
    for name, (split, batch_key) in files.items():
      array = np.load(os.path.join(directory, f"{name}.npy"), allow_pickle=False)
      width = cfg.teacher_len if batch_key.startswith("teacher_") else cfg.seq_len
      if array.dtype != np.int32 or array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name} has the wrong dtype or shape")
      splits[split][batch_key] = array
    if any(len({len(a) for a in arrays.values()}) != 1 for arrays in splits.values()):
      raise ValueError("arrays of one split differ in their number of rows")
    decoding = corpus.DecodeStats(int(meta["decoding"]["replaced"]), [str(f) for f in meta["decoding"]["files"]])
    return _Packed(splits["train"], splits["eval"], int(meta["num_documents"]), decoding)
  except (OSError, ValueError, EOFError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
    logging.getLogger(__name__).warning("data cache %s is unusable (%s: %s); rebuilding it",
                                        directory, type(e).__name__, e)
    return None


def _write_cache(directory: str, key: str, files: dict[str, tuple[str, str]], packed: _Packed) -> None:
  """Writes each file through a temporary name and a rename; meta.json last, so it marks a complete cache."""
  def save(name: str, write) -> None:  # a unique temporary name: hosts sharing the directory may write at once
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f"{name}.", suffix=".tmp", delete=False) as f:
      write(f)
    os.replace(f.name, os.path.join(directory, name))

  try:
    os.makedirs(directory, exist_ok=True)
    for name, (split, batch_key) in files.items():
      array = getattr(packed, split)[batch_key]
      save(f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
    meta = {"key": key, "num_documents": packed.num_documents, "decoding": dataclasses.asdict(packed.decoding)}
    save("meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
  except OSError as e:  # a read-only or full disk costs a rebuild next time, not the run
    logging.getLogger(__name__).warning("could not write data cache %s (%s)", directory, e)
