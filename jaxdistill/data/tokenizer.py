"""Tokenizers: any `transformers` tokenizer, a built-in byte-level one, or small BPEs trained here, offline.

`load_tokenizer` takes one of
  * `'byte'`: UTF-8 bytes as 256 tokens plus `<|endoftext|>` (`byte_tokenizer`);
  * `'bpe:N'`: a GPT-2 / SmolLM style byte-level BPE of N tokens in all (`train_byte_level_bpe`);
  * `'sp:N'`: a SentencePiece / Llama style BPE over characters with byte fallback, N tokens in all
    (`train_sentencepiece_bpe`);
  * a Hugging Face hub id or a local directory with tokenizer files;
  * a llama.cpp `.gguf` file, whose metadata holds its tokenizer (`models/gguf_io.py`).
`bpe:N` and `sp:N` are trained on the first `TRAIN_DOCUMENTS` documents of `builtin:stdlib_docs`, so two
different, realistic tokenizers (for distillation across tokenizers) need no download. Training is deterministic;
each is trained once and saved as a Hugging Face tokenizer directory under
`($XDG_CACHE_HOME or ~/.cache)/jaxdistill/tokenizers/<kind>-<N>-<hash>`, where the hash covers the corpus
fingerprint (Python's version and path) and `_TRAINED_FORMAT`, and loaded from there afterwards.
"""

import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile

from jaxdistill import workdir_lock
from jaxdistill.errors import ModelLoadError
from jaxdistill.models import gguf_io, hf_io
from jaxdistill.parallel import is_main_process
from jaxdistill.paths import is_gguf

BYTE_TOKENIZER = "byte"
END_OF_TEXT = "<|endoftext|>"
UNKNOWN, END_OF_SENTENCE = "<unk>", "</s>"  # the SentencePiece-style specials
BYTE_LEVEL, SENTENCEPIECE = "bpe", "sp"  # the kinds of trained tokenizer, as spelled in a spec
TRAIN_DOCUMENTS = 3000  # first documents of builtin:stdlib_docs: ~0.8 MB, loaded in ~3 s, trained in < 0.5 s
SENTENCEPIECE_ALPHABET = 70  # characters the SentencePiece-style BPE keeps; rarer ones fall back to bytes
MIN_VOCAB_SIZE = {BYTE_LEVEL: 256 + 1,  # the 256 byte characters and <|endoftext|>
                  SENTENCEPIECE: 2 + 256 + SENTENCEPIECE_ALPHABET}  # specials, byte pieces, characters
TOKENIZER_FORMS = (f"'{BYTE_TOKENIZER}', '{BYTE_LEVEL}:N' (a byte-level BPE, N >= {MIN_VOCAB_SIZE[BYTE_LEVEL]}), "
                   f"'{SENTENCEPIECE}:N' (a SentencePiece-style BPE, N >= {MIN_VOCAB_SIZE[SENTENCEPIECE]}), "
                   "a Hugging Face hub id or a local directory")
_TRAINED_FORMAT = 1  # bump when the training recipe changes, so cached tokenizers are not reused
_SPEC = re.compile(rf"({BYTE_LEVEL}|{SENTENCEPIECE}):([0-9]+)")


