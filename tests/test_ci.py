"""CI runs exactly the README's test command."""

import re

import pytest


def _last_command_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip() and not line.startswith("#")][-1]


def test_ci_runs_the_readme_test_command():
  with open(".ci/run") as f:
    ci_command = _last_command_line(f.read())
  with open("README.md") as f:
    readme = f.read()
  assert "pytest" in ci_command and "pip install" in ci_command
  blocks = re.findall(r"```(?:\w+)?\n(.*?)```", readme, flags=re.S)  # every fenced block, any language
  assert any(ci_command in block.splitlines() for block in blocks), ci_command


def test_the_hf_extra_pins_the_torch_the_tests_use():
  """`pip install -e '.[hf]'` (the README's step before loading the export in transformers) brings the same
  CPU build of PyTorch that the test extra pins: an unpinned torch would pull several GB of CUDA packages."""
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  torch_pins = [pin for pin in extras["test"] if pin.startswith("torch")]
  assert extras["hf"] == torch_pins == ["torch==2.13.0"]


def test_console_scripts_name_the_module_entry_points():
  """Each console script names a top-level function of its module (read, not imported: the entry modules define
  absl flags at import, which a test process must not do twice)."""
  import ast

  tomllib = pytest.importorskip("tomllib")
  with open("pyproject.toml", "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts == {"jaxdistill-train": "jaxdistill.train:console_main",
                     "jaxdistill-generate": "jaxdistill.generate:console_main",
                     "jaxdistill-plot": "jaxdistill.plot:console_main"}
  for target in scripts.values():
    module, function = target.split(":")
    with open(module.replace(".", "/") + ".py") as f:
      tree = ast.parse(f.read())
    assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, target
