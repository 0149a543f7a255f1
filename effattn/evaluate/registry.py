"""Registry of eval tasks: name -> function, plus each task's options and their defaults.

An eval task is `fn(model, config, workdir) -> dict` chosen with `config.eval.task`. A task with
options registers a frozen dataclass of them; the values come from `config.eval.<task>` (where the
config has that section) laid over the dataclass defaults, so

    python eval.py --workdir runs/x --config.eval.task=passkey --config.eval.passkey.examples=32

works once configs/base.py holds the sections (it builds them from `default_options()`).

This module imports nothing heavy: configs import it to build those sections.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

EVAL_TASKS: dict[str, Callable[..., dict]] = {}
EVAL_OPTIONS: dict[str, type] = {}
# Modules whose import registers the built-in tasks (see default_options).
_BUILTIN = ("effattn.evaluate.positions", "effattn.evaluate.passkey",
            "effattn.evaluate.generate", "effattn.evaluate.entropy")


def register_eval_task(name: str, options: type | None = None):
  """Function decorator: makes `fn` selectable as config.eval.task=name.

  `options` is a frozen dataclass whose fields become `config.eval.<name>.<field>`; instances
  may define `validate()` (raising ValueError naming the field).
  """

  def wrap(fn):
    if name in EVAL_TASKS and EVAL_TASKS[name] is not fn:
      raise ValueError(f"eval task {name!r} is already registered by {EVAL_TASKS[name]!r}")
    EVAL_TASKS[name] = fn
    if options is not None:
      EVAL_OPTIONS[name] = options
    return fn

  return wrap


def load_builtin_tasks() -> None:
  for module in _BUILTIN:
    importlib.import_module(module)


def default_options() -> dict[str, dict[str, Any]]:
  """{task: {option: default}} of every task that has options (for configs/base.py)."""
  load_builtin_tasks()
  return {name: dataclasses.asdict(cls()) for name, cls in sorted(EVAL_OPTIONS.items())}


def _plain(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def task_options(config, name: str):
  """The options of task `name`: `config.eval.<name>` over the defaults, validated."""
  cls = EVAL_OPTIONS[name]
  given: dict[str, Any] = {}
  section = config.eval.get(name) if hasattr(config.eval, "get") else None
  if section is not None:
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"eval.{name}.{unknown[0]} is not an option of eval task {name!r}; "
                     f"options: {sorted(fields)}")
  options = cls(**{k: _plain(v) for k, v in given.items()})
  if hasattr(options, "validate"):
    options.validate()
  return options
