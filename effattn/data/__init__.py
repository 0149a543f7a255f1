"""Datasets of effattn: TFDS builders generated locally, and a deterministic input pipeline.

Importing this package does not import tensorflow_datasets (only preparing/reading data does).
"""

from __future__ import annotations

from effattn.data.pipeline import (
    DEFAULT_DATA_DIR,
    Source,
    batch_at,
    batch_indices,
    eval_batches,
    load_split,
    make_iterator,
    positions_from_segments,
    task_info,
)
from effattn.data.registry import TASKS, Task, TaskInfo

__all__ = [
    "DEFAULT_DATA_DIR",
    "Source",
    "TASKS",
    "Task",
    "TaskInfo",
    "batch_at",
    "batch_indices",
    "eval_batches",
    "load_split",
    "make_iterator",
    "positions_from_segments",
    "task_info",
]
