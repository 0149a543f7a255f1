"""The input pipeline: config -> prepared TFDS data -> deterministic numpy batches.

`data_cfg` is `config.data`: `name` (task), `data_dir`, `seq_len`, `seed` (data generation
seed) and one sub-config per task holding its options (`data_cfg[name]`). seq_len lives only in
`data_cfg.seq_len`: task options never repeat it (a task's own lengths, like ListOps' expression
lengths, must fit in it).

A batch is a dict of numpy arrays:
    inputs       int32   [B, T]
    targets      int32   [B, T] ("lm" tasks) or [B] ("classification" tasks)
    weights      float32 same shape as targets (0 where no loss: prompts, padding)
    segment_ids  int32   [B, T] (0 = padding, 1.. = packed segments)
    positions    int32   [B, T] (position within its segment, 0 on padding)

Training order is a pure function of (seed, step): example j of the batch at step s is the
(s * B + j)-th entry of an endless stream made of epoch-wise permutations, epoch e permuted by
`default_rng([seed, e])`. A run resumed at step s therefore sees exactly the batches it would
have seen, whatever happened before.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import threading
from typing import Any, Iterator, Mapping

from absl import logging
import numpy as np

from effattn.data import registry, text
from effattn.data.registry import TaskInfo
from effattn.data.spec import BuildSpec, split_examples

DEFAULT_DATA_DIR = "~/effattn_data"
CATALOG_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class _Resolved:
  task: registry.Task
  options: Any
  seq_len: int
  seed: int
  data_dir: str


def _to_dict(cfg: Any) -> dict:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict, without importing it
    return cfg.to_dict()
  return dict(cfg)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return getattr(cfg, key, default) if key in cfg else default


def resolve(data_cfg: Any) -> _Resolved:
  """Validates `data_cfg` and returns the task, its options and the common fields."""
  name = _get(data_cfg, "name")
  catalog = None
  if isinstance(name, str) and name.startswith(CATALOG_PREFIX):
    # "tfds:lm1b" = the text task reading the prepared catalog dataset lm1b.
    name, catalog = text.NAME, name[len(CATALOG_PREFIX):]
  task = registry.get(name)
  seq_len = _get(data_cfg, "seq_len")
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"data.seq_len={seq_len!r} must be an int >= 2")
  seed = _get(data_cfg, "seed", 0)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"data.seed={seed!r} must be an int >= 0")
  given = _to_dict(_get(data_cfg, name))
  fields = {f.name for f in dataclasses.fields(task.options)}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"data.{name}.{unknown[0]} is not an option of {name}; "
                     f"options: {sorted(fields)}")
  if catalog is not None:
    given["tfds_name"] = catalog
  options = task.options(**given)
  options.validate(int(seq_len))
  data_dir = os.path.abspath(os.path.expanduser(_get(data_cfg, "data_dir") or DEFAULT_DATA_DIR))
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"data.data_dir={data_dir!r} exists and is not a directory: point "
                     f"data.data_dir at a directory")
  return _Resolved(task, options, int(seq_len), int(seed), data_dir)


def task_info(data_cfg: Any) -> TaskInfo:
  """What the model needs to know about the task (no data is generated)."""
  r = resolve(data_cfg)
  vocab_size, num_classes, pad_id = r.task.info(r.options, r.seq_len)
  return TaskInfo(name=r.task.name, kind=r.task.kind, vocab_size=vocab_size,
                  num_classes=num_classes, seq_len=r.seq_len, pad_id=pad_id)


class Source:
  """Random access to one prepared split: `len(source)`, `source[i]` -> dict of numpy arrays.

  Wraps `builder.as_data_source(split)` and completes every example to the batch format
  (weights, segment_ids, positions) so all tasks look alike to the trainer.
  """

  def __init__(self, data_source: Any, info: TaskInfo, split: str, path: str):
    self._source = data_source
    self.info = info
    self.split = split
    self.path = path

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.get_batch([index]).items()}

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """Stacks the examples at `indices` into one batch (see the module docstring)."""
    indices = [int(i) for i in indices]
    if isinstance(self._source, _ArraySource):
      return complete_batch(self._source.take(indices))
    if hasattr(self._source, "__getitems__"):
      records = self._source.__getitems__(indices)
    else:
      records = [self._source[i] for i in indices]
    batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    return complete_batch(batch)


def complete_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds the fields a task does not store.

  segment_ids default to 1 everywhere; weights to 1 on every non-padding target (per token
  for [B, T] targets, per sequence for [B] targets); positions come from the segments.
  """
  inputs = batch["inputs"].astype(np.int32)
  targets = batch["targets"].astype(np.int32)
  segment_ids = batch.get("segment_ids")
  if segment_ids is None:
    segment_ids = np.ones(inputs.shape, np.int32)
  segment_ids = segment_ids.astype(np.int32)
  weights = batch.get("weights")
  if weights is None:
    weights = (segment_ids > 0) if targets.shape == inputs.shape else np.ones(targets.shape)
  weights = weights.astype(np.float32)
  return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segment_ids,
          "positions": positions_from_segments(segment_ids)}


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
  """Position of each token within its segment, 0 on padding. [B, T] -> [B, T] int32."""
  t = np.arange(segment_ids.shape[-1])
  starts = np.ones(segment_ids.shape, bool)
  starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  start_index = np.maximum.accumulate(np.where(starts, t, 0), axis=-1)
  return np.where(segment_ids > 0, t - start_index, 0).astype(np.int32)


