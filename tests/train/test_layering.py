"""effattn.train never imports effattn.evaluate: evaluation builds on training, not the reverse."""

import ast
import glob
import os

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "effattn", "train")


def imported_modules(path):
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_train_does_not_import_evaluate():
  offending = [f"{os.path.basename(p)} imports {m}"
               for p in sorted(glob.glob(os.path.join(TRAIN, "*.py")))
               for m in imported_modules(p) if m.startswith("effattn.evaluate")]
  assert not offending, offending
