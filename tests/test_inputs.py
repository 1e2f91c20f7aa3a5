"""Every missing input of a config in one error, before anything loads; hub ids from the cache when offline."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import inputs
from jaxdistill.errors import MissingInputsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: the connection is refused at once
TINY_MODEL, TINY_CORPUS = "tiny-org/tiny-student", "tiny-org/tiny-corpus"
_REVISION = "0123456789abcdef0123456789abcdef01234567"
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _config(name: str = "configs/cpu_demo.py:smoke", **overrides):
  return config_lib.parse(config_lib.load(name, overrides))


def _error(cfg) -> str:
  with pytest.raises(MissingInputsError) as error:
    inputs.check_inputs(cfg)
  return str(error.value)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
  """An empty HF_HOME for huggingface_hub (its cache paths are read at import: set them too), offline."""
  from huggingface_hub import constants

  home = tmp_path / "hf_home"
  home.mkdir()
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
  monkeypatch.setattr(constants, "HF_HOME", str(home))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return home


@pytest.fixture
def online(monkeypatch):
  """No offline variable set, as for a user who never heard of them; what `use_offline_mode` sets is undone."""
  from huggingface_hub import constants

  for variable in _OFFLINE_VARIABLES:
    monkeypatch.setenv(variable, "")  # recorded, so that a value set by the test is removed after it
    monkeypatch.delenv(variable)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  if "datasets.config" in sys.modules:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
      monkeypatch.setattr(sys.modules["datasets.config"], name, False)


def cache_tiny_model(home) -> str:
  """A tiny random Llama with the byte tokenizer, as `hf download` leaves it in HF_HOME's hub cache."""
  from jaxdistill.data.tokenizer import byte_tokenizer
  from jaxdistill.models import hf_io, transformer

  model_config = _config().student.model_config(257)
  rng = np.random.default_rng(0)  # init_params would compile for seconds; any values load the same
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), transformer.param_shapes(model_config))
  repo = os.path.join(home, "hub", "models--" + TINY_MODEL.replace("/", "--"))
  hf_io.save_pretrained(params, model_config, os.path.join(repo, "snapshots", _REVISION), tokenizer=byte_tokenizer())
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(_REVISION)
  return TINY_MODEL


def cache_tiny_corpus(home, documents: int = 40) -> str:
  """A hub dataset of `documents` texts as `datasets` leaves it prepared in HF_HOME/datasets."""
  import pyarrow as pa

  directory = os.path.join(home, "datasets", "tiny-org___tiny-corpus", "default", "0.0.0", "0123abcd")
  os.makedirs(directory)
  table = pa.table({"text": [f"document {i}: " + "words of text " * 8 for i in range(documents)]})
  with pa.OSFile(os.path.join(directory, "tiny-corpus-train.arrow"), "wb") as f, \
      pa.ipc.new_stream(f, table.schema) as writer:
    writer.write_table(table)
  with open(os.path.join(directory, "dataset_info.json"), "w") as f:
    json.dump({"config_name": "default", "dataset_name": "tiny-corpus",
               "features": {"text": {"dtype": "string", "_type": "Value"}},
               "splits": {"train": {"name": "train", "num_examples": documents, "dataset_name": "tiny-corpus"}}}, f)
  return TINY_CORPUS


def _four_missing(tmp_path):
  """A config whose student and teacher directories, teacher tokenizer (a hub id) and data file are missing."""
  return _config(**{"student.name_or_path": str(tmp_path / "student"),
                    "teacher.name_or_path": str(tmp_path / "teacher"), "teacher_tokenizer": "someone/tokenizer",
                    "data.source": str(tmp_path / "docs.jsonl"), "stages.teacher_steps": 0})


def _four_lines(tmp_path, hub: str) -> list[str]:
  local = "does not exist (a local path: hub ids are 'name' or 'owner/name')"
  return [
      "4 inputs of this config are missing (nothing was loaded):",
      f"  student.name_or_path: directory '{tmp_path}/student' {local}; set student.name_or_path to an existing "
      "checkpoint directory",
      f"  teacher.name_or_path: directory '{tmp_path}/teacher' {local}; set teacher.name_or_path to an existing "
      "checkpoint directory",
      f"  teacher_tokenizer: 'someone/tokenizer' is not a local directory, and not in the Hugging Face cache "
      f"({tmp_path}/hf_home/hub) while the hub is {hub}; on a connected machine run `hf download someone/tokenizer "
      "--local-dir DIR`, copy DIR here and set teacher_tokenizer=DIR",
      f"  data.source: no such file or directory '{tmp_path}/docs.jsonl'; set data.source to an existing .txt, "
      ".jsonl, .json, .parquet file or a directory of them",
  ]


def test_every_missing_input_is_listed_in_one_error(hf_home, tmp_path):
  """Before: the student's error alone; fixed, the next one (the hub dataset after a 31 s wait), and so on."""
  assert _error(_four_missing(tmp_path)).splitlines() == _four_lines(tmp_path, "offline (HF_HUB_OFFLINE=1)")