def load_split(data_cfg: Any, split: str) -> Source:
  """The split as a random-access Source, preparing the data into data_dir on first use.

  Without tensorflow_datasets installed (e.g. a bare accelerator image) the same examples are
  generated into memory instead (logged once); nothing is written to data_dir then.
  """
  r = resolve(data_cfg)
  info = task_info(data_cfg)
  spec = r.task.spec(r.options, seq_len=r.seq_len, seed=r.seed, data_dir=r.data_dir)
  try:
    from effattn.data import builder as builder_lib  # imports tensorflow_datasets
  except ImportError:
    return Source(_in_memory(spec, split), info, split, path="<memory>")
  builder = builder_lib.make_builder(spec, r.data_dir)
  try:
    builder = builder_lib.prepare(builder, r.data_dir)
  except PermissionError as e:
    raise ValueError(f"data.data_dir={r.data_dir!r} is not writable ({e.strerror}): point "
                     f"data.data_dir at a writable directory") from e
  splits = list(builder.info.splits)
  if split not in splits:
    raise ValueError(f"split={split!r} is not a split of {r.task.name}; splits: {splits}")
  path = str(builder.data_dir)
  try:
    source = builder.as_data_source(split)
    expected = builder.info.splits[split].num_examples
    if len(source) != expected:
      raise ValueError(f"{len(source)} records where dataset_info.json says {expected}")
    for i in (0, len(source) - 1):  # fail here, not mid-training, if files are damaged
      source[i]
  except Exception as e:  # noqa: BLE001 -- any failure to read prepared files means corruption
    raise ValueError(f"prepared data at {path} is incomplete or corrupt ({type(e).__name__}: "
                     f"{e}); delete that directory to regenerate it") from e
  return Source(source, info, split, path)


class _ArraySource:
  """A split held in memory as stacked arrays (the fallback without tensorflow_datasets)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def take(self, indices) -> dict[str, np.ndarray]:
    return {k: v[np.asarray(indices, np.int64)] for k, v in self.arrays.items()}


# Generated splits by (task, config, split): a trainer asks for its eval split at every eval.
_MEMORY: dict[tuple[str, str, str], _ArraySource] = {}
_MEMORY_ENTRIES = 4


def _in_memory(spec: BuildSpec, split: str) -> _ArraySource:
  key = (spec.task, spec.config_name, split)
  if key not in _MEMORY:
    if split not in spec.split_names:
      raise ValueError(f"split={split!r} is not a split of {spec.task}; splits: "
                       f"{list(spec.split_names)}")
    logging.warning("tensorflow_datasets is not installed: generating %s/%s split %r in memory "
                    "(nothing is saved to data_dir)", spec.task, spec.config_name, split)
    examples = list(split_examples(spec, split))
    if len(_MEMORY) >= _MEMORY_ENTRIES:
      _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = _ArraySource({name: np.stack([e[name] for e in examples]).astype(dtype)
                                 for name, (_, dtype) in spec.features.items()})
  return _MEMORY[key]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int, *,
                  shuffle: bool = True) -> np.ndarray:
  """Example indices [batch_size] of the global batch at `step` (a pure function)."""
  if num_examples < 1:
    raise ValueError("the split is empty: regenerate the data with more examples")
  flat = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(flat, num_examples)
  if not shuffle:
    return offsets
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):  # a batch spans at most a few epochs
    sel = epochs == epoch
    out[sel] = _permutation(num_examples, seed, int(epoch))[offsets[sel]]
  return out


def batch_at(source: Source, step: int, batch_size: int, seed: int, *, shuffle: bool = True,
             process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """The batch at `step`, a pure function of (seed, step) and the split.

  With several processes (multi-host), each gets rows [process_index::process_count] of the
  same global batch, so the union over processes is the single-process batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count="
                     f"{process_count}")
  indices = batch_indices(len(source), step, batch_size, seed, shuffle=shuffle)
  return source.get_batch(indices[process_index::process_count])


def make_iterator(data_cfg: Any, split: str, batch_size: int, *, seed: int, start_step: int = 0,
                  shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches from `start_step` on; batch k is `batch_at(source, start_step + k, ...)`.

  `prefetch` batches are read ahead on a background thread (0 reads in the caller's thread).
  """
  source = load_split(data_cfg, split)

  def batches():
    for step in itertools.count(start_step):
      yield batch_at(source, step, batch_size, seed, shuffle=shuffle,
                     process_index=process_index, process_count=process_count)

  return _prefetch(batches(), prefetch) if prefetch > 0 else batches()


def _prefetch(it: Iterator, depth: int) -> Iterator:
  """Runs `it` on a daemon thread, `depth` items ahead; errors are re-raised in the caller."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def work():
    try:
      for item in it:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer
      q.put(e)

  threading.Thread(target=work, daemon=True, name="effattn-data").start()
  try:
    while True:
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def eval_batches(data_cfg: Any, split: str, batch_size: int, max_examples: int | None = None, *,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the split in order; the last batch is padded with weights 0 rows.

  With several processes (multi-host), each reads only rows [process_index::process_count] of
  every batch (padding rows included).
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count="
                     f"{process_count}")
  source = load_split(data_cfg, split)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)[process_index::process_count]
    pad = rows >= n
    # Padding rows read the last example, then become zeros (inputs: pad_id), weights 0.
    batch = source.get_batch(np.minimum(rows, n - 1))
    if pad.any():
      batch = {k: np.where(pad.reshape(-1, *[1] * (v.ndim - 1)), np.zeros((), v.dtype), v)
               for k, v in batch.items()}
      if source.info.pad_id:
        batch["inputs"][pad] = source.info.pad_id
    yield batch
