"""Imports a script of scripts/ by path (scripts/ is no package), for the tests of scripts."""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name: str):
  """The module scripts/<name>.py of the repository this package sits in, imported once per
  process (as `<name>_script` in sys.modules): a second import would define its absl flags
  twice, and its dataclasses look their module up while being defined."""
  module_name = f"{name}_script"
  if module_name in sys.modules:
    return sys.modules[module_name]
  path = os.path.join(ROOT, "scripts", f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no script {path} (load_script needs a checkout, not an install)")
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module
