"""Two tokenizations of the same text: which vocabulary entries and which positions correspond.

Distilling between models with different tokenizers needs two things:
  * a vocabulary mapping: pairs of ids that stand for exactly the same bytes (`token_bytes`,
    `vocab_mapping`), so that two next-token distributions can be compared over shared tokens;
  * a position alignment: pairs (student position i, teacher position j) after which both models have
    consumed exactly the same text, so that their next-token distributions predict the same continuation.

Positions are aligned through the tokenizers' character offsets into the original text, which survive
normalizers (NFKC, lowercasing) that change the bytes the tokens stand for. Token i *completes* the
character offset c when every token up to i ends at or before c and no later token starts before c; c is
then a boundary of that tokenization. Pieces of one multi-byte character (byte-level BPE bytes, byte-fallback
`<0xE2>` tokens) share the character's offsets, so only the last piece completes it. Text that no token
covers (a combining mark that NFKC composed into the previous character, a character a normalizer removed)
belongs to the token before it: the boundary after token i is the start of token i + 1. An aligned pair is
the token of each side completing the same boundary; a document's end (eos on both sides) is one too.

`pack_aligned` cuts a stream of aligned documents into fixed-shape rows that start and end at shared
boundaries, with each row's aligned pairs listed as positions.
"""

import copy
import itertools
import json
import re
from typing import Callable, Iterator, NamedTuple

import numpy as np

from jaxdistill.data.corpus import DataError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's tokens for raw bytes
ALIGNED_KEYS = ("student_input_ids", "student_attention_mask", "teacher_input_ids", "teacher_attention_mask",
                "align_student", "align_teacher", "align_mask")  # the packed arrays of aligned rows


# ---------------------------------------------------------------------------------------------
# Vocabularies.

def token_bytes(tokenizer) -> list[bytes | None]:
  """The bytes each id stands for, indexed by id; None for special and added tokens and unused ids.

  Byte-level BPE pieces are read through GPT-2's byte-to-character table ('Ġthe' -> b' the'), SentencePiece
  pieces with the metaspace as a space ('▁the' -> b' the') and byte-fallback tokens as their byte
  ('<0xE2>' -> b'\\xe2'), WordPiece continuations without their prefix ('##ing' -> b'ing').
  """
  definition = _definition(tokenizer)
  piece_bytes = _piece_decoder(definition)
  special = set(tokenizer.all_special_ids) | {t["id"] for t in definition.get("added_tokens") or []}
  out: list[bytes | None] = [None] * vocab_size(tokenizer)
  for piece, i in tokenizer.get_vocab().items():
    if i not in special:
      out[i] = piece_bytes(piece)
  return out


