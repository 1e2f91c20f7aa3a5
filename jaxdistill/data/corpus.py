"""Raw text documents of a data source: a built-in offline corpus, local files, or a hub dataset.

`data.source` is one of
  * `builtin:stdlib_docs`: the docstrings of the Python standard library's own source files, read with
    `ast` (nothing imported, nothing downloaded). One docstring (module, class or function) is one document.
  * a local `.txt`, `.jsonl`, `.json` or `.parquet` file, or a directory searched recursively for them
    (hidden entries skipped, other files ignored, files in sorted path order):
      - `.txt`: blank-line-separated paragraphs; each paragraph (one or more lines) is one document,
        so a single file still splits into train and eval. To keep a whole file as one document,
        put it in a `.jsonl` record instead.
      - `.jsonl`: one JSON object per line; `.json`: a list of objects (or JSON Lines). The document
        is the string in field `data.text_field`.
      - `.parquet`: the string column `data.text_field`.
  * anything else: a Hugging Face hub dataset id, loaded with `datasets.load_dataset(source, subset,
    split=split)` and column `data.text_field`.
Whitespace-only documents are dropped. The order is deterministic, so `max_documents` keeps a fixed prefix.

Local `.txt`, `.jsonl` and `.json` files are read as bytes and decoded with `data.encoding` by one helper,
`_decode`. A NUL byte marks a binary file (refused). With `data.encoding_errors='strict'` the first undecodable
byte stops the run, naming the file, line, offset and byte; with 'replace' it becomes U+FFFD and is counted
(`DecodeStats`). Parquet and hub datasets are decoded by their own libraries.
"""

import ast
import codecs
import dataclasses
import functools
import glob
import json
import logging
import os
import re
import sys
import sysconfig
import threading
from typing import TYPE_CHECKING, Callable, Iterator

from jaxdistill.errors import ConfigError, JaxDistillError, first_line
from jaxdistill.paths import exists_locally, looks_like_local_path

if TYPE_CHECKING:
  from jaxdistill.data.pipeline import DataConfig

STDLIB_DOCS = "builtin:stdlib_docs"
BUILTIN, LOCAL, MISSING_PATH, HUB = "builtin", "local", "missing path", "hub"  # the kinds of source (`source_kind`)
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
_FILE_SUFFIXES = LOCAL_EXTENSIONS + (".csv", ".tsv", ".arrow", ".md", ".xml", ".html", ".gz", ".bz2", ".xz",
                                     ".zst", ".zip", ".tar")  # a missing name ending so is a path, not a hub id
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self==value." boilerplate
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                               "turtledemo", "ensurepip", "__pycache__"})
SOURCES_ALLOWED = (f"{STDLIB_DOCS}, a {', '.join(LOCAL_EXTENSIONS)} file or a directory of them, "
                    "or a Hugging Face dataset id")
ENCODING_ERRORS = ("strict", "replace")
_ENCODING_FIX = "set data.encoding to the file's encoding (e.g. 'latin-1') or data.encoding_errors='replace'"


class DataError(JaxDistillError):
  """The training data could not be read, or there is too little of it."""


@dataclasses.dataclass
class DecodeStats:
  """Undecodable byte sequences replaced by U+FFFD (data.encoding_errors='replace') and the files holding them."""
  replaced: int = 0
  files: list[str] = dataclasses.field(default_factory=list)

  def add(self, path: str, replaced: int) -> None:
    """Counts `replaced` sequences of file `path`."""
    if replaced:
      self.replaced += replaced
      if path not in self.files:
        self.files.append(path)

  def describe(self) -> str:
    """'3 undecodable byte sequences in 1 file replaced by U+FFFD (...)', or '' when none were."""
    if not self.replaced:
      return ""
    return (f"{_plural(self.replaced, 'undecodable byte sequence')} in {_plural(len(self.files), 'file')} "
            "replaced by U+FFFD (data.encoding_errors='replace')")


