"""The package's shape: no import cycle, light modules stay light, docs/design.md's layout is the tree."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxdistill")


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, file)
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports when it is imported (module-level statements only).

  `from a import b` is an edge to `a.b` where that is a module, else to `a`. Imports inside functions run
  later, when every module is loaded, and cannot make an import cycle.
  """
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    edges = set()
    for node in tree.body:
      if isinstance(node, ast.Import):
        edges |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        edges |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle_on_hand_made_graphs():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 40 and "jaxdistill.train" in graph
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Modules that must import without jax, flax or transformers: the config-file layer, errors, locks and
# paths are read by tools and tests that never touch a device, and they load in milliseconds.
LIGHT = ("jaxdistill.errors", "jaxdistill.paths", "jaxdistill.workdir_lock")
HEAVY = ("jax", "flax", "transformers", "torch", "optax", "orbax")


def test_light_modules_do_not_import_heavy_ones():
  code = (f"import importlib, sys\nfor m in {LIGHT!r}: importlib.import_module(m)\n"
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _readme_layout() -> str:
  with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
  return section.split("```", 2)[1]


# Folders of plug-ins, one module per model family or loss component: docs/design.md names the folder, and
# their registries (tests/test_families.py, objective/registry.py) account for every module in them.
PLUGIN_FOLDERS = ("families", "components")


def test_readme_layout_names_every_module_and_folder():
  """Every module of the package, and no module that is not there, is named in docs/design.md's layout."""
  package_part = _readme_layout().split("\nconfigs/")[0]  # the jaxdistill/ entries, before configs/ and bench/
  named = set(re.findall(r"\b[a-z_0-9]+\.py\b|\b[a-z_0-9]+/(?=[\s)])", package_part))
  tree, required = set(), set()
  for folder, dirs, files in os.walk(PACKAGE):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    modules = {f for f in files if f.endswith(".py") and f != "__init__.py"}
    tree |= modules | {d + "/" for d in dirs} | ({"__init__.py"} & set(files))
    required |= {d + "/" for d in dirs} | (set() if os.path.basename(folder) in PLUGIN_FOLDERS else modules)
  missing = sorted(required - named)
  stale = sorted(n for n in named - tree if n != "jaxdistill/")
  assert not missing, f"docs/design.md layout does not name: {missing}"
  assert not stale, f"docs/design.md layout names what is not in the package: {stale}"
