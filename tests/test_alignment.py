"""Cross-tokenizer alignment: token bytes, vocabulary mapping, shared boundaries and packing with two tokenizers.

Two kinds of tokenizers: tiny hand-built ones whose every token is known (for hand-computed expectations),
and two small BPEs trained here on stdlib docstrings, a GPT-2-style byte-level one and a SentencePiece-like
one (NFKC normalizer, metaspace, byte fallback), for properties on tricky and real text.
"""

import json
import os
import time
import unicodedata
import weakref

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import CountingTokenizer
from jaxdistill.data import DataConfig, DataPipeline, load_documents
from jaxdistill.data.alignment import (ALIGNED_KEYS, AlignedTokens, align_documents, align_offsets, pack_aligned,
                                       prefix_mapping, token_boundaries, token_bytes, vocab_mapping)
from jaxdistill.data.pipeline import split_documents, tokenize_documents
from jaxdistill.data.tokenizer import byte_tokenizer, train_byte_level_bpe, train_sentencepiece_bpe

SENTENCEPIECE_PIECES = (["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                        + ["▁", "\n", "a", "b", "c", "e", "f", "i", "x", "▁a", "▁b", "\n\n"])
TRICKY_TEXTS = ["a   b\n\n\tc", "café naïve résumé", "日本語のテキスト", "emoji 😀👍🏽 ok",
                "e\u0301 combining n\u0303o", "ﬁne ﬂow ① Ⅷ ＡＢ", "tabs\t\tand  spaces  \n", "  leading spaces",
                "İstanbul ẞ ǅ", "x\u00a0y"]  # whitespace runs, accents, CJK, emoji, combining marks, NFKC changes


def wrap(tok: Tokenizer, eos: str, **special) -> PreTrainedTokenizerFast:
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **special)


def tiny_byte_level() -> PreTrainedTokenizerFast:
  """Ids 0-255 are the bytes, 256 'ĠĠ', 257 'Ġb', 258 eos."""
  bytes_vocab = {char: i for char, i in byte_tokenizer().get_vocab().items() if i < 256}  # there id == byte
  vocab = bytes_vocab | {"ĠĠ": 256, "Ġb": 257}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "Ġ"), ("Ġ", "b")]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  return wrap(tok, "<|endoftext|>")


