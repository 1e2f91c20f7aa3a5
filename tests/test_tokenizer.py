"""The built-in byte-level tokenizer, and the byte-level and SentencePiece-style BPEs trained offline."""

import os
import re
import unicodedata

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from jaxdistill.data import tokenizer as tokenizer_lib
from jaxdistill.data.tokenizer import (byte_tokenizer, load_tokenizer, train_byte_level_bpe, train_sentencepiece_bpe,
                                       trained_tokenizer_dir)
from jaxdistill.errors import ModelLoadError

TRICKY = "naïve — 数学 🙂\ttab\t\tand   spaces\n\n  indented ﬁ x\u00a0y"  # no leading space (see round trip)


def test_ids_are_utf8_bytes_and_round_trip():
  tok = load_tokenizer("byte")
  text = "Héllo,  wörld\n\t✓ 日本"
  ids = tok(text)["input_ids"]
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert len(tok) == 257 and tok.eos_token_id == tok.pad_token_id == 256


def test_saves_and_reloads_through_auto_tokenizer(tmp_path):
  byte_tokenizer().save_pretrained(tmp_path)
  reloaded = AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded("a b")["input_ids"] == [97, 32, 98]
  assert reloaded.eos_token == "<|endoftext|>"


def test_directory_without_tokenizer_files(tmp_path):
  with pytest.raises(ModelLoadError, match="no usable tokenizer"):
    load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Trained tokenizers.

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """An empty user cache for this module's trained tokenizers."""
  root = tmp_path_factory.mktemp("xdg_cache")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", str(root))
    yield root


@pytest.fixture(scope="module")
def trained(cache):
  """'bpe:300' and 'sp:400', trained into `cache` by `load_tokenizer`."""
  return {spec: load_tokenizer(spec) for spec in ("bpe:300", "sp:400")}


def test_byte_level_bpe_vocabulary(trained):
  tok = trained["bpe:300"]
  vocab = tok.get_vocab()
  assert len(tok) == len(vocab) == 300
  assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
  assert tok.eos_token_id == tok.pad_token_id == 0
  assert sorted(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()) == list(range(1, 257))
  assert "Ġthe" in vocab and "Ġ" in vocab  # a space kept at the start of a word, GPT-2 style


def test_sentencepiece_bpe_vocabulary(trained):
  tok = trained["sp:400"]
  vocab = tok.get_vocab()
  assert len(tok) == len(vocab) == 400
  assert (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
  assert tok.eos_token == "</s>" and tok.bos_token is None
  assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(2, 258))
  assert "▁the" in vocab and "▁" in vocab
  assert sum(len(piece) == 1 for piece in vocab) == tokenizer_lib.SENTENCEPIECE_ALPHABET  # the characters kept


def test_trained_tokenizers_round_trip_tricky_text(trained):
  byte_level, sentencepiece = trained["bpe:300"], trained["sp:400"]
  ids = byte_level(TRICKY)["input_ids"]
  assert byte_level.decode(ids) == TRICKY
  assert byte_level.convert_ids_to_tokens(ids)[:3] == ["n", "a", "Ã"]  # 'ï' as its two UTF-8 bytes
  ids = sentencepiece(TRICKY)["input_ids"]
  assert sentencepiece.decode(ids) == unicodedata.normalize("NFKC", TRICKY)  # 'ﬁ' -> 'fi', NBSP -> ' '
  pieces = sentencepiece.convert_ids_to_tokens(ids)
  assert pieces[:4] == ["▁n", "a", "<0xC3>", "<0xAF>"]  # a character outside the alphabet: byte fallback
  assert "<0xE6>" in pieces and "<0x09>" in pieces and "<unk>" not in pieces  # '数', '\t'
  # A leading space merges with the prepended metaspace and is lost, as with SentencePiece.
  assert sentencepiece.decode(sentencepiece(" x")["input_ids"]) == "x"


def test_trained_tokenizers_compress_the_corpus(trained):
  documents = tokenizer_lib._training_documents()[:300]
  chars = sum(map(len, documents))
  for spec, chars_per_token in (("bpe:300", 1.3), ("sp:400", 1.4)):
    tokens = sum(map(len, trained[spec](documents)["input_ids"]))
    assert chars / tokens > chars_per_token, spec  # the byte tokenizer has 1.0


def test_training_is_deterministic(tmp_path):
  documents = tokenizer_lib._training_documents()[:200]
  for train, size in ((train_byte_level_bpe, 300), (train_sentencepiece_bpe, 350)):
    saved = []
    for attempt in range(3):
      train(documents, size).save_pretrained(tmp_path / f"{train.__name__}{attempt}")
      saved.append((tmp_path / f"{train.__name__}{attempt}" / "tokenizer.json").read_bytes())
    assert saved[0] == saved[1] == saved[2], train.__name__


def test_cached_tokenizer_is_reused(trained, cache, monkeypatch):
  def no_training(kind, vocab_size):
    raise AssertionError(f"trained {kind}:{vocab_size} again")

  monkeypatch.setattr(tokenizer_lib, "_train_on_builtin_corpus", no_training)
  for spec, first in trained.items():
    directory = spec_dir(spec)
    assert re.fullmatch(rf"{spec.replace(':', '-')}-[0-9a-f]{{16}}", os.path.basename(directory))
    assert os.path.dirname(directory) == str(cache / "jaxdistill" / "tokenizers")
    again = load_tokenizer(spec)
    assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert (again.eos_token_id, again.pad_token_id) == (first.eos_token_id, first.pad_token_id)
  assert sorted(os.listdir(cache / "jaxdistill" / "tokenizers")) == sorted(
      os.path.basename(spec_dir(spec)) for spec in trained)  # no staging left behind
  with pytest.raises(AssertionError, match="trained bpe:301 again"):
    load_tokenizer("bpe:301")


def spec_dir(spec: str) -> str:
  kind, vocab_size = spec.split(":")
  return trained_tokenizer_dir(kind, int(vocab_size))


def test_directory_named_like_a_spec_is_a_directory(tmp_path):
  byte_tokenizer().save_pretrained(tmp_path / "bpe:300")
  assert len(load_tokenizer(str(tmp_path / "bpe:300"))) == 257


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:10", "bpe:256", "sp:300", "sp:", "xx:5", "bpe:-1", "BPE:400"])
def test_malformed_spec_names_the_allowed_forms(spec, tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  with pytest.raises(ModelLoadError) as error:
    load_tokenizer(spec)
  assert str(error.value) == (
      f"'{spec}' is not a tokenizer: use 'byte', 'bpe:N' (a byte-level BPE, N >= 257), "
      "'sp:N' (a SentencePiece-style BPE, N >= 328), a Hugging Face hub id or a local directory")
  assert not os.listdir(tmp_path)


def test_vocabulary_too_large_for_the_corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setattr(tokenizer_lib, "_training_documents", lambda: ["a tiny corpus", "a tiny vocabulary"])
  for spec in ("bpe:400", "sp:400"):
    with pytest.raises(ModelLoadError, match=rf"^'{spec}': 2 training documents give \d+ tokens, not 400: use a"):
      load_tokenizer(spec)
  assert not os.path.exists(tmp_path / "jaxdistill" / "tokenizers")  # nothing cached


def test_unwritable_cache(tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))
  monkeypatch.setattr(tokenizer_lib, "_training_documents", lambda: ["a tiny corpus"])
  with pytest.raises(ModelLoadError, match="cannot save a trained tokenizer in .*: set XDG_CACHE_HOME to a writable"):
    load_tokenizer("bpe:257")
