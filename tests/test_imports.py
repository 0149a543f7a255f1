"""The import graph of effattn/ (read from the source, every import statement, lazy ones too):
layers point one way (ops below mechanisms, the trainer below evaluation) and nothing imports
itself in a circle outside data/."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "effattn")
# (importer prefix, imported prefix) pairs that must never occur.
FORBIDDEN = [
    ("effattn.kernels", "effattn.attention"),  # ops sit below every mechanism
    ("effattn.train", "effattn.evaluate"),  # evaluation builds on training, not the reverse
]
# Circles allowed only among these modules (the data registry and its tasks import each other).
CIRCLES_ALLOWED_IN = "effattn.data"


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        found[_module_name(path)] = path
  return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """effattn modules `name` imports: `from a import b` names a.b when that is a module."""
  is_package = path.endswith("__init__.py")
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    else:
      continue
    out.update(t for t in targets if t in modules and t != name)
  if is_package and "pkgutil.iter_modules(__path__)" in ast.unparse(tree):
    # A package that discovers its modules (effattn.attention) imports every one of them.
    out.update(m for m in modules if m.rsplit(".", 1)[0] == name)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_the_graph_is_read():
  graph = import_graph()
  assert "effattn.attention.softmax" in graph["effattn.attention"]  # discovered mechanisms
  assert "effattn.kernels.softmax" in graph["effattn.attention.softmax"]
  assert "effattn.kernels.block_sparse.api" in graph["effattn.kernels.softmax.cudnn"]


@pytest.mark.parametrize("importer,imported", FORBIDDEN)
def test_layers_point_one_way(importer, imported):
  bad = sorted(f"{a} -> {b}" for a, targets in import_graph().items() if _under(a, importer)
               for b in targets if _under(b, imported))
  assert not bad, f"{importer} must not import {imported}: {bad}"


def test_only_tests_import_the_test_kit():
  bad = sorted(f"{a} -> {b}" for a, targets in import_graph().items()
               if not _under(a, "effattn.testing") for b in targets
               if _under(b, "effattn.testing"))
  assert not bad, f"effattn.testing is for tests and scripts only: {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle_outside_data():
  graph = import_graph()
  # Edges between two data modules may form circles; any circle through another module fails.
  pruned = {a: {b for b in targets
                if not (_under(a, CIRCLES_ALLOWED_IN) and _under(b, CIRCLES_ALLOWED_IN))}
            for a, targets in graph.items()}
  assert not _cycles(pruned), _cycles(pruned)


def test_the_circle_finder_finds_circles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert not _cycles({"a": {"b"}, "b": set()})