def tiny_sentencepiece(lowercase: bool = False) -> PreTrainedTokenizerFast:
  """'<unk>' 0, '</s>' 1, '<0x00>'.. '<0xFF>' 2-257, then '▁' 258, '\\n' 259, 'a' 260 ... '\\n\\n' 269; NFKC."""
  vocab = {piece: i for i, piece in enumerate(SENTENCEPIECE_PIECES)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b"), ("\n", "\n")], byte_fallback=True,
                             unk_token="<unk>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + [normalizers.Lowercase()] * lowercase)
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
  tok.add_special_tokens(["<unk>", "</s>"])
  return wrap(tok, "</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def docstrings():
  return load_documents(DataConfig(max_documents=300))


@pytest.fixture(scope="module")
def byte_bpe(docstrings):
  """GPT-2 style: byte-level BPE, 400 tokens, '<|endoftext|>' id 0."""
  return train_byte_level_bpe(docstrings, 400)


@pytest.fixture(scope="module")
def sentencepiece_bpe(docstrings):
  """SentencePiece-like: NFKC, metaspace, BPE over 70 characters (350 pieces) with byte fallback; 608 tokens."""
  return train_sentencepiece_bpe(docstrings, 608)


_TABLES = weakref.WeakKeyDictionary()  # tokenizer -> (its token bytes, whether it prepends a metaspace)


def read(tokenizer, ids, starts_document: bool) -> str:
  """The NFKC text that `ids` stand for, by their token bytes; eos reads as NUL.

  A metaspace tokenizer prepends a space to every document (which starts with no whitespace here):
  that space is dropped, at the start when `starts_document` and after every eos.
  """
  if tokenizer not in _TABLES:
    _TABLES[tokenizer] = (token_bytes(tokenizer),
                          isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Metaspace))
  table, metaspace = _TABLES[tokenizer]
  text = b"".join(b"\0" if i == tokenizer.eos_token_id else table[i] for i in ids).decode()
  if metaspace:
    if starts_document:
      assert text.startswith(" ")
      text = text[1:]
    text = text.replace("\0 ", "\0")
  return unicodedata.normalize("NFKC", text)


def read_between_pairs(tokenizer, ids_L, aligned_K, starts_document: bool) -> list[str]:
  """The text read between consecutive aligned positions (from the start up to the first, and so on)."""
  texts, start = [], 0
  for position in aligned_K.tolist():
    texts.append(read(tokenizer, ids_L[start:position + 1], starts_document))
    starts_document = ids_L[position] == tokenizer.eos_token_id
    start = position + 1
  return texts


# ---------------------------------------------------------------------------------------------
# Token bytes and the vocabulary mapping.

def test_token_bytes_of_byte_level_pieces(byte_bpe):
  table, vocab = token_bytes(byte_bpe), byte_bpe.get_vocab()
  assert len(table) == 400 and table[byte_bpe.eos_token_id] is None
  assert [table[vocab[p]] for p in ["Ġ", "Ċ", "ĉ", "Ã", "©", "a"]] == [b" ", b"\n", b"\t", b"\xc3", b"\xa9", b"a"]
  assert table[vocab["Ġthe"]] == b" the"
  tiny = token_bytes(tiny_byte_level())
  assert tiny[:256] == [bytes([b]) for b in range(256)] and tiny[256:] == [b"  ", b" b", None]


def test_token_bytes_of_sentencepiece_pieces(sentencepiece_bpe):
  table, vocab = token_bytes(sentencepiece_bpe), sentencepiece_bpe.get_vocab()
  assert len(table) == 608 and table[:2] == [None, None]  # <unk>, </s>
  assert [table[vocab[p]] for p in ["<0xE2>", "<0x0A>", "▁", "▁the", "a"]] == [b"\xe2", b"\n", b" ", b" the", b"a"]


def test_token_bytes_of_wordpiece_and_llama2_style_pieces():
  wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "play": 1, "##ing": 2, "##s": 3}, unk_token="[UNK]"))
  wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
  assert token_bytes(wrap(wordpiece, "[UNK]")) == [None, b"play", b"ing", b"s"]
  # Llama-2: spaces become '▁' in the normalizer and back in a Replace decoder (no Metaspace component).
  llama = Tokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "<0x20>": 3, "▁": 4, "a": 5, "▁a": 6},
                               merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
  llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  llama.add_special_tokens(["<unk>", "<s>", "</s>"])
  llama = wrap(llama, "</s>", bos_token="<s>", unk_token="<unk>")
  assert token_bytes(llama) == [None, None, None, b" ", b" ", b"a", b" a"]
  teacher_ids, student_ids = vocab_mapping(tiny_byte_level(), llama)
  # b' ' is both '<0x20>' (3) and '▁' (4): the piece the tokenizer emits wins over the byte-fallback token.
  assert dict(zip(student_ids.tolist(), teacher_ids.tolist())) == {32: 4, 97: 5, 258: 2}


def test_identical_tokenizers_map_every_id_to_itself(byte_bpe):
  copy = wrap(Tokenizer.from_str(byte_bpe.backend_tokenizer.to_str()), "<|endoftext|>")
  for other in (byte_bpe, copy):
    teacher_ids, student_ids = vocab_mapping(byte_bpe, other)
    assert teacher_ids.dtype == student_ids.dtype == np.int32
    assert teacher_ids.tolist() == student_ids.tolist() == list(range(400))  # eos (id 0) included


def test_mapping_between_different_tokenizers(byte_bpe, sentencepiece_bpe):
  teacher_ids, student_ids = vocab_mapping(byte_bpe, sentencepiece_bpe)
  assert teacher_ids.dtype == student_ids.dtype == np.int32 and teacher_ids.shape == student_ids.shape
  assert len(set(teacher_ids.tolist())) == len(set(student_ids.tolist())) == len(teacher_ids)  # one-to-one
  assert student_ids.tolist() == sorted(student_ids.tolist())
  pairs = dict(zip(student_ids.tolist(), teacher_ids.tolist()))
  student, teacher = byte_bpe.get_vocab(), sentencepiece_bpe.get_vocab()
  # Metaspace splits before every space, so no piece holds two spaces.
  hand_checked = {"Ġthe": "▁the", "Ġ": "▁", "a": "a", "Ã": "<0xC3>", "ĠĠ": None, "<|endoftext|>": "</s>"}
  for student_piece, teacher_piece in hand_checked.items():
    assert pairs.get(student[student_piece]) == (teacher[teacher_piece] if teacher_piece else None), student_piece
  student_table, teacher_table = token_bytes(byte_bpe), token_bytes(sentencepiece_bpe)
  assert all(student_table[s] == teacher_table[t] for s, t in pairs.items() if s != byte_bpe.eos_token_id)
  assert teacher["<unk>"] not in pairs.values()


