"""The built-in byte-level tokenizer."""

import pytest
from transformers import AutoTokenizer

from jaxdistill.errors import ModelLoadError
from jaxdistill.tokenizer import byte_tokenizer, load_tokenizer


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