def load_tokenizer(name_or_path: str, revision: str = "main"):
  """A transformers tokenizer with a pad token set, for any of the forms in `TOKENIZER_FORMS`.

  `'byte'` is built in; `'bpe:N'` and `'sp:N'` are trained on the built-in corpus (once, then cached, see the
  module docstring); a name ending in `.gguf` is a llama.cpp file; anything else is a local directory or a hub
  id (`revision` applies to hub ids only).
  Raises `ModelLoadError` for a malformed spec or a missing or unusable tokenizer.
  """
  if name_or_path == BYTE_TOKENIZER:
    return byte_tokenizer()
  spec = _trained_spec(name_or_path)
  if spec is not None:
    return trained_tokenizer(*spec)
  tok = gguf_io.gguf_tokenizer(name_or_path) if is_gguf(name_or_path) else _hf_tokenizer(name_or_path, revision)
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def _hf_tokenizer(name_or_path: str, revision: str):
  """The tokenizer of a local checkpoint directory or a hub id."""
  from transformers import AutoTokenizer

  path = hf_io.resolve(name_or_path, revision)
  try:
    return AutoTokenizer.from_pretrained(path)
  except Exception as e:  # transformers raises OSError/ValueError/... for a directory without tokenizer files
    raise ModelLoadError(f"{path}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def is_trained_spec(name: str) -> bool:
  """Whether `name` is written as a trained tokenizer's spec ('kind:N', malformed ones included: `load_tokenizer`
  refuses those): it holds ':' (hub ids never do) and is neither an existing directory nor a .gguf file."""
  return ":" in name and not os.path.isdir(name) and not is_gguf(name)


def _trained_spec(name: str) -> tuple[str, int] | None:
  """`(kind, N)` for `'bpe:N'` or `'sp:N'`; None for a name that is not a spec (`is_trained_spec`)."""
  if not is_trained_spec(name):
    return None
  match = _SPEC.fullmatch(name)
  if match is None or int(match[2]) < MIN_VOCAB_SIZE[match[1]]:
    raise ModelLoadError(f"'{name}' is not a tokenizer: use {TOKENIZER_FORMS}")
  return match[1], int(match[2])


# ---------------------------------------------------------------------------------------------
# Built-in and trained tokenizers.

def byte_tokenizer():
  """UTF-8 bytes as 256 tokens plus `<|endoftext|>` (id 256), as a `PreTrainedTokenizerFast`.

  Built with the `tokenizers` library (a byte-level BPE with no merges), so it saves and reloads
  through `AutoTokenizer` like any hub tokenizer.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {char: i for i, char in enumerate(sorted(alphabet, key=_byte_of))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([END_OF_TEXT])
  return _byte_level_wrapper(tok)


def _byte_of(char: str) -> int:
  """The byte that GPT-2's byte-to-unicode table maps to `char` (so token id == byte value)."""
  code = ord(char)
  if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
    return code
  unprintable = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
  return unprintable[code - 256]


def _byte_level_wrapper(tok):
  """`tok` as a `PreTrainedTokenizerFast` with `<|endoftext|>` as its bos, eos and pad token."""
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                 pad_token=END_OF_TEXT, unk_token=None)


def train_byte_level_bpe(documents: list[str], vocab_size: int):
  """A GPT-2 / SmolLM style byte-level BPE of `vocab_size` tokens trained on `documents`.

  `<|endoftext|>` is id 0 (bos, eos and pad), the 256 byte characters of GPT-2's table come next and the
  merges fill the rest; GPT-2's pre-tokenizer regex splits words, with a space kept at a word's start.
  Raises `ModelLoadError` when `documents` hold too few distinct pairs for `vocab_size` tokens.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(documents, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[END_OF_TEXT],
      show_progress=False))
  return _checked_size(_byte_level_wrapper(tok), vocab_size, len(documents))


def train_sentencepiece_bpe(documents: list[str], vocab_size: int):
  """A SentencePiece / Llama style BPE of `vocab_size` tokens trained on `documents`.

  NFKC normalizer, Metaspace pre-tokenizer ('▁' for a space, one prepended to every text) and a BPE over the
  `SENTENCEPIECE_ALPHABET` most frequent characters, with byte fallback: ids 0 and 1 are `<unk>` and `</s>`
  (eos and pad), 2-257 the byte pieces `<0x00>`..`<0xFF>` that spell any other character as UTF-8 bytes, and
  the trained characters and merges fill the rest. Decoding fuses byte pieces back into characters and drops
  the prepended space (so a text's own leading space is lost, as with SentencePiece).
  Raises `ModelLoadError` when `documents` hold too few distinct pairs for `vocab_size` tokens.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  trained = Tokenizer(models.BPE())
  trained.normalizer = normalizers.NFKC()
  trained.pre_tokenizer = pre_tokenizers.Metaspace()
  alphabet = _frequent_characters(trained.normalizer, documents, SENTENCEPIECE_ALPHABET)
  trained.train_from_iterator(documents, trainers.BpeTrainer(
      vocab_size=vocab_size - 258, initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False))
  model = json.loads(trained.to_str())["model"]
  # The specials and byte pieces go first, so their ids do not depend on the corpus.
  vocab = {piece: i for i, piece in enumerate([UNKNOWN, END_OF_SENTENCE] + [f"<0x{b:02X}>" for b in range(256)])}
  for piece in model["vocab"]:
    vocab.setdefault(piece, len(vocab))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], byte_fallback=True,
                             unk_token=UNKNOWN))
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  # Metaspace before Fuse: on a fused string it would drop every '▁' of the first token (tokenizers 0.23).
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(), decoders.Fuse()])
  tok.add_special_tokens([UNKNOWN, END_OF_SENTENCE])
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_SENTENCE, pad_token=END_OF_SENTENCE,
                                    unk_token=UNKNOWN)
  return _checked_size(wrapped, vocab_size, len(documents))


