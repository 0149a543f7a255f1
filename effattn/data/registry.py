"""The task registry: every dataset effattn can train on, by name.

A task is a frozen dataclass of options (with defaults) plus a spec of its data, from which
the TFDS builder is made. Configs hold one `config.data.<task>` ConfigDict per registered task,
made from `dataclasses.asdict(Options())`, so every option is overridable from the command line.

Importing this module imports no tensorflow_datasets: only `Task.builder` does (the GPU image
has no tfds, and the model and trainer must still import).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from effattn.data import listops, mqar, passkey, selective_copy, text
from effattn.data.spec import BuildSpec


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a model needs to know about a task to be built for it."""

  name: str
  kind: str  # "lm": targets [B, T]; "classification": targets [B]
  vocab_size: int
  num_classes: int | None  # classification only
  seq_len: int
  pad_id: int


@dataclasses.dataclass(frozen=True)
class Task:
  """A registered task.

  Attributes:
    name: the registry key, also `config.data.name`.
    kind: "lm" (per-token targets) or "classification" (one label per sequence).
    options: frozen dataclass of the task's options; instances have `validate(seq_len)`.
    spec: `(options, *, seq_len, seed, data_dir) -> spec.BuildSpec`, what the data is.
    info: `(options, seq_len) -> (vocab_size, num_classes, pad_id)`.
  """

  name: str
  kind: str
  options: type
  spec: Callable[..., BuildSpec]
  info: Callable[[Any, int], tuple[int, int | None, int]]

  def builder(self, options, *, seq_len: int, seed: int, data_dir: str):
    """The task's TFDS builder rooted at data_dir (imports tensorflow_datasets)."""
    from effattn.data import builder as builder_lib

    spec = self.spec(options, seq_len=seq_len, seed=seed, data_dir=data_dir)
    return builder_lib.make_builder(spec, data_dir)


def _task(module, kind: str) -> Task:
  return Task(name=module.NAME, kind=kind, options=module.OPTIONS, spec=module.spec,
              info=module.info)


TASKS: dict[str, Task] = {
    t.name: t for t in (
        _task(mqar, "lm"),
        _task(passkey, "lm"),
        _task(selective_copy, "lm"),
        _task(listops, "classification"),
        _task(text, "lm"),
    )
}


def get(name: str) -> Task:
  """Returns the task registered as `name`; unknown names fail listing the known ones."""
  if name not in TASKS:
    raise ValueError(f"data.name={name!r} is not a registered task; known: {sorted(TASKS)} "
                     f"(or 'tfds:<catalog name>' for a prepared TFDS dataset)")
  return TASKS[name]
