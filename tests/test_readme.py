"""Every command of the README's quickstart and user guide runs, as written, in its tiny form.

The commands are read from the README's ```bash and ```python blocks between "## Quickstart" and "## Tests", and
run in order in one directory, as a user would type them after `source .venv/bin/activate` (here: this
interpreter's bin directory first on PATH). The tiny form of a command changes one thing: a config file gets its
`:smoke` form (tiny random models, the built-in corpus; `:cross` becomes `:cross_smoke`). The files the commands
name (`my_corpus.jsonl`, `models/teacher.Q8_0.gguf`) are tiny stand-ins made here. Install lines are what
`.ci/run` has already done; they are checked against the list below, not run. Commands quoted inline in the prose
are not run: the hub ones (`hf download`, `hf upload`) need a network, `pip install -e '.[cuda12]'` a GPU.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import save_torch_models
from gguf_files import VOCAB, byte_level_bpe, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_LINES = {"python3 -m venv .venv", "source .venv/bin/activate", "pip install -e .", "pip install -e '.[hf]'"}
SMOKE_FORM = {"": "smoke", "smoke": "smoke", "cross": "cross_smoke", "p100": "smoke"}
CORPUS = "my_corpus.jsonl"
LONGEST_LOG_LINE = 200
# The README's GGUF teacher, tiny: a Llama with its own byte-level BPE (so the run distils across two tokenizers).
GGUF_TEACHER = {"teacher": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=256, tie_word_embeddings=False))}


def readme_commands() -> list[tuple[str, str]]:
  """(kind, text) in README order: kind 'bash' (one command, continuations joined) or 'python' (a block)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  guide = readme.split("\n## Quickstart\n", 1)[1].split("\n## Tests\n", 1)[0]
  commands = []
  for kind, block in re.findall(r"```(bash|python)\n(.*?)```", guide, flags=re.S):
    if kind == "python":
      commands.append((kind, block))
      continue
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+", " ", line.split(" #", 1)[0]).strip()
      if line and not line.startswith("#"):
        commands.append((kind, line))
  return commands


def tiny_form(command: str) -> str:
  def smoke(match):
    arg = match.group(2) or ""
    assert arg in SMOKE_FORM, f"no tiny form for config argument {arg!r}: add it to SMOKE_FORM"
    return f"configs/{match.group(1)}.py:{SMOKE_FORM[arg]}"
  return re.sub(r"configs/(\w+)\.py(?::(\w+))?", smoke, command)


def test_the_readme_commands_are_found_and_only_known_install_lines_are_skipped():
  commands = readme_commands()
  installs = [text for kind, text in commands if kind == "bash" and not _runnable(text)]
  assert set(installs) <= INSTALL_LINES, installs
  assert installs[:3] == ["python3 -m venv .venv", "source .venv/bin/activate", "pip install -e ."]
  assert tiny_form("jaxdistill-train --config configs/cpu_demo.py --workdir runs/x") == (
      "jaxdistill-train --config configs/cpu_demo.py:smoke --workdir runs/x")
  assert tiny_form("--config configs/cpu_demo.py:cross") == "--config configs/cpu_demo.py:cross_smoke"
  assert sum(_runnable(text) for kind, text in commands if kind == "bash") >= 9


def _runnable(text: str) -> bool:
  return text not in INSTALL_LINES


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, env):
  """The directory the user types in: the repository's configs and bench, and the files the guide names."""
  cwd = tmp_path_factory.mktemp("readme_user")
  for name in ("configs", "bench"):
    os.symlink(os.path.join(ROOT, name), cwd / name)
  from jaxdistill.data.corpus import stdlib_docstrings

  with open(cwd / CORPUS, "w", encoding="utf-8") as f:
    for i, text in enumerate(stdlib_docstrings()):
      if i == 300:
        break
      f.write(json.dumps({"text": text}) + "\n")
  os.makedirs(cwd / "models")
  checkpoint, _ = save_torch_models(tmp_path_factory, GGUF_TEACHER)["teacher"]
  write_gguf(cwd / "models" / "teacher.Q8_0.gguf", checkpoint, byte_level_bpe(), "llama", tensor_type="Q8_0")
  path = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
  return cwd, {**env, "PATH": path}


def _check_log(text: str, command: str) -> None:
  """A run whose output goes to a pipe (nohup, Slurm) writes plain lines: no redraws, nothing wider than 200."""
  assert "\r" not in text, f"carriage returns in the log of {command}"
  widest = max((len(line) for line in text.splitlines()), default=0)
  assert widest <= LONGEST_LOG_LINE, f"a {widest}-character log line in {command}"


EXPECTED_OUTPUT = {  # what each command must print besides exiting with 0 (a prefix of the command decides)
    "jaxdistill-train": "[DONE]",
    "jaxdistill-generate": "--- prompt 1, sample 1",
    "jaxdistill-plot": "wrote runs/cpu_demo/curves.png",
    "python -m bench.step": "XLA peak MiB",
}


@pytest.mark.parametrize("index", range(len(readme_commands())))
def test_readme_command_runs_as_written(user_dir, index):
  cwd, env = user_dir
  kind, text = readme_commands()[index]
  if kind == "bash" and not _runnable(text):
    pytest.skip(f"install line, run by .ci/run: {text}")
  if kind == "python":
    argv = [sys.executable, "-c", text]
  else:
    argv = ["bash", "-c", tiny_form(text)]
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  shown = f"{text}\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
  assert result.returncode == 0, shown
  _check_log(result.stdout + result.stderr, text)
  expected = next((out for prefix, out in EXPECTED_OUTPUT.items() if text.startswith(prefix)), None)
  if kind == "python":
    expected = "Return the "
  assert expected is not None, f"no expected output for: {text}"
  assert expected in result.stdout, shown