def test_prefix_mapping_sends_each_teacher_token_to_the_student_token_starting_its_text():
  student, teacher = tiny_byte_level(), tiny_sentencepiece()
  mapping = prefix_mapping(student, teacher)
  s, t = student.get_vocab(), teacher.get_vocab()
  assert len(mapping) == len(t)
  hand_checked = {"▁b": "Ġb",      # the same bytes: b' b'
                  "▁a": "Ġ",       # b' a': the student has no ' a', its longest prefix is ' '
                  "\n\n": "Ċ",    # b'\n\n' -> b'\n' (the student has no merged newlines)
                  "<0xC3>": "Ã",   # a byte-fallback piece -> the student's byte token
                  "</s>": "<|endoftext|>"}
  for teacher_piece, student_piece in hand_checked.items():
    assert mapping[t[teacher_piece]] == s[student_piece], teacher_piece
  assert mapping[t["<unk>"]] == -1
  same = prefix_mapping(student, student)
  assert same.tolist() == list(range(len(s)))  # identical tokenizers: every id to itself


# ---------------------------------------------------------------------------------------------
# Boundaries and aligned positions.

def test_token_boundaries_by_hand():
  # 'é' as two byte pieces sharing its offsets: only the second completes it.
  assert token_boundaries([(0, 1), (1, 2), (1, 2), (2, 3)], 3).tolist() == [1, -1, 2, 3]
  # A zero-width token completes the boundary of the token before it again: the earlier one keeps it.
  assert token_boundaries([(0, 3), (3, 3), (3, 5)], 5).tolist() == [3, -1, 5]
  # Uncovered text (index 1, composed into the token before by a normalizer) belongs to the token before.
  assert token_boundaries([(0, 1), (2, 3)], 4).tolist() == [2, 4]
  # Overlapping tokens ('▁f' and 'in' of an NFKC-expanded 'ﬁ' at index 1): no boundary inside.
  assert token_boundaries([(0, 2), (1, 3)], 3).tolist() == [-1, 3]
  assert token_boundaries(np.zeros((0, 2)), 0).tolist() == []


def _encode(tokenizer, text):
  encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  return tokenizer.convert_ids_to_tokens(encoded["input_ids"]), encoded["offset_mapping"]


def test_whitespace_runs_align_by_hand():
  text = "a   b\n\n\tc"
  student_pieces, student_offsets = _encode(tiny_byte_level(), text)
  teacher_pieces, teacher_offsets = _encode(tiny_sentencepiece(), text)
  assert student_pieces == ["a", "ĠĠ", "Ġb", "Ċ", "Ċ", "ĉ", "c"]
  assert student_offsets == [(0, 1), (1, 3), (3, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
  assert teacher_pieces == ["▁a", "▁", "▁", "▁b", "\n\n", "<0x09>", "c"]
  assert teacher_offsets == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 7), (7, 8), (8, 9)]
  # Shared boundaries 1, 3, 5, 7, 8, 9 ('a' | '  ' | ' b' | '\n\n' | '\t' | 'c'); 2 and 6 are one-sided.
  student_K, teacher_K = align_offsets(student_offsets, teacher_offsets, len(text))
  assert list(zip(student_K.tolist(), teacher_K.tolist())) == [(0, 0), (1, 2), (2, 3), (4, 4), (5, 5), (6, 6)]


def test_multibyte_characters_and_nfkc_align_by_hand():
  text = "aé ﬁb"
  student_pieces, student_offsets = _encode(tiny_byte_level(), text)
  teacher_pieces, teacher_offsets = _encode(tiny_sentencepiece(), text)
  assert student_pieces == ["a", "Ã", "©", "Ġ", "ï", "¬", "ģ", "b"]  # 'é' is 2 bytes, 'ﬁ' 3
  assert student_offsets == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (3, 4), (3, 4), (4, 5)]
  assert teacher_pieces == ["▁a", "<0xC3>", "<0xA9>", "▁", "f", "i", "b"]  # NFKC: 'ﬁ' -> 'fi'
  assert teacher_offsets == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5)]
  student_K, teacher_K = align_offsets(student_offsets, teacher_offsets, len(text))
  assert list(zip(student_K.tolist(), teacher_K.tolist())) == [(0, 0), (2, 2), (3, 3), (6, 5), (7, 6)]