def vocab_mapping(student_tokenizer, teacher_tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(teacher_ids_M, student_ids_M), int32, in increasing student id: ids standing for the same bytes.

  One-to-one. Where several ids of one side stand for the same bytes, a regular piece is preferred over a
  byte-fallback token (the tokenizer only emits `<0x61>` for bytes it has no piece for, so 'a' is the
  token that carries probability), then the lowest id. Special tokens map nowhere except the two eos
  tokens, which map to each other. Identical tokenizers map every id, special ones included, to itself.
  """
  if same_tokenizer(student_tokenizer, teacher_tokenizer):
    ids_M = np.arange(vocab_size(student_tokenizer), dtype=np.int32)
    return ids_M, ids_M.copy()
  student_id_of = _preferred_ids(student_tokenizer)
  teacher_id_of = _preferred_ids(teacher_tokenizer)
  teacher_of_student = {student_id_of[b]: teacher_id_of[b] for b in student_id_of.keys() & teacher_id_of.keys()}
  student_eos, teacher_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
  if student_eos is not None and teacher_eos is not None:
    teacher_of_student = {s: t for s, t in teacher_of_student.items() if s != student_eos and t != teacher_eos}
    teacher_of_student[student_eos] = teacher_eos
  student_ids_M = np.array(sorted(teacher_of_student), np.int32)
  teacher_ids_M = np.array([teacher_of_student[s] for s in student_ids_M.tolist()], np.int32)
  return teacher_ids_M, student_ids_M


def prefix_mapping(student_tokenizer, teacher_tokenizer) -> np.ndarray:
  """teacher id -> the student id of the longest prefix of its bytes (int32 [teacher vocab]; -1: none).

  A teacher token says where the text goes next; the student token that starts that text is (to a
  good approximation) the longest student token that is a prefix of it. Tokens with the same bytes
  map to each other (`vocab_mapping`'s pairs, eos to eos included), so identical tokenizers map every
  id to itself; special tokens other than eos map nowhere (-1).
  """
  teacher_ids_M, student_ids_M = vocab_mapping(student_tokenizer, teacher_tokenizer)
  out_Vt = np.full(vocab_size(teacher_tokenizer), -1, np.int32)
  student_id_of = _preferred_ids(student_tokenizer)
  longest = max(map(len, student_id_of), default=0)
  for j, piece_bytes in enumerate(token_bytes(teacher_tokenizer)):
    for end in range(min(len(piece_bytes or b""), longest), 0, -1):
      if piece_bytes[:end] in student_id_of:
        out_Vt[j] = student_id_of[piece_bytes[:end]]
        break
  out_Vt[teacher_ids_M] = student_ids_M
  return out_Vt


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers split every text into the same ids (same definition and eos)."""
  return a is b or (_definition_str(a) == _definition_str(b) and a.eos_token_id == b.eos_token_id)


def vocab_size(tokenizer) -> int:
  """Ids in use, added tokens included: one more than the largest id."""
  return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def _preferred_ids(tokenizer) -> dict[bytes, int]:
  """bytes -> the id standing for them, regular pieces before byte-fallback tokens, then the lowest id."""
  vocab = tokenizer.get_vocab()
  fallback = {i for piece, i in vocab.items() if _BYTE_FALLBACK.fullmatch(piece)}
  id_of: dict[bytes, int] = {}
  for i, piece_bytes in sorted(enumerate(token_bytes(tokenizer)), key=lambda item: (item[0] in fallback, item[0])):
    if piece_bytes is not None:
      id_of.setdefault(piece_bytes, i)
  return id_of


def _definition_str(tokenizer) -> str:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise DataError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; aligning two "
                    "tokenizers needs their definitions and character offsets")
  return backend.to_str()


def _definition(tokenizer) -> dict:
  return json.loads(_definition_str(tokenizer))


def _components(node) -> Iterator[dict]:
  """Every component (a dict with a 'type') of a normalizer, pre-tokenizer or decoder, nested ones included."""
  if isinstance(node, dict):
    if "type" in node:
      yield node
    for value in node.values():
      yield from _components(value)
  elif isinstance(node, list):
    for value in node:
      yield from _components(value)


def _piece_decoder(definition: dict) -> Callable[[str], bytes | None]:
  """piece -> its bytes, for the vocabulary style the tokenizer's components reveal."""
  parts = [c for key in ("normalizer", "pre_tokenizer", "decoder") for c in _components(definition.get(key))]
  types = {c["type"] for c in parts}
  model = definition.get("model") or {}
  if "ByteLevel" in types:
    byte_of = _byte_level_table()
    return lambda piece: bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else None
  byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
  replacement = next((c.get("replacement", "▁") for c in parts if c["type"] == "Metaspace"), None)
  for c in _components(definition.get("decoder")):  # Llama-2 style: Replace('▁' -> ' ') instead of Metaspace
    if replacement is None and c["type"] == "Replace" and c.get("content") == " ":
      replacement = (c.get("pattern") or {}).get("String")
  prefix = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None

  def piece_bytes(piece: str) -> bytes:
    if byte_fallback and (match := _BYTE_FALLBACK.fullmatch(piece)):
      return bytes([int(match[1], 16)])
    if prefix and piece.startswith(prefix):
      piece = piece[len(prefix):]
    if replacement:
      piece = piece.replace(replacement, " ")
    return piece.encode()

  return piece_bytes


def _byte_level_table() -> dict[str, int]:
  """GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the rest for 256 + n."""
  printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  others = [b for b in range(256) if b not in set(printable)]
  table = {chr(b): b for b in printable}
  table.update({chr(256 + n): b for n, b in enumerate(others)})
  return table


# ---------------------------------------------------------------------------------------------
# Positions and streams.

def token_boundaries(offsets_Nx2: np.ndarray, text_len: int) -> np.ndarray:
  """For each token, the boundary (character offset) it completes, else -1: int64 [N]."""
  offsets_Nx2 = np.asarray(offsets_Nx2, np.int64).reshape(-1, 2)
  if not len(offsets_Nx2):
    return np.zeros(0, np.int64)
  reach_N = np.maximum.accumulate(offsets_Nx2[:, 1])
  later_start_N = np.append(np.minimum.accumulate(offsets_Nx2[:0:-1, 0])[::-1], text_len)
  later_start_N = np.minimum(later_start_N, text_len)
  boundary_N = np.where(reach_N <= later_start_N, later_start_N, -1)
  # A zero-width token completes the boundary of the token before it again: that one keeps it, and the
  # zero-width token (a marker for what follows) goes with the text after it.
  completing, = np.nonzero(boundary_N >= 0)
  boundary_N[completing[1:][boundary_N[completing[1:]] == boundary_N[completing[:-1]]]] = -1
  return boundary_N


def align_offsets(student_offsets_Sx2: np.ndarray, teacher_offsets_Tx2: np.ndarray,
                  text_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(student_K, teacher_K): token indices, both increasing, of the tokens completing a shared boundary."""
  student_S = token_boundaries(student_offsets_Sx2, text_len)
  teacher_T = token_boundaries(teacher_offsets_Tx2, text_len)
  student_K, = np.nonzero(student_S >= 0)
  teacher_K, = np.nonzero(teacher_T >= 0)
  _, in_student, in_teacher = np.intersect1d(student_S[student_K], teacher_T[teacher_K], assume_unique=True,
                                             return_indices=True)
  return student_K[in_student], teacher_K[in_teacher]


class AlignedTokens(NamedTuple):
  """Documents tokenized by both tokenizers, each followed by its eos, and their shared boundaries.

  Shared boundary k is where the student has consumed `student_ends_K[k]` tokens and the teacher
  `teacher_ends_K[k]`: the aligned positions are these counts minus one. Both strictly increase.
  """
  student_ids_S: np.ndarray   # int32
  teacher_ids_T: np.ndarray   # int32
  student_ends_K: np.ndarray  # int64
  teacher_ends_K: np.ndarray  # int64


def align_documents(texts: list[str], student_tokenizer, teacher_tokenizer, student_eos: int,
                    teacher_eos: int) -> AlignedTokens:
  """Tokenizes `texts` with both tokenizers (one batched call each) and aligns them, eos with eos.

  The documents are laid end to end with each eos standing for one character after its document, so one
  `align_offsets` call over the whole stream finds every document's pairs and its eos pair.
  """
  if not texts:
    return concatenate([])
  lengths_D = np.fromiter(map(len, texts), np.int64, len(texts))
  starts_D = np.cumsum(lengths_D + 1) - (lengths_D + 1)
  student_ids_S, student_offsets_Sx2 = _encode_stream(texts, student_tokenizer, student_eos, starts_D, lengths_D)
  teacher_ids_T, teacher_offsets_Tx2 = _encode_stream(texts, teacher_tokenizer, teacher_eos, starts_D, lengths_D)
  text_len = int(starts_D[-1] + lengths_D[-1] + 1)
  student_K, teacher_K = align_offsets(student_offsets_Sx2, teacher_offsets_Tx2, text_len)
  return AlignedTokens(student_ids_S, teacher_ids_T, student_K + 1, teacher_K + 1)


def _encode_stream(texts: list[str], tokenizer, eos_id: int, starts_D: np.ndarray,
                   lengths_D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids_N int32, offsets_Nx2 int64) of all documents, each followed by eos; offsets into the laid-out stream."""
  encoded = untrimmed_offsets(tokenizer)(texts, add_special_tokens=False, return_offsets_mapping=True,
                                         return_attention_mask=False, return_token_type_ids=False, verbose=False)
  counts_D = np.fromiter(map(len, encoded["input_ids"]), np.int64, len(texts))
  ids_N = np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), np.int32)
  flat_offsets = itertools.chain.from_iterable(itertools.chain.from_iterable(encoded["offset_mapping"]))
  offsets_Nx2 = np.fromiter(flat_offsets, np.int64).reshape(-1, 2) + np.repeat(starts_D, counts_D)[:, None]
  ends_D = starts_D + lengths_D
  after_D = np.cumsum(counts_D)
  return (np.insert(ids_N, after_D, np.int32(eos_id)),
          np.insert(offsets_Nx2, after_D, np.stack([ends_D, ends_D + 1], axis=1), axis=0))


