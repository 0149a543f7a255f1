"""TFDS builders for effattn's tasks, written without TensorFlow.

This is the only module of effattn.data that imports tensorflow_datasets, and only the task
modules' `builder()` functions import it, lazily. A task describes itself with a `BuildSpec`
(features, splits and a generator of examples); `make_builder` turns the spec into a
`tfds.core.GeneratorBasedBuilder` whose config name is derived from everything that changes the
data, so two option sets never share a directory under data_dir:

    <data_dir>/effattn_<task>/<readable fields>_<hash>/<version>/*.array_record-*

Synthetic tasks give a `sample(rng, n)` that draws n examples at once (vectorized numpy); the
builder draws each split from its own stream seeded by (seed, split) and skips any example
already drawn for an earlier split, so splits are disjoint by construction. Held-out splits are
drawn first, so their content does not depend on how large the train split is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import os
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

# Stable ids so a split's random stream never changes when splits are added or reordered.
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
# Examples drawn per vectorized sample() call: a fixed schedule, so a split of n examples is
# the first n of its stream whatever n is, and small splits stay cheap.
_CHUNKS = (64, 128, 256, 512, 1024)
_MAX_DRAWS_PER_EXAMPLE = 20  # give up when the task's example space is this close to exhausted


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """Everything a builder needs from a task.

  Attributes:
    task: registry name; the TFDS builder is named `effattn_<task>`.
    version: "MAJOR.MINOR.PATCH"; bump it when the generator's output changes.
    features: name -> (shape, numpy dtype) of one stored example.
    split_sizes: split -> number of examples (synthetic tasks).
    sample: `(rng, n) -> {name: array [n, ...]}` for synthetic tasks, else None.
    examples: `split -> iterator of examples` for corpora read from files, else None.
    identity: everything that determines the data (options, seq_len, seed); hashed into the
      config name.
    readable: short human-readable prefix of the config name, e.g. "v8192_p8_t64".
    description: one line shown in dataset_info.json.
  """

  task: str
  version: str
  features: Mapping[str, tuple[tuple[int, ...], Any]]
  identity: Mapping[str, Any]
  readable: str
  description: str
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  sample: Callable[[np.random.Generator, int], dict[str, np.ndarray]] | None = None
  examples: Callable[[str], Iterator[dict[str, np.ndarray]]] | None = None
  splits: tuple[str, ...] = ()

  @property
  def config_name(self) -> str:
    blob = json.dumps({"version": self.version, **self.identity}, sort_keys=True, default=str)
    return f"{self.readable}_{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

  @property
  def split_names(self) -> tuple[str, ...]:
    return tuple(self.split_sizes) or self.splits


class _EffattnBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder driven by a BuildSpec (one subclass per task, for its name)."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums or metadata files live next to this code; None also keeps TFDS from probing
  # package resources (which needs importlib_resources on some installs).
  code_path = None

  def __init__(self, *, spec: BuildSpec, data_dir: str):
    self._spec = spec
    super().__init__(data_dir=data_dir, config=spec.config_name)

  def _info(self):
    features = tfds.features.FeaturesDict({
        name: tfds.features.Tensor(shape=shape, dtype=dtype)
        for name, (shape, dtype) in self._spec.features.items()
    })
    # Order on disk = generation order, so source[i] is the i-th example drawn.
    return tfds.core.DatasetInfo(
        builder=self, description=self._spec.description, features=features,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(identity=dict(self._spec.identity)))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated or read locally
    return {split: self._generate_examples(split) for split in self._spec.split_names}

  def _generate_examples(self, split):
    spec = self._spec
    if spec.examples is not None:
      yield from enumerate(spec.examples(split))
      return
    # Hashes of the splits drawn before this one (held-out splits first): skipped here.
    order = sorted(spec.split_sizes, key=lambda s: -_SPLIT_IDS.get(s, 99))
    seen: set[bytes] = set()
    for earlier in order[:order.index(split)]:
      for example in _unique_stream(spec, earlier, seen=set(seen)):
        seen.add(_digest(example))
    yield from enumerate(_unique_stream(spec, split, seen=seen))


def _digest(example: Mapping[str, np.ndarray]) -> bytes:
  h = hashlib.blake2b(digest_size=16)
  for name in sorted(example):
    h.update(np.ascontiguousarray(example[name]).tobytes())
  return h.digest()


def _unique_stream(spec: BuildSpec, split: str, *, seen: set[bytes]) -> Iterator[dict]:
  """The first split_sizes[split] examples of the split's stream that are not in `seen`."""
  want = spec.split_sizes[split]
  seed = int(spec.identity["seed"])
  rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 99), 0xEFA])
  produced = drawn = 0
  for call in itertools.count():
    size = _CHUNKS[min(call, len(_CHUNKS) - 1)]
    chunk = spec.sample(rng, size)
    for i in range(size):
      drawn += 1
      example = {name: values[i] for name, values in chunk.items()}
      key = _digest(example)
      if key in seen:
        continue
      seen.add(key)
      yield example
      produced += 1
      if produced == want:
        return
    if drawn > _MAX_DRAWS_PER_EXAMPLE * want + _CHUNKS[-1]:
      raise ValueError(
          f"{spec.task}: only {produced} distinct {split} examples in {drawn} draws; the options "
          f"allow too few distinct sequences: enlarge the vocabulary/seq_len or ask for fewer "
          f"{split} examples")


@functools.cache
def _builder_class(task: str, config_name: str, version: str, description: str) -> type:
  # TFDS names the on-disk folder after the class's `name`: one name per task keeps tasks apart.
  # Listing the config in BUILDER_CONFIGS keeps TFDS from warning about a "custom" config.
  config = tfds.core.BuilderConfig(name=config_name, version=version, description=description)
  return type(f"Effattn{task.title().replace('_', '')}", (_EffattnBuilder,),
              {"name": f"effattn_{task}", "BUILDER_CONFIGS": [config],
               "VERSION": tfds.core.Version(version), "__module__": __name__},
              skip_registration=True)


def make_builder(spec: BuildSpec, data_dir: str):
  """Returns the TFDS builder of `spec` rooted at data_dir (nothing is generated yet)."""
  cls = _builder_class(spec.task, spec.config_name, spec.version, spec.description)
  return cls(spec=spec, data_dir=data_dir)


@contextlib.contextmanager
def _file_lock(path: str):
  # Several processes (a parallel sweep, several hosts sharing a disk) may ask for the same
  # data at once: one prepares it, the others wait and then reuse it.
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder, data_dir: str):
  """Generates the builder's data as array_record under data_dir unless it is already there.

  Returns a builder whose info describes the prepared data (a builder made before another
  process finished preparing would still describe no splits).
  """
  if not _is_prepared(builder):  # reading needs no lock, so a read-only data_dir works
    os.makedirs(data_dir, exist_ok=True)
    lock = os.path.join(data_dir, f".{builder.name}.{builder.builder_config.name}.lock")
    with _file_lock(lock):
      if not _is_prepared(builder):
        logging.info("Preparing %s/%s into %s (first use)", builder.name,
                     builder.builder_config.name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
        return builder
  if not builder.info.splits:
    return make_builder(builder._spec, data_dir)
  return builder


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