def test_combining_mark_composed_by_nfkc_aligns_after_the_mark():
  text = "e\u0301x"  # 'e' + COMBINING ACUTE ACCENT: NFKC composes 'é', whose offsets cover only the 'e'
  student_pieces, student_offsets = _encode(tiny_byte_level(), text)
  teacher_pieces, teacher_offsets = _encode(tiny_sentencepiece(), text)
  assert student_pieces == ["e", "Ì", "ģ", "x"] and teacher_pieces == ["▁", "<0xC3>", "<0xA9>", "x"]
  assert teacher_offsets == [(0, 1), (0, 1), (0, 1), (2, 3)]  # nothing covers the mark (index 1)
  student_K, teacher_K = align_offsets(student_offsets, teacher_offsets, len(text))
  assert list(zip(student_K.tolist(), teacher_K.tolist())) == [(2, 2), (3, 3)]  # not after the bare 'e'


def test_lowercase_normalizer_expanding_a_character():
  text = "İx"  # lowercases to 'i' + COMBINING DOT ABOVE, both with the offsets of 'İ'
  teacher_pieces, teacher_offsets = _encode(tiny_sentencepiece(lowercase=True), text)
  assert teacher_pieces == ["▁", "i", "<0xCC>", "<0x87>", "x"] and teacher_offsets == [(0, 1)] * 4 + [(1, 2)]
  _, student_offsets = _encode(tiny_byte_level(), text)
  student_K, teacher_K = align_offsets(student_offsets, teacher_offsets, len(text))
  assert list(zip(student_K.tolist(), teacher_K.tolist())) == [(1, 3), (2, 4)]


def test_documents_end_with_aligned_eos():
  tokens = align_documents(["a   b", "e\u0301x"], tiny_byte_level(), tiny_sentencepiece(), 258, 1)
  assert tokens.student_ids_S.tolist() == [97, 256, 257, 258, 101, 204, 129, 120, 258]
  assert tokens.teacher_ids_T.tolist() == [267, 258, 258, 268, 1, 258, 197, 171, 266, 1]
  assert tokens.student_ends_K.tolist() == [1, 2, 3, 4, 7, 8, 9]  # tokens consumed at each shared boundary
  assert tokens.teacher_ends_K.tolist() == [1, 3, 4, 5, 8, 9, 10]  # the eos pairs: (4, 5) and (9, 10)


def test_trimmed_offsets_are_undone():
  trimming = tiny_byte_level()
  trimming.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
  pieces, trimmed = _encode(trimming, "a  b")
  assert pieces == ["a", "Ġ", "Ġb"] and trimmed == [(0, 1), (2, 2), (3, 4)]  # the spaces trimmed off both
  _, untrimmed = _encode(tiny_byte_level(), "a  b")
  # Taken as they are, the teacher's 'a' would seem to have read 'a ' and pair with the student's 'Ġ'.
  assert [k.tolist() for k in align_offsets(untrimmed, trimmed, 4)] == [[1, 2], [0, 2]]
  tokens = align_documents(["a  b"], tiny_byte_level(), trimming, 258, 258)
  assert tokens.student_ends_K.tolist() == tokens.teacher_ends_K.tolist() == [1, 2, 3, 4]
  assert isinstance(trimming.backend_tokenizer.post_processor, processors.ByteLevel)  # the caller's is untouched