def test_an_unreachable_hub_is_found_at_once_and_the_run_goes_offline(hf_home, online, tmp_path, monkeypatch):
  from huggingface_hub import constants

  monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
  start = time.perf_counter()
  message = _error(_four_missing(tmp_path))
  assert time.perf_counter() - start < 10
  assert message.splitlines() == _four_lines(tmp_path, f"unreachable ({CLOSED_PORT}: [Errno 111] Connection refused)")
  assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_a_silent_hub_is_given_up_after_the_probe_time(hf_home, online, tmp_path, monkeypatch):
  """A hub that accepts the connection and never answers (a dead proxy, a black-holed route): bounded."""
  monkeypatch.setattr(inputs, "PROBE_SECONDS", 1.0)
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel completes the handshake; nobody ever reads or writes
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.perf_counter()
    message = _error(_config(**{"tokenizer": "someone/tokenizer"}))
    assert time.perf_counter() - start < 3
  assert message == (f"tokenizer: 'someone/tokenizer' is not a local directory, and not in the Hugging Face cache "
                     f"({hf_home}/hub) while the hub is unreachable ({endpoint}: no answer within 1 s); on a connected "
                     "machine run `hf download someone/tokenizer --local-dir DIR`, copy DIR here and set tokenizer=DIR")


def test_a_cached_hub_model_passes_and_loads_offline(hf_home):
  from jaxdistill.training import build

  cfg = _config(**{"student.name_or_path": cache_tiny_model(hf_home), "tokenizer": "", "stages.teacher_steps": 0})
  inputs.check_inputs(cfg)  # nothing missing: no error
  tokenizer = build.build_tokenizer(cfg)
  student = build.build_model(cfg.student, len(tokenizer), jax.random.key(0), "student")
  assert len(tokenizer) == 257 and student.config.vocab_size == 257 and student.config.hidden_size == 32
  assert student.path == f"{hf_home}/hub/models--tiny-org--tiny-student/snapshots/{_REVISION}"


@pytest.mark.parametrize("name, problem", [
    ("./no/such/dir", "directory './no/such/dir' does not exist (a local path: hub ids are 'name' or 'owner/name')"),
    ("/no/such/dir", "directory '/no/such/dir' does not exist (a local path: hub ids are 'name' or 'owner/name')"),
    ("~/no/such/dir", "directory '~/no/such/dir' does not exist (a local path: hub ids are 'name' or 'owner/name')"),
    ("runs/a/student_hf", "directory 'runs/a/student_hf' does not exist (a local path: hub ids are 'name' or "
                          "'owner/name')"),
    ("qwen3-moe-1b.gguf", "file 'qwen3-moe-1b.gguf' does not exist (a .gguf name is a local file)"),
], ids=["relative", "absolute", "home", "nested", "gguf"])
def test_local_paths_are_never_looked_up_on_the_hub(online, tmp_path, monkeypatch, name, problem):
  import huggingface_hub

  def on_the_hub(*args, **kwargs):
    raise AssertionError(f"looked up on the hub: {args} {kwargs}")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", on_the_hub)
  monkeypatch.setattr(inputs, "hub_unreachable", on_the_hub)
  monkeypatch.setattr(inputs.corpus, "cached_hub_dataset", on_the_hub)
  (tmp_path / "student").mkdir()  # an existing local directory passes as it is
  (tmp_path / "docs.txt").write_text("some text\n")
  cfg = _config(**{"student.name_or_path": str(tmp_path / "student"), "teacher.name_or_path": name,
                   "tokenizer": str(tmp_path / "student"), "data.source": str(tmp_path / "docs.txt"),
                   "stages.teacher_steps": 0})
  fix = "an existing .gguf file or checkpoint directory" if name.endswith(".gguf") else \
      "an existing checkpoint directory"
  assert _error(cfg) == f"teacher.name_or_path: {problem}; set teacher.name_or_path to {fix}"


def test_gguf_names_are_local_files(online, tmp_path, monkeypatch):
  monkeypatch.setattr(inputs, "hub_unreachable", lambda endpoint: pytest.fail("the hub was asked"))
  (tmp_path / "student.gguf").write_bytes(b"GGUF")  # exists: what it holds is the loader's to judge
  cfg = _config(**{"student.name_or_path": str(tmp_path / "student.gguf"), "tokenizer": "",
                   "teacher_tokenizer": "run:1/teacher.gguf"})  # a ':' but a file name, not a 'bpe:N' spec
  assert _error(cfg) == ("teacher_tokenizer: file 'run:1/teacher.gguf' does not exist (a .gguf name is a local file); "
                         "set teacher_tokenizer to an existing .gguf file or directory with tokenizer files, or to "
                         "'byte', 'bpe:N' or 'sp:N'")


def test_configs_without_outside_inputs_check_nothing(monkeypatch):
  """Random architectures, built-in and trained tokenizers, the built-in corpus: no file, no cache, no hub."""
  monkeypatch.setattr(inputs, "hub_unreachable", lambda endpoint: pytest.fail("the hub was asked"))
  for name in ("configs/cpu_demo.py:smoke", "configs/p100.py:smoke", "configs/cpu_demo.py:cross_smoke"):
    cfg = _config(name)
    assert inputs.config_inputs(cfg) == []
    inputs.check_inputs(cfg)


