"""Attention mechanisms behind one interface (base.py), built by name (registry.py).

Every module in this package that registers a mechanism is imported here, so
`registry.names()` lists them all after `import effattn.attention`.
"""

import importlib
import pkgutil

from effattn.attention.registry import build, get, names, register

_SUPPORT = {"base", "kv_cache", "registry"}
# Discovered rather than listed so that adding a mechanism is adding one file.
for _module in pkgutil.iter_modules(__path__):
  if _module.name not in _SUPPORT and not _module.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["build", "get", "names", "register"]