@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("direction", ["byte_student", "sentencepiece_student"])
def test_aligned_prefixes_hold_the_same_text(text, direction, byte_bpe, sentencepiece_bpe):
  student, teacher = (byte_bpe, sentencepiece_bpe) if direction == "byte_student" else (sentencepiece_bpe, byte_bpe)
  # Round trip through the offsets: the spans between aligned boundaries tile the text.
  student_ids = student(text, add_special_tokens=False, return_offsets_mapping=True)
  teacher_ids = teacher(text, add_special_tokens=False, return_offsets_mapping=True)
  student_K, teacher_K = align_offsets(student_ids["offset_mapping"], teacher_ids["offset_mapping"], len(text))
  student_at = token_boundaries(student_ids["offset_mapping"], len(text))[student_K]
  teacher_at = token_boundaries(teacher_ids["offset_mapping"], len(text))[teacher_K]
  assert student_at.tolist() == teacher_at.tolist() and student_at[-1] == len(text)
  assert "".join(text[a:b] for a, b in zip([0] + student_at[:-1].tolist(), student_at.tolist())) == text
  # Through the tokens' own bytes: after every aligned pair both sides have read the same text.
  tokens = align_documents([text], student, teacher, student.eos_token_id, teacher.eos_token_id)
  assert len(tokens.student_ends_K) == len(student_K) + 1  # and the eos pair
  starts_document = not unicodedata.normalize("NFKC", text).startswith(" ")
  for student_end, teacher_end in zip(tokens.student_ends_K, tokens.teacher_ends_K):
    assert (read(student, tokens.student_ids_S[:student_end], starts_document)
            == read(teacher, tokens.teacher_ids_T[:teacher_end], starts_document))


# ---------------------------------------------------------------------------------------------
# Cutting an aligned stream into rows.