def _frequent_characters(normalizer, documents: list[str], count: int) -> list[str]:
  """The `count` most frequent characters of `documents` after `normalizer` and Metaspace, ties broken by character.

  The trainer's own `limit_alphabet` breaks ties in hash-map order, which differs from run to run.
  """
  counts = collections.Counter()
  for text in documents:
    counts.update("▁" + normalizer.normalize_str(text).replace(" ", "▁"))  # Metaspace prepends one per text
  return sorted(counts, key=lambda char: (-counts[char], char))[:count]


def _checked_size(tokenizer, vocab_size: int, num_documents: int):
  """`tokenizer`, if it has exactly `vocab_size` tokens."""
  if len(tokenizer) != vocab_size:
    raise ModelLoadError(f"{num_documents} training documents give {len(tokenizer)} tokens, not {vocab_size}: "
                         "use a smaller vocabulary")
  return tokenizer


# ---------------------------------------------------------------------------------------------
# The cache of trained tokenizers.

def trained_tokenizer(kind: str, vocab_size: int):
  """The `kind` ('bpe' or 'sp') tokenizer of `vocab_size` tokens, from the cache, or trained now and cached.

  Always loaded from the saved directory, so a freshly trained and a cached one have the same definition.
  """
  from transformers import PreTrainedTokenizerFast

  directory = trained_tokenizer_dir(kind, vocab_size)
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    with _training_lock(directory):  # one run trains it; another stops at once, naming that run
      if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        _save_atomically(_train_on_builtin_corpus(kind, vocab_size), directory)
  return PreTrainedTokenizerFast.from_pretrained(directory)


def trained_tokenizer_dir(kind: str, vocab_size: int) -> str:
  """`<cache>/jaxdistill/tokenizers/<kind>-<N>-<hash of the corpus fingerprint and the training format>`."""
  from jaxdistill.data.corpus import STDLIB_DOCS, source_fingerprint

  key = {"format": _TRAINED_FORMAT, "source": STDLIB_DOCS, "content": source_fingerprint(STDLIB_DOCS),
         "documents": TRAIN_DOCUMENTS}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxdistill", "tokenizers", f"{kind}-{vocab_size}-{digest}")


@contextlib.contextmanager
def _training_lock(directory: str):
  """Holds the lock of a tokenizer being trained: `<cache>/jaxdistill/locks/tokenizers-<name>.lock`."""
  root = os.path.dirname(os.path.dirname(directory))
  try:
    with workdir_lock.hold(os.path.join(root, "locks"), "tokenizer cache",
                           name=f"tokenizers-{os.path.basename(directory)}.lock", enabled=is_main_process()):
      yield
  except workdir_lock.CannotLock:
    raise ModelLoadError(f"cannot save a trained tokenizer in {os.path.dirname(directory)}: set XDG_CACHE_HOME to a "
                         "writable directory") from None


def _train_on_builtin_corpus(kind: str, vocab_size: int):
  """Trains a `kind` tokenizer on the first `TRAIN_DOCUMENTS` documents of builtin:stdlib_docs."""
  train = {BYTE_LEVEL: train_byte_level_bpe, SENTENCEPIECE: train_sentencepiece_bpe}[kind]
  try:
    return train(_training_documents(), vocab_size)
  except ModelLoadError as e:
    raise ModelLoadError(f"'{kind}:{vocab_size}': {e}") from None


@functools.lru_cache(maxsize=1)
def _training_documents() -> list[str]:
  """The corpus of the trained tokenizers (read once per process: a student's and a teacher's share it)."""
  from jaxdistill.data import DataConfig, load_documents
  from jaxdistill.data.corpus import STDLIB_DOCS

  return load_documents(DataConfig(source=STDLIB_DOCS, max_documents=TRAIN_DOCUMENTS))


def _save_atomically(tokenizer, directory: str) -> None:
  """`save_pretrained` into a temporary sibling of `directory`, renamed into place (a concurrent writer's wins)."""
  parent = os.path.dirname(directory)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-")
  except OSError as e:
    raise ModelLoadError(f"cannot save a trained tokenizer in {parent} ({type(e).__name__}): set XDG_CACHE_HOME "
                         "to a writable directory") from None
  try:
    tokenizer.save_pretrained(staging)
    os.chmod(staging, 0o755)  # mkdtemp's 0o700 would be the only private directory in the cache
    os.rename(staging, directory)
  except OSError:
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
