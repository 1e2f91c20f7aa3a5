"""Every input a config names, checked at once before anything loads: models, tokenizers, data, records.

`check_inputs(cfg)` looks at where each name points, without loading it:
  * a local path (anything that exists, or a name that can only be a path: `paths.looks_like_local_path`,
    `*.gguf`): it must exist, and it is never looked up on the hub;
  * a hub id: it must be in the local cache (models and tokenizers: the snapshot `hf_io.resolve` reads;
    datasets: the `datasets` cache), or the hub must answer so that it can be downloaded.
Whether the hub answers is asked once per process (`hub_unreachable`: one request to $HF_ENDPOINT, at most
`PROBE_SECONDS`), only when some input is a hub id and HF_HUB_OFFLINE is not set. A hub that does not answer
makes the rest of the process offline (`use_offline_mode`): the libraries then read their caches at once
instead of retrying for half a minute. All that is missing is raised together, as one `MissingInputsError`
with a line per input: the config field, its value and what to do.
"""

import dataclasses
import functools
import os
import ssl
import sys
import threading
import urllib.error
import urllib.request

from jaxdistill.data import corpus
from jaxdistill.data.tokenizer import BYTE_TOKENIZER, is_trained_spec
from jaxdistill.errors import MissingInputsError, ModelLoadError
from jaxdistill.models import hf_io
from jaxdistill.paths import exists_locally, is_gguf, looks_like_local_path, missing_local_path
from jaxdistill.training.metrics import log

MODEL, TOKENIZER, DATA = "model", "tokenizer", "data"  # the kinds of input
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 4.0  # the longest the hub may take to answer before it counts as unreachable
_HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_DATASETS_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE",) + _HUB_OFFLINE_VARIABLES
_TRUE = ("1", "ON", "YES", "TRUE")


@dataclasses.dataclass(frozen=True)
class Input:
  """One name a config gives to something outside it."""
  field: str          # the config field that names it, e.g. 'student.name_or_path'
  name: str           # its value: a local path or a hub id
  kind: str           # MODEL, TOKENIZER or DATA
  revision: str = "main"  # hub ids of models and tokenizers
  subset: str = ""        # hub datasets

  @property
  def is_local(self) -> bool:
    """Whether it names a local path: something exists there, or the name can only be a path."""
    if self.kind == DATA:
      return corpus.source_kind(self.name) != corpus.HUB
    return exists_locally(self.name) or looks_like_local_path(self.name)


def config_inputs(cfg) -> list[Input]:
  """The local paths and hub ids `cfg` (a `config.Config`) reads, in the order of its fields.

  Random architectures, built-in and trained tokenizers ('byte', 'bpe:N', 'sp:N') and the built-in corpus
  need nothing outside the config. The eval split is cut from `data.source`: there is no other data source.
  """
  inputs = []
  if cfg.student.name_or_path:
    inputs.append(Input("student.name_or_path", cfg.student.name_or_path, MODEL, cfg.student.revision))
  if cfg.mode == "distill" and cfg.teacher.name_or_path:
    inputs.append(Input("teacher.name_or_path", cfg.teacher.name_or_path, MODEL, cfg.teacher.revision))
  for field, name, revision in (("tokenizer", cfg.tokenizer, cfg.student.revision),
                                ("teacher_tokenizer", cfg.teacher_tokenizer, cfg.teacher.revision)):
    if name and not _builtin_tokenizer(name):
      inputs.append(Input(field, name, TOKENIZER, revision))
  if not cfg.data.source.startswith("builtin:"):
    inputs.append(Input("data.source", cfg.data.source, DATA, subset=cfg.data.subset))
  return inputs


def _builtin_tokenizer(name: str) -> bool:
  """'byte', or a trained 'kind:N' spec (`tokenizer.load_tokenizer` reports a malformed one)."""
  return name == BYTE_TOKENIZER or is_trained_spec(name)


def check_inputs(cfg) -> None:
  """Raises `MissingInputsError` listing every input of `cfg` that is not there (see the module docstring).

  Reads the file system and the caches and, when some input is a hub id and HF_HUB_OFFLINE is not set,
  asks the hub once whether it answers; loads nothing. An unreachable hub leaves the process offline.
  """
  inputs = config_inputs(cfg)
  offline = {item: _offline_setting(item) for item in inputs if not item.is_local}  # before any switch below
  unreachable = None
  if not all(offline.values()):
    endpoint = hub_endpoint()
    why = hub_unreachable(endpoint)
    if why is not None:
      use_offline_mode()
      unreachable = f"unreachable ({endpoint}: {why})"
  problems = []
  for item in inputs:
    if item in offline:
      reason = f"offline ({offline[item]})" if offline[item] else unreachable
      problem = None if reason is None or _cached(item) else _hub_problem(item, reason)
    else:
      problem = _local_problem(item)
    if problem is not None:
      problems.append(problem)
  records = cfg.offline_teacher.dir if cfg.offline_teacher.top_k else ""
  if records and exists_locally(records) and not os.path.isdir(os.path.expanduser(records)):
    problems.append(f"offline_teacher.dir: '{records}' is a file, not a directory; set offline_teacher.dir to a "
                    "directory (created when missing) or '' for WORKDIR/offline_teacher")
  if problems:
    raise MissingInputsError(problems)
  if unreachable is not None:
    log(f"[INPUTS] the Hugging Face hub is {unreachable}: models, tokenizers and datasets come from the local "
        "cache only (as with HF_HUB_OFFLINE=1)")