def test_pack_aligned_by_hand():
  tokens = align_documents(["a   b", "e\u0301x"], tiny_byte_level(), tiny_sentencepiece(), 258, 1)
  rows = pack_aligned(tokens, seq_len=4, teacher_seq_len=4, pad_id=258, teacher_pad_id=1, keep_remainder=True)
  assert list(rows) == list(ALIGNED_KEYS) and all(a.dtype == np.int32 for a in rows.values())
  # Row 0 ends at boundary 3 (student 'a' 'ĠĠ' 'Ġb'): the eos after it fits the student but not the teacher.
  assert rows["student_input_ids"].tolist() == [[97, 256, 257, 258], [258, 101, 204, 129], [120, 258, 258, 258]]
  assert rows["student_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
  assert rows["teacher_input_ids"].tolist() == [[267, 258, 258, 268], [1, 258, 197, 171], [266, 1, 1, 1]]
  assert rows["teacher_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
  assert rows["align_student"].tolist() == [[0, 1, 2, 0], [0, 3, 0, 0], [0, 1, 0, 0]]
  assert rows["align_teacher"].tolist() == [[0, 2, 3, 0], [0, 3, 0, 0], [0, 1, 0, 0]]
  assert rows["align_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
  dropped = pack_aligned(tokens, 4, 4, 258, 1, keep_remainder=False)  # the final row holds 2 < 4 tokens
  assert {k: v.tolist() for k, v in dropped.items()} == {k: v[:2].tolist() for k, v in rows.items()}


def test_a_stretch_too_long_for_a_row_is_skipped():
  tokens = AlignedTokens(np.arange(8, dtype=np.int32), np.arange(100, 104, dtype=np.int32),
                         np.array([5, 6, 8]), np.array([1, 2, 4]))
  rows = pack_aligned(tokens, seq_len=4, teacher_seq_len=4, pad_id=-1, teacher_pad_id=-2, keep_remainder=True)
  assert rows["student_input_ids"].tolist() == [[5, 6, 7, -1]]  # the first 5 student tokens fit no row
  assert rows["teacher_input_ids"].tolist() == [[101, 102, 103, -2]]
  assert rows["align_student"].tolist() == rows["align_teacher"].tolist() == [[0, 2, 0, 0]]


# ---------------------------------------------------------------------------------------------
# The pipeline with a teacher tokenizer.

def write_jsonl(path, texts):
  with open(path, "w") as f:
    f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
  return str(path)


def tricky_documents(n):
  """Documents without leading whitespace (so a metaspace tokenizer always prepends its space)."""
  return [f"{i}: " + TRICKY_TEXTS[i % len(TRICKY_TEXTS)] + " end" * (i % 4) for i in range(n)]


def check_rows(rows, student, teacher, seq_len, teacher_seq_len, num_rows=None):
  """Shapes, masks and padding; both sequences of a row start and end at a shared boundary; every aligned
  pair has read the same text. Rows must be consecutive in the stream (packing order)."""
  assert {k: (v.shape[1], v.dtype) for k, v in rows.items()} == {
      k: (teacher_seq_len if k.startswith("teacher_") else seq_len, np.int32) for k in ALIGNED_KEYS}
  starts_document = True
  for r in range(len(rows["student_input_ids"]) if num_rows is None else num_rows):
    row = {k: v[r] for k, v in rows.items()}
    lengths = {side: int(row[f"{side}_attention_mask"].sum()) for side in ("student", "teacher")}
    num_pairs = int(row["align_mask"].sum())
    for side, tok in (("student", student), ("teacher", teacher)):
      pad_id = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
      assert row[f"{side}_attention_mask"].tolist() == [1] * lengths[side] + [0] * (len(row[f"{side}_input_ids"])
                                                                                 - lengths[side])
      assert (row[f"{side}_input_ids"][lengths[side]:] == pad_id).all()
      positions = row[f"align_{side}"][:num_pairs]
      assert (np.diff(positions) > 0).all() and positions[-1] == lengths[side] - 1  # ends at a shared boundary
      assert not row[f"align_{side}"][num_pairs:].any()
    assert row["align_mask"].tolist() == [1] * num_pairs + [0] * (seq_len - num_pairs)
    # Both read the same text up to the first pair, and from each pair to the next: the same prefixes.
    student_texts = read_between_pairs(student, row["student_input_ids"], row["align_student"][:num_pairs],
                                       starts_document)
    teacher_texts = read_between_pairs(teacher, row["teacher_input_ids"], row["align_teacher"][:num_pairs],
                                       starts_document)
    assert student_texts == teacher_texts
    starts_document = row["student_input_ids"][lengths["student"] - 1] == student.eos_token_id


def test_pipeline_rows_with_two_tokenizers(tmp_path, byte_bpe, sentencepiece_bpe):
  texts = tricky_documents(60)
  cfg = DataConfig(source=write_jsonl(tmp_path / "docs.jsonl", texts), seq_len=24, teacher_seq_len=20,
                   batch_size=3, eval_fraction=0.2)
  data = DataPipeline(cfg, byte_bpe, seed=0, teacher_tokenizer=sentencepiece_bpe)
  check_rows(data.train_rows, byte_bpe, sentencepiece_bpe, 24, 20)
  for step in (0, 7):
    batch = data.train_batch(step)
    assert list(batch) == list(ALIGNED_KEYS)
    assert {k: v.shape for k, v in batch.items()} == {k: (3, 20 if k.startswith("teacher_") else 24)
                                                      for k in ALIGNED_KEYS}
  eval_batches = list(data.eval_batches())
  assert all(b["student_input_ids"].shape == (3, 24) and b["teacher_input_ids"].shape == (3, 20) for b in eval_batches)
  eval_rows = {k: np.concatenate([b[k] for b in eval_batches]) for k in ALIGNED_KEYS}
  check_rows(eval_rows, byte_bpe, sentencepiece_bpe, 24, 20, num_rows=data.num_eval_sequences)
  assert not eval_rows["student_attention_mask"][data.num_eval_sequences:].any()  # padding rows
  assert not eval_rows["align_mask"][data.num_eval_sequences:].any()
  # Eval keeps every token: the rows' real tokens are exactly both tokenizations of the eval documents.
  eval_texts = [texts[i] for i in split_documents(60, 0.2, seed=0)[1]]
  for side, tok in (("student", byte_bpe), ("teacher", sentencepiece_bpe)):
    real = eval_rows[f"{side}_input_ids"][eval_rows[f"{side}_attention_mask"] == 1]
    assert real.tolist() == tokenize_documents(eval_texts, tok, tok.eos_token_id).tolist()
  assert data.eval_tokens == int(eval_rows["student_attention_mask"].sum())


def test_identical_tokenizers_align_every_position(tmp_path, byte_bpe):
  cfg = DataConfig(source=write_jsonl(tmp_path / "docs.jsonl", tricky_documents(40)), seq_len=16, batch_size=2)
  single = DataPipeline(cfg, byte_bpe, seed=3)
  twin = wrap(Tokenizer.from_str(byte_bpe.backend_tokenizer.to_str()), "<|endoftext|>")
  for teacher in (byte_bpe, twin):
    data = DataPipeline(cfg, byte_bpe, seed=3, teacher_tokenizer=teacher)
    assert np.array_equal(data.train_sequences, single.train_sequences)  # same rows, all full
    for batch in (data.train_batch(0), data.train_batch(5), next(data.eval_batches())):
      for side in ("input_ids", "attention_mask"):
        assert np.array_equal(batch[f"teacher_{side}"], batch[f"student_{side}"])
      real_BxL = batch["student_attention_mask"]
      assert np.array_equal(batch["align_mask"], real_BxL)
      assert np.array_equal(batch["align_student"], np.arange(16) * real_BxL)
      assert np.array_equal(batch["align_teacher"], batch["align_student"])
    assert data.alignment_rate == data.teacher_tokens_per_student_token == 1.0


def test_same_seed_same_batches_and_cache_reuse(tmp_path, byte_bpe, sentencepiece_bpe):
  cfg = DataConfig(source=write_jsonl(tmp_path / "docs.jsonl", tricky_documents(40)), seq_len=16, batch_size=2)
  cache = str(tmp_path / "cache")
  student, teacher = CountingTokenizer(byte_bpe), CountingTokenizer(sentencepiece_bpe)
  built = DataPipeline(cfg, student, seed=1, cache_dir=cache, teacher_tokenizer=teacher)
  assert (student.calls, teacher.calls) == (2, 2)  # one batched call per split and tokenizer
  (entry,) = os.listdir(cache)
  assert sorted(os.listdir(os.path.join(cache, entry))) == sorted(
      ["meta.json"] + [f"{split}_{key}.npy" for split in ("train", "eval") for key in ALIGNED_KEYS])
  student, teacher = CountingTokenizer(byte_bpe), CountingTokenizer(sentencepiece_bpe)
  cached = DataPipeline(cfg, student, seed=1, cache_dir=cache, teacher_tokenizer=teacher)
  fresh = DataPipeline(cfg, byte_bpe, seed=1, teacher_tokenizer=sentencepiece_bpe)
  assert (student.calls, teacher.calls) == (0, 0)
  for other in (cached, fresh):
    for step in range(6):
      assert all(np.array_equal(built.train_batch(step)[k], other.train_batch(step)[k]) for k in ALIGNED_KEYS)
    for x, y in zip(built.eval_batches(), other.eval_batches(), strict=True):
      assert all(np.array_equal(x[k], y[k]) for k in ALIGNED_KEYS)
  assert built.alignment_rate == cached.alignment_rate
  reseeded = DataPipeline(cfg, byte_bpe, seed=2, teacher_tokenizer=sentencepiece_bpe)
  assert any(not np.array_equal(built.train_batch(s)["student_input_ids"], reseeded.train_batch(s)["student_input_ids"])
             for s in range(4))
  # Another teacher tokenizer, teacher length or no teacher at all: other cache entries.
  DataPipeline(cfg, byte_bpe, seed=1, cache_dir=cache, teacher_tokenizer=tiny_sentencepiece())
  DataPipeline(DataConfig(source=cfg.source, seq_len=16, teacher_seq_len=12, batch_size=2), byte_bpe, seed=1,
               cache_dir=cache, teacher_tokenizer=sentencepiece_bpe)
  DataPipeline(cfg, byte_bpe, seed=1, cache_dir=cache)
  assert len(os.listdir(cache)) == 4


def test_alignment_rate_on_the_stdlib_corpus(byte_bpe, sentencepiece_bpe):
  cfg = DataConfig(max_documents=4000, seq_len=512, batch_size=8)
  start = time.perf_counter()
  data = DataPipeline(cfg, byte_bpe, seed=0, teacher_tokenizer=sentencepiece_bpe)
  seconds = time.perf_counter() - start
  rows = data.train_rows
  assert data.alignment_rate == rows["align_mask"].sum() / rows["student_attention_mask"].sum()
  assert data.teacher_tokens_per_student_token == (rows["teacher_attention_mask"].sum()
                                                   / rows["student_attention_mask"].sum())
  assert 0.8 < data.alignment_rate < 0.95 and 0.8 < data.teacher_tokens_per_student_token < 1.0
  assert f"{data.alignment_rate:.1%} of student tokens aligned" in data.summary()
  # A row's padding is what did not fit before the next shared boundary: a few tokens, not a large share.
  assert data.train_tokens > 0.98 * data.num_train_sequences * 512
  check_rows(rows, byte_bpe, sentencepiece_bpe, 512, 512, num_rows=40)
  print(f"\nstdlib_docs, 4000 documents, byte-level BPE (400) student, SentencePiece-like BPE (608) teacher: "
        f"{data.alignment_rate:.2%} of student tokens aligned, {data.teacher_tokens_per_student_token:.3f} "
        f"teacher tokens per student token; packed in {seconds:.1f} s\n{data.summary()}")