def test_a_records_directory_that_is_a_file(tmp_path):
  (tmp_path / "records").write_text("")
  cfg = _config(**{"offline_teacher.top_k": 8, "curriculum.attention": (0.0, 0.0, 0.0),
                   "curriculum.feature": (0.0, 0.0, 0.0), "offline_teacher.dir": str(tmp_path / "records")})
  assert _error(cfg) == (f"offline_teacher.dir: '{tmp_path}/records' is a file, not a directory; set "
                         "offline_teacher.dir to a directory (created when missing) or '' for WORKDIR/offline_teacher")


def _p100_lines(cache: str, hub: str) -> list[str]:
  return [
      "3 inputs of this config are missing (nothing was loaded):",
      f"  student.name_or_path: 'HuggingFaceTB/SmolLM-135M' is not a local directory, and not in the Hugging Face "
      f"cache ({cache}/hub) while the hub is {hub}; on a connected machine run `hf download HuggingFaceTB/SmolLM-135M "
      "--local-dir DIR`, copy DIR here and set student.name_or_path=DIR",
      "  teacher.name_or_path: directory './checkpoints/qwen3-moe-1b' does not exist (a local path: hub ids are "
      "'name' or 'owner/name'); set teacher.name_or_path to an existing checkpoint directory",
      f"  data.source: 'HuggingFaceTB/smollm-corpus' (subset 'cosmopedia-v2') is not a local file or directory, and "
      f"not in the datasets cache ({cache}/datasets) while the hub is {hub}; put the text in local .txt, .jsonl, "
      ".json, .parquet files and set data.source to the file or directory",
  ]


def test_the_p100_config_offline_lists_student_teacher_and_data_at_once(hf_home):
  """Before: the student's error; then, past it, 31 s waiting on the hub dataset; then the teacher as a hub id."""
  cfg = _config("configs/p100.py")
  start = time.perf_counter()
  message = _error(cfg)
  assert time.perf_counter() - start < 5  # the caches only: no network
  assert message.splitlines() == _p100_lines(str(hf_home), "offline (HF_HUB_OFFLINE=1)")


def _subprocess_env(home) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _OFFLINE_VARIABLES + ("HF_HUB_CACHE", "HF_DATASETS_CACHE")}
  return {**env, "HF_HOME": str(home), "HF_ENDPOINT": CLOSED_PORT, "JAX_PLATFORMS": "cpu"}


def test_the_p100_command_without_network_prints_every_missing_input(tmp_path):
  home = tmp_path / "hf_home"
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config=configs/p100.py",
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          env=_subprocess_env(home), timeout=120)
  elapsed = time.perf_counter() - start
  assert result.returncode == 2, result.stderr[-3000:]
  lines = _p100_lines(str(home), f"unreachable ({CLOSED_PORT}: [Errno 111] Connection refused)")
  assert result.stderr.splitlines() == ["error: " + lines[0]] + lines[1:]
  assert elapsed < 60, elapsed  # start-up (imports) only


_LOAD_FROM_THE_CACHE = """
import json, time
import jax
from jaxdistill import config, inputs
from jaxdistill.data import corpus
from jaxdistill.training import build
cfg = config.parse(config.load("configs/cpu_demo.py:smoke", {
    "student.name_or_path": "%s", "tokenizer": "", "data.source": "%s", "stages.teacher_steps": 0}))
seconds = {}
start = time.perf_counter()
inputs.check_inputs(cfg)
seconds["check"] = time.perf_counter() - start
start = time.perf_counter()
documents, _ = corpus.read_documents(cfg.data)
seconds["data"] = time.perf_counter() - start
start = time.perf_counter()
tokenizer = build.build_tokenizer(cfg)
student = build.build_model(cfg.student, len(tokenizer), jax.random.key(0), "student")
seconds["models"] = time.perf_counter() - start
print(json.dumps({"documents": len(documents), "vocab": len(tokenizer), "path": student.path, "seconds": seconds}))
"""


def test_cached_hub_inputs_load_at_once_when_the_hub_is_unreachable(tmp_path):
  """Before: `datasets` retried the unreachable hub for ~26 s before it read its cache."""
  home = tmp_path / "hf_home"
  code = _LOAD_FROM_THE_CACHE % (cache_tiny_model(home), cache_tiny_corpus(home))
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=_subprocess_env(home), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0] == (f"[INPUTS] the Hugging Face hub is unreachable ({CLOSED_PORT}: [Errno 111] "
                                           "Connection refused): models, tokenizers and datasets come from the local "
                                           "cache only (as with HF_HUB_OFFLINE=1)")
  loaded = json.loads(result.stdout.splitlines()[-1])
  assert loaded["documents"] == 40 and loaded["vocab"] == 257
  assert loaded["path"] == f"{home}/hub/models--tiny-org--tiny-student/snapshots/{_REVISION}"
  assert loaded["seconds"]["check"] < 10 and loaded["seconds"]["data"] < 15, loaded["seconds"]