def _local_problem(item: Input) -> str | None:
  """What is wrong with a local path, or None."""
  path = os.path.expanduser(item.name)
  if not os.path.exists(path):
    if item.kind == DATA:
      return f"{item.field}: no such file or directory '{item.name}'; {_local_fix(item)}"
    return f"{item.field}: {missing_local_path(item.name)}; {_local_fix(item)}"
  if item.kind != DATA and not os.path.isdir(path) and not is_gguf(item.name):
    return f"{item.field}: '{item.name}' is a file, not a directory; {_local_fix(item)}"
  return None


def _local_fix(item: Input) -> str:
  """What to set a local path's field to."""
  if item.kind == DATA:
    return f"set {item.field} to an existing {', '.join(corpus.LOCAL_EXTENSIONS)} file or a directory of them"
  gguf = "an existing .gguf file or " if is_gguf(item.name) else ""
  if item.kind == TOKENIZER:
    return (f"set {item.field} to {gguf or 'an existing '}directory with tokenizer files, or to '{BYTE_TOKENIZER}', "
            "'bpe:N' or 'sp:N'")
  return f"set {item.field} to {gguf or 'an existing '}checkpoint directory"


def _cached(item: Input) -> bool:
  """Whether a hub id is in the local cache the libraries read offline."""
  if item.kind == DATA:
    return corpus.cached_hub_dataset(item.name, item.subset) is not None
  try:
    hf_io.resolve(item.name, item.revision, local_files_only=True)
  except ModelLoadError:
    return False
  return True


def _hub_problem(item: Input, reason: str) -> str:
  """The line for a hub id that is not in the cache while the hub is offline or unreachable (`reason`)."""
  if item.kind == DATA:
    subset = f" (subset '{item.subset}')" if item.subset else ""
    return (f"{item.field}: '{item.name}'{subset} is not a local file or directory, and not in the datasets "
            f"cache ({_shown(corpus.datasets_cache_dir())}) while the hub is {reason}; put the text in local "
            f"{', '.join(corpus.LOCAL_EXTENSIONS)} files and set {item.field} to the file or directory")
  from huggingface_hub import constants

  revision = "" if item.revision == "main" else f" --revision {item.revision}"
  return (f"{item.field}: '{item.name}' is not a local directory, and not in the Hugging Face cache "
          f"({_shown(constants.HF_HUB_CACHE)}) while the hub is {reason}; on a connected machine run "
          f"`hf download {item.name}{revision} --local-dir DIR`, copy DIR here and set {item.field}=DIR")


def _shown(path: str) -> str:
  """`path` with the home directory written '~'."""
  home = os.path.expanduser("~")
  return "~" + path[len(home):] if home != "/" and (path == home or path.startswith(home + os.sep)) else path


# ---------------------------------------------------------------------------------------------
# Offline or online.

def _offline_setting(item: Input) -> str | None:
  """The environment variable that makes the libraries reading `item` offline, as 'NAME=value', or None."""
  variables = _DATASETS_OFFLINE_VARIABLES if item.kind == DATA else _HUB_OFFLINE_VARIABLES
  for variable in variables:
    value = os.environ.get(variable, "")
    if value.upper() in _TRUE:
      return f"{variable}={value}"
  return None


def hub_endpoint() -> str:
  """The hub the libraries talk to: $HF_ENDPOINT (a mirror), else huggingface.co."""
  return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@functools.lru_cache(maxsize=None)
def hub_unreachable(endpoint: str) -> str | None:
  """Why `endpoint` does not answer within `PROBE_SECONDS`, or None when it answers (any HTTP status, or TLS).

  One HEAD request through urllib (which honours the https_proxy variables), in a thread given up after
  `PROBE_SECONDS`: a name lookup has no timeout of its own. Asked once per endpoint and process.
  """
  silence = f"no answer within {PROBE_SECONDS:g} s"
  answer = []

  def probe():
    try:
      urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:  # an error status is an answer
      pass
    except urllib.error.URLError as e:
      if not isinstance(e.reason, ssl.SSLError):  # a TLS error: something spoke, the hub library decides
        answer.append(silence if isinstance(e.reason, TimeoutError) else str(e.reason))
    except TimeoutError:
      answer.append(silence)
    except Exception as e:  # a malformed endpoint, a connection reset
      answer.append(f"{type(e).__name__}: {e}")
    answer.append(None)  # only the first entry counts

  thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
  thread.start()
  thread.join(PROBE_SECONDS)
  return answer[0] if answer else silence


def use_offline_mode() -> None:
  """Makes huggingface_hub, transformers and datasets read their caches only, for the rest of the process.

  They read HF_HUB_OFFLINE when imported: the variables cover the libraries imported later (and child
  processes), and the values already read are set too.
  """
  os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
  from huggingface_hub import constants

  constants.HF_HUB_OFFLINE = True  # transformers asks huggingface_hub.is_offline_mode(), which reads it
  datasets_config = sys.modules.get("datasets.config")
  if datasets_config is not None:
    datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