def read_documents(cfg: "DataConfig") -> tuple[list[str], DecodeStats]:
  """The documents of `cfg.source`, in a deterministic order, the first `cfg.max_documents` if > 0, and what
  decoding them replaced (logged as a warning too)."""
  limit = cfg.max_documents if cfg.max_documents > 0 else None
  source = cfg.source
  stats = DecodeStats()
  kind = source_kind(source)
  if kind == BUILTIN:
    if source not in _BUILTIN:
      raise ConfigError("data.source", source, f"a built-in corpus ({', '.join(_BUILTIN)}) or {SOURCES_ALLOWED}")
    documents = _take(_BUILTIN[source](), limit)
  elif kind == LOCAL:
    documents = _take(_local_documents(os.path.expanduser(source), cfg, stats), limit)
  elif kind == MISSING_PATH:
    raise DataError(f"data.source: no such file or directory '{source}'")
  else:
    documents = _hub_documents(cfg, limit)
  if stats.replaced:
    shown = ", ".join(stats.files[:3]) + (f" and {len(stats.files) - 3} more" if len(stats.files) > 3 else "")
    logging.getLogger(__name__).warning("data.source: %s: %s; set data.encoding to their encoding to read them "
                                        "exactly", stats.describe(), shown)
  if not documents:
    raise DataError(f"data.source: '{source}' holds no documents (every text is empty or whitespace)")
  return documents, stats


def load_documents(cfg: "DataConfig") -> list[str]:
  """The documents of `read_documents`, without the count of replaced bytes (a replacement is still logged)."""
  return read_documents(cfg)[0]


def source_fingerprint(source: str) -> str:
  """What identifies the content behind `source` beyond its name: file sizes and times, Python's version.

  A hub dataset's content is not fingerprinted (the `datasets` cache decides which version loads).
  """
  if source == STDLIB_DOCS:
    return f"python {sys.version} at {sysconfig.get_paths()['stdlib']}"
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    return ""
  files = _local_files(path) if os.path.isdir(path) else [path]
  return json.dumps([(os.path.relpath(f, path), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files])


def _take(documents: Iterator[str], limit: int | None) -> list[str]:
  """The first `limit` (all if None) non-blank documents; stops reading early."""
  out = []
  for text in documents:
    if limit is not None and len(out) >= limit:
      break
    if text.strip():
      out.append(text)
  return out


def _plural(count: int, noun: str) -> str:
  return f"{count:,} {noun}{'' if count == 1 else 's'}"


def source_kind(source: str) -> str:
  """What `data.source` names: BUILTIN ('builtin:...'), LOCAL (something exists there), MISSING_PATH (nothing
  exists there and it is a path by its form, or a name ending like a file) or HUB (a hub dataset id)."""
  if source.startswith("builtin:"):
    return BUILTIN
  if exists_locally(source):
    return LOCAL
  if looks_like_local_path(source) or source.lower().endswith(_FILE_SUFFIXES):
    return MISSING_PATH
  return HUB


# ---------------------------------------------------------------------------------------------
# Built-in corpus.

def stdlib_docstrings() -> Iterator[str]:
  """Docstrings of the standard library's `.py` files, in sorted file order and source order within a file.

  Tests, IDLE, lib2to3, turtledemo, ensurepip and installed packages are skipped, as are files that do not
  parse, docstrings under `MIN_DOCSTRING_CHARS` characters and exact repeats of an earlier docstring.
  """
  seen = set()
  for path in _stdlib_files():
    try:
      with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError):
      continue
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, documented)), key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
      text = (ast.get_docstring(node, clean=True) or "").strip()  # clean=True: inspect.cleandoc
      if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
        seen.add(text)
        yield text


def _stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP_DIRS)
    files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
  return files


_BUILTIN: dict[str, Callable[[], Iterator[str]]] = {STDLIB_DOCS: stdlib_docstrings}


# ---------------------------------------------------------------------------------------------
# Local files.

def _local_files(directory: str) -> list[str]:
  """Supported files under `directory`, recursively, in sorted path order, hidden entries skipped."""
  files = []
  for parent, subdirs, names in os.walk(directory):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    files += [os.path.join(parent, n) for n in sorted(names)
              if not n.startswith(".") and n.lower().endswith(LOCAL_EXTENSIONS)]
  return files


