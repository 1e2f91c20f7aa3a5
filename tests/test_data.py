"""The input pipeline: loading documents, the document-level split, packing, batching and the cache.

Token ids come from the byte tokenizer: id = UTF-8 byte, eos = pad = 256.
"""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CountingTokenizer
from jaxdistill.data import DataConfig, DataError, DataPipeline, load_documents, pack_sequences, split_documents
from jaxdistill.data.corpus import read_documents
from jaxdistill.data.pipeline import tokenize_documents
from jaxdistill.data.tokenizer import byte_tokenizer
from jaxdistill.errors import ConfigError

EOS = 256


@pytest.fixture(scope="module")
def tok():
  return byte_tokenizer()


def write_jsonl(path, texts, field="text"):
  with open(path, "w") as f:
    for text in texts:
      f.write(json.dumps({field: text, "id": len(text)}) + "\n")
  return str(path)


def config(source, **kwargs):
  return DataConfig(source=str(source), **kwargs)


def numbered_docs(n):
  """n distinct documents of 7 bytes each: with eos, exactly one 8-token sequence per document."""
  return [f"doc{i:03d}." for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Packing and splitting by hand.

def test_tokenize_appends_eos_after_every_document(tok):
  tokens_T = tokenize_documents(["ab", "cde"], tok, EOS)
  assert tokens_T.dtype == np.int32
  assert tokens_T.tolist() == [97, 98, 256, 99, 100, 101, 256]


def test_pack_drops_or_pads_the_remainder():
  tokens_T = np.array([97, 98, 256, 99, 100, 101, 256])
  ids_NxL, mask_NxL = pack_sequences(tokens_T, 3, pad_id=0, keep_remainder=False)
  assert ids_NxL.tolist() == [[97, 98, 256], [99, 100, 101]]  # the final [256] is dropped
  assert mask_NxL.tolist() == [[1, 1, 1], [1, 1, 1]]
  ids_NxL, mask_NxL = pack_sequences(tokens_T, 3, pad_id=0, keep_remainder=True)
  assert ids_NxL.tolist() == [[97, 98, 256], [99, 100, 101], [256, 0, 0]]
  assert mask_NxL.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
  assert ids_NxL.dtype == mask_NxL.dtype == np.int32
  ids_NxL, mask_NxL = pack_sequences(tokens_T[:6], 3, pad_id=0, keep_remainder=True)
  assert ids_NxL.shape == (2, 3) and mask_NxL.sum() == 6  # nothing left over: no padded row


def test_split_sizes_and_rounding():
  train, held_out = split_documents(20, 0.05, seed=0)
  assert (len(train), len(held_out)) == (19, 1)
  train, held_out = split_documents(30, 0.1, seed=0)  # 0.1 * 30 = 3.0000000000000004 in floats
  assert (len(train), len(held_out)) == (27, 3)
  train, held_out = split_documents(10, 0.01, seed=0)  # ceil(0.1) = 1: at least one eval document
  assert (len(train), len(held_out)) == (9, 1)
  assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(10))
  assert not np.array_equal(split_documents(10, 0.3, 1)[1], split_documents(10, 0.3, 2)[1])
  assert np.array_equal(split_documents(10, 0.3, 1)[1], split_documents(10, 0.3, 1)[1])