def untrimmed_offsets(tokenizer):
  """The tokenizer, or a copy without its post-processor where that trims whitespace off the offsets.

  A `ByteLevel(trim_offsets=True)` post-processor (GPT-NeoX, RoBERTa) gives 'Ġthe' the offsets of 'the'
  and a whitespace-only token an empty span, so spaces would seem consumed by the wrong token. Without
  special tokens the post-processor changes nothing else, so the copy gives the same ids.
  """
  processor = tokenizer.backend_tokenizer.post_processor
  state = json.loads(processor.__getstate__()) if processor is not None else None
  if not any(c.get("trim_offsets") for c in _components(state)):
    return tokenizer
  untrimmed = copy.deepcopy(tokenizer)
  untrimmed.backend_tokenizer.post_processor = None
  return untrimmed


def concatenate(parts: list[AlignedTokens]) -> AlignedTokens:
  """One stream of several, in order (the ends of each part shift by the tokens before it)."""
  student_before = np.cumsum([0] + [len(p.student_ids_S) for p in parts[:-1]], dtype=np.int64)
  teacher_before = np.cumsum([0] + [len(p.teacher_ids_T) for p in parts[:-1]], dtype=np.int64)
  empty = AlignedTokens(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
  return AlignedTokens(
      np.concatenate([empty.student_ids_S] + [p.student_ids_S for p in parts]),
      np.concatenate([empty.teacher_ids_T] + [p.teacher_ids_T for p in parts]),
      np.concatenate([empty.student_ends_K] + [p.student_ends_K + s for p, s in zip(parts, student_before)]),
      np.concatenate([empty.teacher_ends_K] + [p.teacher_ends_K + t for p, t in zip(parts, teacher_before)]))


def identical(tokens_T: np.ndarray) -> AlignedTokens:
  """The stream of one tokenizer used on both sides: every position is aligned with itself."""
  ends_T = np.arange(1, len(tokens_T) + 1, dtype=np.int64)
  return AlignedTokens(tokens_T, tokens_T, ends_T, ends_T.copy())


# ---------------------------------------------------------------------------------------------
# Rows.

def pack_aligned(tokens: AlignedTokens, seq_len: int, teacher_seq_len: int, pad_id: int,
                 teacher_pad_id: int, keep_remainder: bool) -> dict[str, np.ndarray]:
  """Cuts an aligned stream into rows from one shared boundary to another: batch key -> int32 [N, width].

  A row ends at the last shared boundary where at most `seq_len` student and `teacher_seq_len` teacher tokens
  fit; the rest is padding under mask 0. `align_student`/`align_teacher` [N, seq_len] hold the row's aligned
  pairs in order (the positions of the tokens completing each shared boundary), padded with 0 under
  `align_mask` 0. A stretch without a shared boundary too long for any row is skipped. The final row is
  dropped, unless it holds `seq_len` student tokens or `keep_remainder`.
  """
  student_ends_K, teacher_ends_K = tokens.student_ends_K, tokens.teacher_ends_K
  rows = []  # (first pair, one past the last pair, student and teacher tokens before the row)
  first, student_at, teacher_at = 0, 0, 0
  while first < len(student_ends_K):
    fits = min(np.searchsorted(student_ends_K, student_at + seq_len, "right"),
               np.searchsorted(teacher_ends_K, teacher_at + teacher_seq_len, "right"))
    if fits > first:
      rows.append((first, int(fits), student_at, teacher_at))
    first = max(int(fits), first + 1)
    student_at, teacher_at = int(student_ends_K[first - 1]), int(teacher_ends_K[first - 1])
  if rows and not keep_remainder and rows[-1][1] == len(student_ends_K) and student_at - rows[-1][2] < seq_len:
    rows.pop()
  widths = {key: teacher_seq_len if key.startswith("teacher_") else seq_len for key in ALIGNED_KEYS}
  fill = {"student_input_ids": pad_id, "teacher_input_ids": teacher_pad_id}
  out = {key: np.full((len(rows), widths[key]), fill.get(key, 0), np.int32) for key in ALIGNED_KEYS}
  for r, (first, stop, student_at, teacher_at) in enumerate(rows):
    for side, ids, ends_K, at in (("student", tokens.student_ids_S, student_ends_K, student_at),
                                  ("teacher", tokens.teacher_ids_T, teacher_ends_K, teacher_at)):
      end = int(ends_K[stop - 1])
      out[f"{side}_input_ids"][r, :end - at] = ids[at:end]
      out[f"{side}_attention_mask"][r, :end - at] = 1
      out[f"align_{side}"][r, :stop - first] = ends_K[first:stop] - 1 - at
    out["align_mask"][r, :stop - first] = 1
  return out