def _local_documents(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[str]:
  if os.path.isdir(path):
    files = _local_files(path)
    if not files:
      raise DataError(f"data.source: directory '{path}' has no {', '.join(LOCAL_EXTENSIONS)} files")
  else:
    if not path.lower().endswith(LOCAL_EXTENSIONS):
      raise ConfigError("data.source", path, f"a file ending in {', '.join(LOCAL_EXTENSIONS)}, "
                        "a directory of them, a Hugging Face dataset id or " + STDLIB_DOCS)
    files = [path]
  readers = {".txt": _txt_documents, ".jsonl": _json_documents, ".json": _json_documents,
             ".parquet": _parquet_documents}
  for file in files:
    yield from readers[os.path.splitext(file)[1].lower()](file, cfg, stats)


def _txt_documents(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[str]:
  """Paragraphs separated by blank lines; indentation is kept. Plain text has no fields (`data.text_field` unused)."""
  text = _read_text(path, cfg, stats).replace("\r\n", "\n").replace("\r", "\n")  # as open() in text mode
  for paragraph in re.split(r"\n\s*\n", text):
    yield paragraph.lstrip("\n").rstrip()


def _json_records(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[tuple[int, object]]:
  """(line or index, record) of a JSON Lines file, or of a `.json` file holding a list."""
  if path.lower().endswith(".json"):
    text = _read_text(path, cfg, stats)
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      if "Extra data" not in str(e):  # anything but JSON Lines stored as .json
        raise DataError(f"{path}: not valid JSON ({e})") from None
      data = None
    if data is not None:
      if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of objects or one object per line, "
                        f"not a {type(data).__name__}")
      yield from enumerate(data, start=1)
      return
    lines = enumerate(text.split("\n"), start=1)
  else:
    lines = _numbered_lines(path, cfg, stats)
  for number, line in lines:
    if line.strip():
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not valid JSON ({e})") from None


def _json_documents(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[str]:
  text_field = cfg.text_field
  for number, record in _json_records(path, cfg, stats):
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: expected a JSON object with field '{text_field}', "
                      f"got a {type(record).__name__}")
    if text_field not in record:
      raise DataError(f"{path}:{number}: no field '{text_field}' (data.text_field); the record has fields "
                      f"{', '.join(map(repr, record)) or 'none'}")
    yield _text(record[text_field], f"{path}:{number}: field '{text_field}'")


def _parquet_documents(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[str]:
  """The strings of column `data.text_field`; pyarrow decodes them (`stats` unused)."""
  import pyarrow.parquet as pq  # installed with `datasets`

  text_field = cfg.text_field
  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
    raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {first_line(e)})") from None
  columns = parquet.schema_arrow.names
  if text_field not in columns:
    raise DataError(f"{path}: no column '{text_field}' (data.text_field); the file has columns "
                    f"{', '.join(map(repr, columns))}")
  for row_group in range(parquet.num_row_groups):
    for value in parquet.read_row_group(row_group, columns=[text_field]).column(0).to_pylist():
      yield _text(value, f"{path}: column '{text_field}'")


def _text(value, where: str) -> str:
  """A document's text; None counts as empty, anything else but a string is an error."""
  if value is None:
    return ""
  if not isinstance(value, str):
    raise DataError(f"{where} holds a {type(value).__name__}, not a string")
  return value


# ---------------------------------------------------------------------------------------------
# Decoding local text files.

def is_text_encoding(name: str) -> bool:
  """Whether Python has a text codec called `name` ('base64' and 'rot13' are codecs, not text encodings)."""
  try:
    codecs.lookup(name)
    "\n".encode(name)
  except (LookupError, ValueError):  # ValueError: an embedded NUL; UnicodeError: the 'undefined' codec
    return False
  return True


@functools.lru_cache(maxsize=None)
def _ascii_compatible(encoding: str) -> bool:
  """Whether every ASCII byte decodes to itself: then a NUL byte is binary and b'\\n' always ends a line."""
  ascii_bytes = bytes(range(128))
  try:
    return ascii_bytes.decode(encoding) == ascii_bytes.decode("ascii")
  except UnicodeDecodeError:  # UTF-16, UTF-32, UTF-7, ...
    return False


def _read_text(path: str, cfg: "DataConfig", stats: DecodeStats) -> str:
  """The whole of file `path`, decoded."""
  with open(path, "rb") as f:
    return _decode(f.read(), path, cfg, stats)


def _numbered_lines(path: str, cfg: "DataConfig", stats: DecodeStats) -> Iterator[tuple[int, str]]:
  """(number from 1, text) of each line of `path`, read and decoded line by line where the encoding allows."""
  with open(path, "rb") as f:
    if not _ascii_compatible(cfg.encoding):  # UTF-16/32: a line end is several bytes; decode the whole file
      yield from enumerate(_decode(f.read(), path, cfg, stats).split("\n"), start=1)
      return
    offset = 0
    for number, raw in enumerate(f, start=1):
      yield number, _decode(raw, path, cfg, stats, number, offset)
      offset += len(raw)


_replacements = threading.local()  # the count of the decode running on this thread


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
  """Python's 'replace' error handler (one U+FFFD per undecodable sequence), counting the sequences."""
  _replacements.count += 1
  return "\ufffd", error.end


codecs.register_error("jaxdistill.replace_and_count", _replace_and_count)


def _decode(raw: bytes, path: str, cfg: "DataConfig", stats: DecodeStats, line: int = 1, offset: int = 0) -> str:
  """`raw`, the bytes of file `path` from line `line` and byte `offset` on, decoded with `data.encoding`.

  A NUL byte (in an ASCII-compatible encoding) is a binary file: DataError. An undecodable byte is a DataError
  under `data.encoding_errors='strict'`, else a U+FFFD counted in `stats`.
  """
  if _ascii_compatible(cfg.encoding) and (nul := raw.find(b"\0")) >= 0:
    raise DataError(f"{path}: a NUL byte at offset {offset + nul}: looks like a binary file; data.source takes "
                    "text files (for UTF-16 or UTF-32 text set data.encoding)")
  if cfg.encoding_errors == "replace":
    _replacements.count = 0
    text = raw.decode(cfg.encoding, "jaxdistill.replace_and_count")
    stats.add(path, _replacements.count)
    return text
  try:
    return raw.decode(cfg.encoding)
  except UnicodeDecodeError as e:
    raise DataError(_undecodable(e, raw, path, cfg.encoding, line, offset)) from None


def _undecodable(error: UnicodeDecodeError, raw: bytes, path: str, encoding: str, line: int, offset: int) -> str:
  """The one-line message for the undecodable bytes `raw[error.start:error.end]`."""
  line += raw[:error.start].decode(encoding, "replace").count("\n")
  bad = raw[error.start:error.end]
  shown = " ".join(f"0x{b:02x}" for b in bad[:8]) + (" ..." if len(bad) > 8 else "")
  return (f"{path}:{line}: {'byte' if len(bad) == 1 else 'bytes'} {shown} at offset {offset + error.start} "
          f"cannot be decoded as {encoding} ({error.reason}); {_ENCODING_FIX}")


# ---------------------------------------------------------------------------------------------
# Hugging Face hub.

def datasets_cache_dir() -> str:
  """Where `datasets` keeps prepared datasets: $HF_DATASETS_CACHE, else HF_HOME/datasets (as `datasets.config`)."""
  from huggingface_hub import constants  # light; `datasets` itself takes seconds to import

  return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets"))


def cached_hub_dataset(source: str, subset: str) -> str | None:
  """The newest directory of the `datasets` cache that `load_dataset(source, subset)` reads offline, or None.

  Mirrors the cache fallback of `datasets` (`packaged_modules/cache`): `<cache>/<owner>___<name in snake
  case>/<subset, or any>/<version>/<hash>/`.
  """
  *owner, name = source.split("/")
  name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)).lower()
  root = glob.escape(os.path.join(datasets_cache_dir(), "___".join(owner + [name])))
  found = [p for p in glob.glob(os.path.join(root, glob.escape(subset) if subset else "*", "*", "*"))
           if os.path.isdir(p)]
  return max(found, key=os.path.getmtime) if found else None


def _hub_documents(cfg: "DataConfig", limit: int | None) -> list[str]:
  import datasets  # heavy import, only needed for hub datasets

  name = cfg.source
  described = f"'{name}'" + (f" subset '{cfg.subset}'" if cfg.subset else "") + f" split '{cfg.split}'"
  try:
    dataset = datasets.load_dataset(name, cfg.subset or None, split=cfg.split)
  except Exception as e:  # offline, unknown id, gated, bad subset or split: all end the same way
    raise DataError(
        f"data.source: could not load Hugging Face dataset {described} ({type(e).__name__}: {first_line(e)}); "
        f"it is not a local file or directory either. Offline (set HF_HUB_OFFLINE=1 to fail fast), put the text "
        f"in local {', '.join(LOCAL_EXTENSIONS)} files and set data.source to the file or directory") from None
  if cfg.text_field not in dataset.column_names:
    raise DataError(f"data.text_field: dataset {described} has no column '{cfg.text_field}'; its columns are "
                    f"{', '.join(map(repr, dataset.column_names))}")
  where = f"dataset {described}: column '{cfg.text_field}'"
  texts = (_text(value, where) for rows in dataset.select_columns([cfg.text_field]).iter(batch_size=1024)
           for value in rows[cfg.text_field])
  return _take(texts, limit)

