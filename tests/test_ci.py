"""CI runs exactly the README's test command."""

import re


def _last_command_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip() and not line.startswith("#")][-1]


def test_ci_runs_the_readme_test_command():
  with open(".ci/run") as f:
    ci_command = _last_command_line(f.read())
  with open("README.md") as f:
    readme = f.read()
  assert "pytest" in ci_command and "pip install" in ci_command
  blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
  assert any(ci_command in block.splitlines() for block in blocks), ci_command
