"""The package layout: which package may import which, and no import cycles.

Read from the source with `ast` (imports inside functions count too), so a
lazy import cannot hide a cycle.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_embed")

# Unit (a package, or a top-level module) -> units it may import.
ALLOWED = {
    "storage": set(),
    "validation": set(),
    "moe": set(),
    "partitioning": set(),
    "tokenizers": {"storage"},
    "cli": {"storage"},
    "model": {"moe", "validation"},
    "io": {"model", "tokenizers", "storage"},
    "evaluation": {"moe", "storage", "validation"},
    "data": {"tokenizers", "evaluation", "storage", "validation"},
    "inference": {"model", "moe", "io", "partitioning", "tokenizers", "storage", "validation"},
    "train": {"model", "moe", "io", "data", "evaluation", "inference", "partitioning",
              "tokenizers", "storage", "validation"},
}


def _unit(path: str) -> str:
  rel = os.path.relpath(path, ROOT)
  return rel.split(os.sep)[0].removesuffix(".py")


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_embed"):
      parts = node.module.split(".")
      if len(parts) > 1:
        out.add(parts[1])
      else:
        out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("moe_embed."):
          out.add(alias.name.split(".")[1])
  return out


def _modules():
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def _module_graph():
  """Module name -> moe_embed modules it imports (for cycle detection)."""
  graph = {}
  for path in _modules():
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    rel = rel.removesuffix(".__init__")
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_embed"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if os.path.exists(os.path.join(
              os.path.dirname(ROOT), *full.split(".")) + ".py") else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith("moe_embed"))
    graph[rel] = deps - {rel}
  return graph


@pytest.mark.parametrize("path", sorted(_modules()), ids=lambda p: os.path.relpath(p, ROOT))
def test_each_module_imports_only_what_its_package_may(path):
  unit = _unit(path)
  if unit == "__init__":
    return
  bad = _imports(path) - ALLOWED[unit] - {unit}
  assert not bad, f"{os.path.relpath(path, ROOT)} ({unit}) imports {sorted(bad)}"


def test_no_module_import_cycle():
  graph = _module_graph()
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for dep in graph.get(node, ()):
      if state.get(dep) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
      if dep not in state:
        visit(dep, stack + [node])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [])


def test_importing_the_trainer_loads_no_tensorflow_datasets():
  """TFDS loads when a dataset is written or opened (`data.builder`), not on import."""
  code = ("import sys, moe_embed.train.trainer, moe_embed.data; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow_datasets'))")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(ROOT), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  assert out.stdout.strip() == "[]", out.stdout[:500]


def _is_test_module(module: str) -> bool:
  """tests.test_x, tests.conftest, or a bare test_x."""
  parts = module.split(".")
  if parts[0] == "tests" and len(parts) > 1:
    return parts[1].startswith("test_") or parts[1] == "conftest"
  return len(parts) == 1 and parts[0].startswith("test_")


def test_no_test_module_imports_another():
  """Shared fixtures live in conftest.py, shared helpers in plain modules beside the tests."""
  tests = os.path.dirname(os.path.abspath(__file__))
  bad = []
  for name in sorted(os.listdir(tests)):
    if not name.endswith(".py"):
      continue
    for node in ast.walk(ast.parse(open(os.path.join(tests, name)).read())):
      if isinstance(node, ast.ImportFrom) and node.module:
        modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      else:
        continue
      bad += [f"{name} imports {m}" for m in modules if _is_test_module(m)]
  assert not bad, bad
