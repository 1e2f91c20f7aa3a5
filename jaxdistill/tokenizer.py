"""Tokenizers: any `transformers` tokenizer, or a built-in byte-level one that needs no download."""

from jaxdistill.errors import ModelLoadError
from jaxdistill.models import hf_io

BYTE_TOKENIZER = "byte"
END_OF_TEXT = "<|endoftext|>"


def byte_tokenizer():
  """UTF-8 bytes as 256 tokens plus `<|endoftext|>` (id 256), as a `PreTrainedTokenizerFast`.

  Built with the `tokenizers` library (a byte-level BPE with no merges), so it saves and reloads
  through `AutoTokenizer` like any hub tokenizer.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {char: i for i, char in enumerate(sorted(alphabet, key=_byte_of))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([END_OF_TEXT])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                 pad_token=END_OF_TEXT, unk_token=None)


def _byte_of(char: str) -> int:
  """The byte that GPT-2's byte-to-unicode table maps to `char` (so token id == byte value)."""
  code = ord(char)
  if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
    return code
  unprintable = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
  return unprintable[code - 256]


def load_tokenizer(name_or_path: str, revision: str = "main"):
  """`'byte'`, a hub id or a local directory -> a transformers tokenizer with a pad token set."""
  if name_or_path == BYTE_TOKENIZER:
    return byte_tokenizer()
  from transformers import AutoTokenizer

  path = hf_io.resolve(name_or_path, revision)
  try:
    tok = AutoTokenizer.from_pretrained(path)
  except Exception as e:  # transformers raises OSError/ValueError/... for a directory without tokenizer files
    raise ModelLoadError(f"{path}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok
