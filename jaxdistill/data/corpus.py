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
"""

import ast
import json
import os
import re
import sys
import sysconfig
from typing import TYPE_CHECKING, Callable, Iterator

from jaxdistill.errors import ConfigError, JaxDistillError

if TYPE_CHECKING:
  from jaxdistill.data.pipeline import DataConfig

STDLIB_DOCS = "builtin:stdlib_docs"
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
_FILE_SUFFIXES = LOCAL_EXTENSIONS + (".csv", ".tsv", ".arrow", ".md", ".xml", ".html", ".gz", ".bz2", ".xz",
                                     ".zst", ".zip", ".tar")  # a missing name ending so is a path, not a hub id
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self==value." boilerplate
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                               "turtledemo", "ensurepip", "__pycache__"})
SOURCES_ALLOWED = (f"{STDLIB_DOCS}, a {', '.join(LOCAL_EXTENSIONS)} file or a directory of them, "
                    "or a Hugging Face dataset id")


class DataError(JaxDistillError):
  """The training data could not be read, or there is too little of it."""


def load_documents(cfg: "DataConfig") -> list[str]:
  """The documents of `cfg.source`, in a deterministic order, the first `cfg.max_documents` if > 0."""
  limit = cfg.max_documents if cfg.max_documents > 0 else None
  source = cfg.source
  if source.startswith("builtin:"):
    if source not in _BUILTIN:
      raise ConfigError("data.source", source, f"a built-in corpus ({', '.join(_BUILTIN)}) or {SOURCES_ALLOWED}")
    documents = _take(_BUILTIN[source](), limit)
  elif os.path.exists(os.path.expanduser(source)):
    documents = _take(_local_documents(os.path.expanduser(source), cfg.text_field), limit)
  elif _looks_like_path(source):
    raise DataError(f"data.source: no such file or directory '{source}'")
  else:
    documents = _hub_documents(cfg, limit)
  if not documents:
    raise DataError(f"data.source: '{source}' holds no documents (every text is empty or whitespace)")
  return documents


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


def _looks_like_path(source: str) -> bool:
  """A missing local path, as opposed to a hub id ('name' or 'owner/name')."""
  return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.lower().endswith(_FILE_SUFFIXES)


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


def _local_documents(path: str, text_field: str) -> Iterator[str]:
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
    yield from readers[os.path.splitext(file)[1].lower()](file, text_field)


def _txt_documents(path: str, text_field: str) -> Iterator[str]:
  """Paragraphs separated by blank lines; indentation is kept. Plain text has no fields (`text_field` unused)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  for paragraph in re.split(r"\n\s*\n", text):
    yield paragraph.lstrip("\n").rstrip()


def _json_records(path: str) -> Iterator[tuple[int, object]]:
  """(line or index, record) of a JSON Lines file, or of a `.json` file holding a list."""
  with open(path, encoding="utf-8") as f:
    if path.lower().endswith(".json"):
      text = f.read()
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
      lines = text.splitlines()
    else:
      lines = f
    for number, line in enumerate(lines, start=1):
      if line.strip():
        try:
          yield number, json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{number}: not valid JSON ({e})") from None


def _json_documents(path: str, text_field: str) -> Iterator[str]:
  for number, record in _json_records(path):
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: expected a JSON object with field '{text_field}', "
                      f"got a {type(record).__name__}")
    if text_field not in record:
      raise DataError(f"{path}:{number}: no field '{text_field}' (data.text_field); the record has fields "
                      f"{', '.join(map(repr, record)) or 'none'}")
    yield _text(record[text_field], f"{path}:{number}: field '{text_field}'")


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
  import pyarrow.parquet as pq  # installed with `datasets`

  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
    raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {_first_line(e)})") from None
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
# Hugging Face hub.

def _hub_documents(cfg: "DataConfig", limit: int | None) -> list[str]:
  import datasets  # heavy import, only needed for hub datasets

  name = cfg.source
  described = f"'{name}'" + (f" subset '{cfg.subset}'" if cfg.subset else "") + f" split '{cfg.split}'"
  try:
    dataset = datasets.load_dataset(name, cfg.subset or None, split=cfg.split)
  except Exception as e:  # offline, unknown id, gated, bad subset or split: all end the same way
    raise DataError(
        f"data.source: could not load Hugging Face dataset {described} ({type(e).__name__}: {_first_line(e)}); "
        f"it is not a local file or directory either. Offline (set HF_HUB_OFFLINE=1 to fail fast), put the text "
        f"in local {', '.join(LOCAL_EXTENSIONS)} files and set data.source to the file or directory") from None
  if cfg.text_field not in dataset.column_names:
    raise DataError(f"data.text_field: dataset {described} has no column '{cfg.text_field}'; its columns are "
                    f"{', '.join(map(repr, dataset.column_names))}")
  where = f"dataset {described}: column '{cfg.text_field}'"
  texts = (_text(value, where) for rows in dataset.select_columns([cfg.text_field]).iter(batch_size=1024)
           for value in rows[cfg.text_field])
  return _take(texts, limit)


def _first_line(e: Exception) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else ""