def test_pipeline_packs_train_and_eval_by_hand(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", ["ab", "cde", "fghi"])
  # Seed 0 permutes 3 documents to [2, 0, 1]; ceil(0.3 * 3) = 1 eval document: "fghi".
  train, held_out = split_documents(3, 0.3, seed=0)
  assert train.tolist() == [0, 1] and held_out.tolist() == [2]
  data = DataPipeline(config(source, seq_len=3, batch_size=2, eval_fraction=0.3), tok, seed=0)
  # train: "ab" eos "cde" eos = [97, 98, 256, 99, 100, 101, 256] -> two rows, the final eos dropped.
  assert data.train_sequences.tolist() == [[97, 98, 256], [99, 100, 101]]
  assert (data.num_documents, data.num_train_sequences, data.train_tokens, data.batches_per_epoch) == (3, 2, 6, 1)
  batch = data.train_batch(0)
  assert sorted(batch["student_input_ids"].tolist()) == [[97, 98, 256], [99, 100, 101]]
  assert batch["student_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
  # eval: "fghi" eos = [102, 103, 104, 105, 256] -> [102, 103, 104], [105, 256, pad], pad = 256 under mask 0.
  (only,) = list(data.eval_batches())
  assert only["student_input_ids"].tolist() == [[102, 103, 104], [105, 256, 256]]
  assert only["student_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
  assert (data.num_eval_sequences, data.eval_tokens) == (2, 5)


def test_batches_are_int32_and_the_teacher_shares_the_student_arrays(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(12))
  data = DataPipeline(config(source, seq_len=8, batch_size=2, eval_fraction=0.2), tok, seed=0)
  for batch in [data.train_batch(3), next(data.eval_batches())]:
    assert sorted(batch) == ["student_attention_mask", "student_input_ids", "teacher_attention_mask",
                             "teacher_input_ids"]
    assert all(a.dtype == np.int32 and a.shape == (2, 8) for a in batch.values())
    assert batch["teacher_input_ids"] is batch["student_input_ids"]
    assert batch["teacher_attention_mask"] is batch["student_attention_mask"]


# ---------------------------------------------------------------------------------------------
# Order: determinism, epochs, resumption.

def test_same_seed_same_batches_other_seed_other_batches(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(24))
  cfg = config(source, seq_len=8, batch_size=3, eval_fraction=0.25)
  a, b, c = (DataPipeline(cfg, tok, seed=s) for s in (7, 7, 8))
  for step in range(20):
    assert np.array_equal(a.train_batch(step)["student_input_ids"], b.train_batch(step)["student_input_ids"])
  assert np.array_equal(a.train_batch(5)["student_input_ids"], a.train_batch(5)["student_input_ids"])  # reread
  assert any(not np.array_equal(a.train_batch(s)["student_input_ids"], c.train_batch(s)["student_input_ids"])
             for s in range(6))


def test_each_epoch_is_a_new_permutation_of_the_train_sequences(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(24))
  # 24 documents, 6 held out: 18 one-document sequences of 8 tokens, 6 batches of 3 per epoch.
  data = DataPipeline(config(source, seq_len=8, batch_size=3, eval_fraction=0.25), tok, seed=3)
  assert (data.num_train_sequences, data.batches_per_epoch) == (18, 6)
  train_rows = sorted(map(tuple, data.train_sequences.tolist()))
  epochs = []
  for epoch in range(3):
    steps = range(epoch * 6, (epoch + 1) * 6)
    assert [data.position(s) for s in steps] == [{"epoch": epoch, "batch_in_epoch": i} for i in range(6)]
    rows = [tuple(r) for s in steps for r in data.train_batch(s)["student_input_ids"].tolist()]
    assert sorted(rows) == train_rows  # every train sequence exactly once
    epochs.append(rows)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
  assert data.position(1_000_001) == {"epoch": 166_666, "batch_in_epoch": 5}
  assert data.train_batch(1_000_001)["student_input_ids"].shape == (3, 8)
  with pytest.raises(ValueError, match="micro_step must be >= 0"):
    data.train_batch(-1)


def test_an_epoch_with_a_leftover_never_repeats_a_sequence(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(20))
  # 20 documents, 2 held out: 18 sequences, 4 batches of 4 per epoch, 2 sequences left over.
  data = DataPipeline(config(source, seq_len=8, batch_size=4, eval_fraction=0.1), tok, seed=0)
  assert (data.num_train_sequences, data.batches_per_epoch) == (18, 4)
  for epoch in range(2):
    batches = [data.train_batch(s)["student_input_ids"] for s in range(epoch * 4, epoch * 4 + 4)]
    rows = [tuple(r) for batch in batches for r in batch.tolist()]
    assert len(set(rows)) == 16 and set(rows) <= set(map(tuple, data.train_sequences.tolist()))


# ---------------------------------------------------------------------------------------------
# Train/eval split and eval batches.

def _documents_in(ids_NxL, mask_NxL):
  """The texts between eos tokens of the masked token stream."""
  tokens = bytes(int(t) if t != EOS else 0 for t in ids_NxL[mask_NxL == 1])
  return [d.decode() for d in tokens.split(b"\0")]


def test_no_document_is_in_both_train_and_eval(tmp_path, tok):
  texts = [f"document number {i} " + "x" * (i % 7) for i in range(40)]
  source = write_jsonl(tmp_path / "docs.jsonl", texts)
  data = DataPipeline(config(source, seq_len=16, batch_size=2, eval_fraction=0.1), tok, seed=5)
  eval_ids, eval_mask = zip(*[(b["student_input_ids"], b["student_attention_mask"]) for b in data.eval_batches()])
  eval_docs = _documents_in(np.concatenate(eval_ids), np.concatenate(eval_mask))
  assert eval_docs[-1] == ""  # the stream ends with eos
  eval_docs = eval_docs[:-1]
  train_docs = _documents_in(data.train_sequences, np.ones_like(data.train_sequences))
  complete_train, cut = train_docs[:-1], train_docs[-1]  # the last one may be cut by the dropped remainder
  train_idx, eval_idx = split_documents(40, 0.1, seed=5)
  assert len(eval_docs) == 4  # ceil(0.1 * 40)
  assert sorted(eval_docs) == sorted(texts[i] for i in eval_idx)
  train_texts = [texts[i] for i in train_idx]  # packed in the split's order
  assert complete_train == train_texts[:-1] and train_texts[-1].startswith(cut) and cut != train_texts[-1]
  assert not set(eval_docs) & set(complete_train)


def test_eval_batches_have_a_fixed_shape_and_masked_padding(tmp_path, tok):
  texts = ["abcdefghij" * (1 + i % 3) for i in range(30)]
  source = write_jsonl(tmp_path / "docs.jsonl", texts)
  cfg = config(source, seq_len=8, batch_size=4, eval_fraction=0.2)
  data = DataPipeline(cfg, tok, seed=1)
  eval_texts = [texts[i] for i in split_documents(30, 0.2, seed=1)[1]]
  expected_tokens = sum(len(t) + 1 for t in eval_texts)  # bytes + eos of the 6 eval documents
  assert data.eval_tokens == expected_tokens
  assert data.num_eval_sequences == -(-expected_tokens // 8)
  batches = list(data.eval_batches())
  assert len(batches) == data.num_eval_batches == -(-data.num_eval_sequences // 4)
  assert all(b["student_input_ids"].shape == b["student_attention_mask"].shape == (4, 8) for b in batches)
  assert sum(int(b["student_attention_mask"].sum()) for b in batches) == expected_tokens
  ids = np.concatenate([b["student_input_ids"] for b in batches])
  mask = np.concatenate([b["student_attention_mask"] for b in batches])
  num_pad_rows = 4 * len(batches) - data.num_eval_sequences
  assert num_pad_rows > 0 and not mask[-num_pad_rows:].any() and (ids[-num_pad_rows:] == EOS).all()
  assert (ids[mask == 0] == EOS).all()  # padding uses the pad id (eos for the byte tokenizer)
  assert [list(b) for b in data.eval_batches()] == [list(b) for b in batches]  # same order every time
  limited = DataPipeline(config(source, seq_len=8, batch_size=4, eval_fraction=0.2, max_eval_batches=1), tok, seed=1)
  assert len(list(limited.eval_batches())) == limited.num_eval_batches == 1


# ---------------------------------------------------------------------------------------------
# Sources.

def test_txt_paragraphs_are_documents(tmp_path):
  (tmp_path / "a.txt").write_text("first line\n  indented second\n\n\n   \nnext paragraph\n\nlast\n")
  assert load_documents(config(tmp_path / "a.txt")) == ["first line\n  indented second", "next paragraph", "last"]


def test_jsonl_json_and_parquet_files(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ["one", "", "two"], field="body")
  assert load_documents(config(tmp_path / "a.jsonl", text_field="body")) == ["one", "two"]  # blank dropped
  (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}, {"text": None}, {"text": "four"}]))
  assert load_documents(config(tmp_path / "b.json")) == ["three", "four"]
  pq.write_table(pa.table({"content": ["five", "six", "seven"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
  assert load_documents(config(tmp_path / "c.parquet", text_field="content")) == ["five", "six", "seven"]
  assert load_documents(config(tmp_path / "c.parquet", text_field="content", max_documents=2)) == ["five", "six"]


def test_directory_reads_supported_files_in_path_order(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("bee\n\nbee two")
  (tmp_path / "a.txt").write_text("ay")
  write_jsonl(tmp_path / "sub" / "c.jsonl", ["sea"])
  (tmp_path / "README.md").write_text("not data")
  (tmp_path / ".hidden.txt").write_text("hidden")
  assert load_documents(config(tmp_path)) == ["ay", "bee", "bee two", "sea"]
  assert load_documents(config(tmp_path, max_documents=3)) == ["ay", "bee", "bee two"]


def test_stdlib_corpus_loads_offline_and_deterministically():
  documents = load_documents(DataConfig(source="builtin:stdlib_docs"))
  assert len(documents) > 1000 and sum(map(len, documents)) > 500_000
  assert all(len(d) >= 40 and d == d.strip() for d in documents)
  assert len(set(documents)) == len(documents)  # repeats are dropped
  assert load_documents(DataConfig(max_documents=200)) == documents[:200]  # a second call, same order


# ---------------------------------------------------------------------------------------------
# Errors: one line each, naming what to fix.

def _message(error_type, cfg, tok=None, **kwargs):
  with pytest.raises(error_type) as info:
    if tok is None:
      load_documents(cfg)
    else:
      DataPipeline(cfg, tok, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_missing_file(tmp_path):
  missing = tmp_path / "nope.jsonl"
  assert _message(DataError, config(missing)) == f"data.source: no such file or directory '{missing}'"


def test_unsupported_extension(tmp_path):
  (tmp_path / "table.csv").write_text("text\nhello\n")
  message = _message(ConfigError, config(tmp_path / "table.csv"))
  assert message.startswith(f"config field 'data.source' = '{tmp_path / 'table.csv'}' is not allowed: "
                            "a file ending in .txt, .jsonl, .json, .parquet")
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "table.csv").write_text("text\nhello\n")
  assert _message(DataError, config(tmp_path / "d")) == (
      f"data.source: directory '{tmp_path / 'd'}' has no .txt, .jsonl, .json, .parquet files")
  assert "a built-in corpus (builtin:stdlib_docs)" in _message(ConfigError, DataConfig(source="builtin:nope"))


def test_missing_text_field_names_the_fields_that_exist(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", ["one"], field="body")
  assert _message(DataError, config(tmp_path / "a.jsonl")) == (
      f"{tmp_path / 'a.jsonl'}:1: no field 'text' (data.text_field); the record has fields 'body', 'id'")
  pq.write_table(pa.table({"content": ["x"], "n": [1]}), tmp_path / "c.parquet")
  assert _message(DataError, config(tmp_path / "c.parquet")) == (
      f"{tmp_path / 'c.parquet'}: no column 'text' (data.text_field); the file has columns 'content', 'n'")


def test_bad_json_line(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  assert _message(DataError, config(tmp_path / "a.jsonl")).startswith(f"{tmp_path / 'a.jsonl'}:2: not valid JSON")


def test_empty_corpus(tmp_path):
  (tmp_path / "blank.txt").write_text("\n  \n\n\t\n")
  assert _message(DataError, config(tmp_path / "blank.txt")) == (
      f"data.source: '{tmp_path / 'blank.txt'}' holds no documents (every text is empty or whitespace)")


def test_too_few_documents_to_split(tmp_path, tok):
  (tmp_path / "one.txt").write_text("a single paragraph")
  assert _message(DataError, config(tmp_path / "one.txt"), tok, seed=0) == (
      "data.source: 1 document(s) cannot be split into train and eval (data.eval_fraction=0.05 holds out 1); "
      "add documents")


def test_too_small_for_one_batch(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(10))  # 9 train documents: 9 sequences of 8
  assert _message(DataError, config(source, seq_len=8, batch_size=10), tok, seed=0) == (
      "the train split packs into 9 sequence(s) of data.seq_len=8 tokens, fewer than one batch "
      "(data.batch_size=10); add documents or lower data.batch_size or data.seq_len")


def test_unreachable_hub_dataset_says_how_to_use_local_files():
  message = _message(DataError, DataConfig(source="someone/no-such-dataset"))  # conftest sets HF_HUB_OFFLINE=1
  assert message.startswith("data.source: could not load Hugging Face dataset 'someone/no-such-dataset' "
                            "split 'train' (")
  assert message.endswith("put the text in local .txt, .jsonl, .json, .parquet files and set data.source "
                          "to the file or directory")


def test_hub_dataset_column_and_missing_column(monkeypatch):
  import datasets

  calls = []

  def fake_load_dataset(name, subset, split):
    calls.append((name, subset, split))
    return datasets.Dataset.from_dict({"content": ["one", " ", "two", "three"], "n": [1, 2, 3, 4]})

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  cfg = DataConfig(source="someone/corpus", subset="en", split="validation", text_field="content", max_documents=2)
  assert load_documents(cfg) == ["one", "two"]  # the blank text is dropped before counting
  assert calls == [("someone/corpus", "en", "validation")]
  assert _message(DataError, DataConfig(source="someone/corpus")) == (
      "data.text_field: dataset 'someone/corpus' split 'train' has no column 'text'; its columns are 'content', 'n'")


@pytest.mark.parametrize("field, value, allowed", [
    ("seq_len", 1, "an integer >= 2"), ("batch_size", 0, "an integer >= 1"),
    ("eval_fraction", 1.0, "a number strictly between 0 and 1"),
    ("eval_fraction", "0.1", "a number strictly between 0 and 1"),
    ("max_documents", -1, "an integer >= 0"), ("max_eval_batches", 1.5, "an integer >= 0"),
    ("teacher_seq_len", 1, "0 (same as data.seq_len) or an integer >= 2"),
    ("teacher_seq_len", True, "0 (same as data.seq_len) or an integer >= 2"),
    ("encoding", "no-such-codec", "a text encoding Python knows, e.g. 'utf-8', 'latin-1', 'cp1252', 'utf-16'"),
    ("encoding", "base64", "a text encoding Python knows, e.g. 'utf-8', 'latin-1', 'cp1252', 'utf-16'"),
    ("encoding", 8, "a string"),
    ("encoding_errors", "ignore",
     "strict (an undecodable byte stops the run) or replace (it becomes U+FFFD, counted)"),
    ("source", "", "builtin:stdlib_docs, a .txt, .jsonl, .json, .parquet file or a directory of them, "
                   "or a Hugging Face dataset id")])
def test_config_values_out_of_range(field, value, allowed):
  with pytest.raises(ConfigError) as info:
    DataConfig(**{field: value})
  assert str(info.value) == f"config field 'data.{field}' = {value!r} is not allowed: {allowed}"


def test_teacher_seq_len_defaults_to_seq_len():
  assert DataConfig(seq_len=8).teacher_len == 8
  assert DataConfig(seq_len=8, teacher_seq_len=5).teacher_len == 5


# ---------------------------------------------------------------------------------------------
# Encodings: undecodable bytes stop the run (strict) or are counted (replace); binary files are refused.

FIX = "set data.encoding to the file's encoding (e.g. 'latin-1') or data.encoding_errors='replace'"
LATIN1_TXT = "first paragraph\n\ncafé au lait\n".encode("latin-1")  # é = 0xe9 at offset 16 + 1 + 3 = 20, line 3
LATIN1_JSONL = '{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1")  # line 1 is 15 bytes: é at 15 + 13 = 28


def test_strict_names_the_file_line_offset_byte_and_fix(tmp_path, tok):
  (tmp_path / "a.txt").write_bytes(LATIN1_TXT)
  (tmp_path / "b.jsonl").write_bytes(LATIN1_JSONL)
  (tmp_path / "c.json").write_bytes(b'[{"text": "ok"},\n {"text": "\xe2\x82"}]')  # a truncated 3-byte sequence
  assert _message(DataError, config(tmp_path / "a.txt")) == (
      f"{tmp_path / 'a.txt'}:3: byte 0xe9 at offset 20 cannot be decoded as utf-8 (invalid continuation byte); "
      + FIX)
  assert _message(DataError, config(tmp_path / "b.jsonl")) == (
      f"{tmp_path / 'b.jsonl'}:2: byte 0xe9 at offset 28 cannot be decoded as utf-8 (invalid continuation byte); "
      + FIX)
  assert _message(DataError, config(tmp_path / "c.json")) == (
      f"{tmp_path / 'c.json'}:2: bytes 0xe2 0x82 at offset 28 cannot be decoded as utf-8 "
      f"(invalid continuation byte); {FIX}")
  assert _message(DataError, config(tmp_path / "a.txt"), tok, seed=0).startswith(f"{tmp_path / 'a.txt'}:3: byte 0xe9")


def test_the_right_encoding_decodes_the_same_files(tmp_path):
  (tmp_path / "a.txt").write_bytes(LATIN1_TXT)
  (tmp_path / "b.jsonl").write_bytes(LATIN1_JSONL)
  assert load_documents(config(tmp_path / "a.txt", encoding="latin-1")) == ["first paragraph", "café au lait"]
  assert load_documents(config(tmp_path / "b.jsonl", encoding="latin-1")) == ["ok", "café"]
  (tmp_path / "c.txt").write_bytes("naïve\r\n\r\nœuvre".encode("cp1252"))  # Windows line ends, as before
  assert load_documents(config(tmp_path / "c.txt", encoding="cp1252")) == ["naïve", "œuvre"]


def test_utf16_text_reads_with_its_encoding_and_looks_binary_without(tmp_path):
  (tmp_path / "a.txt").write_bytes("héllo\n\nwörld\n".encode("utf-16"))  # BOM, then NUL high bytes
  (tmp_path / "b.jsonl").write_bytes('{"text": "ünï"}\n\n{"text": "cödé"}\n'.encode("utf-16"))
  assert load_documents(config(tmp_path / "a.txt", encoding="utf-16")) == ["héllo", "wörld"]
  assert load_documents(config(tmp_path / "b.jsonl", encoding="utf-16")) == ["ünï", "cödé"]
  assert _message(DataError, config(tmp_path / "a.txt")) == (  # b'\xff\xfeh\x00': the first NUL at offset 3
      f"{tmp_path / 'a.txt'}: a NUL byte at offset 3: looks like a binary file; data.source takes text files "
      "(for UTF-16 or UTF-32 text set data.encoding)")


def test_replace_counts_the_undecodable_sequences(tmp_path, caplog):
  (tmp_path / "a.txt").write_bytes(b"caf\xe9 na\xefve\n\nok\n")  # 2 undecodable bytes
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "x\xe2\x82y"}\n')  # 1 sequence of 2 bytes
  documents, stats = read_documents(config(tmp_path / "a.txt", encoding_errors="replace"))
  assert documents == ["caf\ufffd na\ufffdve", "ok"]
  assert (stats.replaced, stats.files) == (2, [str(tmp_path / "a.txt")])
  caplog.clear()
  documents, stats = read_documents(config(tmp_path, encoding_errors="replace"))
  assert documents == ["caf\ufffd na\ufffdve", "ok", "ok", "x\ufffdy"]
  assert (stats.replaced, stats.files) == (3, [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
  assert stats.describe() == ("3 undecodable byte sequences in 2 files replaced by U+FFFD "
                              "(data.encoding_errors='replace')")
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert warning == (f"data.source: {stats.describe()}: {tmp_path / 'a.txt'}, {tmp_path / 'b.jsonl'}; "
                     "set data.encoding to their encoding to read them exactly")
  documents, stats = read_documents(config(tmp_path / "b.jsonl", encoding_errors="replace", encoding="latin-1"))
  assert documents == ["ok", "x\xe2\x82y"] and stats.replaced == 0  # latin-1 decodes every byte
  assert stats.describe() == ""


def test_binary_files_are_refused_even_under_replace(tmp_path):
  (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a.jsonl").write_bytes(b'{"text": "ok"}\n\0\0\n')  # the NUL counts from the file's start
  for errors in ("strict", "replace"):
    assert _message(DataError, config(tmp_path / "image.txt", encoding_errors=errors)) == (
        f"{tmp_path / 'image.txt'}: a NUL byte at offset 8: looks like a binary file; data.source takes text "
        "files (for UTF-16 or UTF-32 text set data.encoding)")
  assert _message(DataError, config(tmp_path / "d")).startswith(
      f"{tmp_path / 'd' / 'a.jsonl'}: a NUL byte at offset 15: looks like a binary file")


def test_pipeline_reports_replaced_bytes_built_and_cached(tmp_path, tok, caplog):
  source = tmp_path / "docs.jsonl"
  write_jsonl(source, numbered_docs(19))
  with open(source, "ab") as f:
    f.write(b'{"text": "\xff\xfe-\xe9"}\n')  # 0xff, 0xfe, 0xe9: 3 sequences
  cfg, cache = config(source, seq_len=8, batch_size=2, encoding_errors="replace"), str(tmp_path / "cache")
  expected = "; 3 undecodable byte sequences in 1 file replaced by U+FFFD (data.encoding_errors='replace')"
  caplog.clear()
  built = DataPipeline(cfg, CountingTokenizer(tok), seed=0, cache_dir=cache)  # the cache key names its type
  assert built.summary().endswith(expected) and built.decoding.files == [str(source)]
  assert sum("undecodable" in r.getMessage() for r in caplog.records) == 1
  caplog.clear()
  counting = CountingTokenizer(tok)
  cached = DataPipeline(cfg, counting, seed=0, cache_dir=cache)
  assert counting.calls == 0 and cached.summary() == built.summary()
  assert (cached.decoding.replaced, cached.decoding.files) == (3, [str(source)])
  assert not [r for r in caplog.records if "undecodable" in r.getMessage()]  # warned when built, not again
  clean = DataPipeline(config(write_jsonl(tmp_path / "clean.jsonl", numbered_docs(20)), seq_len=8, batch_size=2),
                       tok, seed=0)
  assert "undecodable" not in clean.summary() and clean.decoding.replaced == 0


# ---------------------------------------------------------------------------------------------
# Cache.

def _same_data(a, b):
  assert np.array_equal(a.train_sequences, b.train_sequences)
  for step in range(4):
    assert np.array_equal(a.train_batch(step)["student_input_ids"], b.train_batch(step)["student_input_ids"])
  for x, y in zip(a.eval_batches(), b.eval_batches(), strict=True):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  counts = lambda p: (p.num_documents, p.eval_tokens, p.num_eval_sequences)  # noqa: E731
  assert counts(a) == counts(b)


def test_cache_is_reused_and_a_truncated_file_is_rebuilt(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", [f"text {i} " * (i % 5 + 1) for i in range(30)])
  cfg, cache = config(source, seq_len=8, batch_size=2, eval_fraction=0.2), str(tmp_path / "cache")
  counting = CountingTokenizer(tok)
  built = DataPipeline(cfg, counting, seed=0, cache_dir=cache)
  assert counting.calls == 2  # one call for the train documents, one for the eval documents
  (entry,) = os.listdir(cache)
  assert sorted(os.listdir(os.path.join(cache, entry))) == ["eval_ids_MxL.npy", "eval_mask_MxL.npy", "meta.json",
                                                            "train_ids_NxL.npy"]

  counting = CountingTokenizer(tok)
  cached = DataPipeline(cfg, counting, seed=0, cache_dir=cache)
  assert counting.calls == 0
  _same_data(built, cached)

  train_file = os.path.join(cache, entry, "train_ids_NxL.npy")
  with open(train_file, "r+b") as f:
    f.truncate(os.path.getsize(train_file) - 10)
  counting = CountingTokenizer(tok)
  rebuilt = DataPipeline(cfg, counting, seed=0, cache_dir=cache)
  assert counting.calls == 2
  _same_data(built, rebuilt)
  counting = CountingTokenizer(tok)
  DataPipeline(cfg, counting, seed=0, cache_dir=cache)  # the rebuilt files are good again
  assert counting.calls == 0


def test_cache_key_follows_seed_settings_and_file_content(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(20))
  cfg, cache = config(source, seq_len=8, batch_size=2), str(tmp_path / "cache")
  DataPipeline(cfg, tok, seed=0, cache_dir=cache)
  for other_cfg, seed in [(cfg, 1), (config(source, seq_len=4, batch_size=2), 0)]:
    counting = CountingTokenizer(tok)
    DataPipeline(other_cfg, counting, seed=seed, cache_dir=cache)
    assert counting.calls == 2
  write_jsonl(tmp_path / "docs.jsonl", numbered_docs(21))  # an edited source file is not served stale
  counting = CountingTokenizer(tok)
  assert DataPipeline(cfg, counting, seed=0, cache_dir=cache).num_documents == 21
  assert counting.calls == 2
  assert len(os.listdir(cache)) == 4


def test_cache_key_follows_the_encoding_fields(tmp_path, tok):
  source = write_jsonl(tmp_path / "docs.jsonl", numbered_docs(20))
  cache = str(tmp_path / "cache")
  DataPipeline(config(source, seq_len=8, batch_size=2), CountingTokenizer(tok), seed=0, cache_dir=cache)
  for encoding, errors, rebuilt in [("latin-1", "strict", True), ("latin1", "strict", False),  # one codec, two names
                                    ("utf-8", "replace", True), ("UTF8", "strict", False)]:
    counting = CountingTokenizer(tok)
    DataPipeline(config(source, seq_len=8, batch_size=2, encoding=encoding, encoding_errors=errors), counting,
                 seed=0, cache_dir=cache)
    assert counting.calls == (2 if rebuilt else 0), (encoding, errors)
  assert len(os.listdir(cache)) == 3


def test_tokenizing_into_a_log_file_writes_one_line_and_no_carriage_return(capsys):
  """Tokenizing progress: a bar on a terminal only; in a log file one line at the end (or nothing for few)."""
  from jaxdistill.data.pipeline import _PROGRESS_MIN_DOCUMENTS

  texts = [f"doc{i:04d}" for i in range(_PROGRESS_MIN_DOCUMENTS)]  # just enough to show progress
  tokens_T = tokenize_documents(texts, byte_tokenizer(), 256, "tokenizing train")  # stderr: not a tty
  assert len(tokens_T) == 8 * len(texts) and np.count_nonzero(tokens_T == 256) == len(texts)
  _, err = capsys.readouterr()
  assert "\r" not in err and len(err.splitlines()) == 1
  assert err.startswith("tokenizing train: 1,000 documents in ") and err.endswith(" s\n")
  tokenize_documents(texts[:-1], byte_tokenizer(), 256)  # fewer: nothing at all
  assert capsys.readouterr().err == ""
