"""Name -> attention-module registry.

Mechanisms register themselves with `@register("name")`; the model builds them with
`build(cfg, d_model=..., num_heads=..., rngs=...)` and never imports a mechanism directly.
"""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the mechanism buildable as `cfg.name == name`."""

  def wrap(cls: type) -> type:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"attention mechanism {name!r} is already registered by {_REGISTRY[name]!r}")
    missing = [m for m in ("init_cache", "decode") if not callable(getattr(cls, m, None))]
    if missing:  # every mechanism decodes: fail where it is defined, not in a test's decode
      raise TypeError(f"attention mechanism {name!r} has no {' or '.join(missing)}: define "
                      "init_cache(batch, max_len, dtype) and decode(x, *, positions, cache) "
                      "(docs/adding_a_mechanism.md)")
    _REGISTRY[name] = cls
    cls.registered_name = name
    return cls

  return wrap


def names() -> list[str]:
  """Sorted names of every registered mechanism."""
  return sorted(_REGISTRY)


def get(name: str) -> type:
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown attention mechanism {name!r} (model.attention.name); "
        f"registered: {', '.join(names())}"
    )
  return _REGISTRY[name]


def build(cfg: Any, *, d_model: int, num_heads: int, rngs: Any, **kwargs: Any):
  """Builds the mechanism named `cfg.name` with the shared sizes and its own options in `cfg`.

  Args:
    cfg: the attention config (a ConfigDict or mapping) with at least `name`.
    d_model: model width.
    num_heads: number of query heads H.
    rngs: nnx.Rngs.
    **kwargs: shared context such as layer_idx, num_layers, dtype.
  """
  cls = get(cfg["name"] if isinstance(cfg, dict) else cfg.name)
  return cls(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
