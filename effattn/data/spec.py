"""What a task's data is, independent of how it is stored: the BuildSpec and its example streams.

A task describes its data with a `BuildSpec` (features, splits, and either a vectorized
`sample(rng, n)` for synthetic tasks or an `examples(split)` iterator for corpora).
`split_examples(spec, split)` yields a split's examples in their final order; the TFDS builder
(builder.py) writes exactly these, and the in-memory fallback (no tensorflow_datasets installed)
holds exactly these, so both give the same data.

Synthetic splits: each split is drawn from its own stream seeded by (seed, split); any example
already drawn for an earlier split is skipped, so splits are disjoint by construction. Held-out
splits come first, so their content does not depend on how large the train split is.

This module imports no tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Callable, Iterator, Mapping

import numpy as np

# Stable ids so a split's random stream never changes when splits are added or reordered.
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
# Examples drawn per vectorized sample() call: a fixed schedule, so a split of n examples is
# the first n of its stream whatever n is, and small splits stay cheap.
_CHUNKS = (64, 128, 256, 512, 1024)
_MAX_DRAWS_PER_EXAMPLE = 20  # give up when the task's example space is this close to exhausted


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """What a task's data is: features, splits and where examples come from.

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


def token_features(seq_len: int, *, segment_ids: bool = False) -> dict[str, tuple]:
  """The features of a task scored per token: inputs, targets int32 [T], their loss weights
  float32 [T] and, for examples padded to seq_len, segment_ids int32 [T]."""
  features = {"inputs": ((seq_len,), np.int32), "targets": ((seq_len,), np.int32),
              "weights": ((seq_len,), np.float32)}
  return {**features, "segment_ids": ((seq_len,), np.int32)} if segment_ids else features


def synthetic_spec(task: str, version: str, options: Any, sample: Callable, *, seq_len: int,
                   seed: int, features: Mapping[str, tuple], readable: str, title: str,
                   splits: tuple[str, ...] = ("train", "test")) -> BuildSpec:
  """The BuildSpec of a task drawn by `sample(options, seq_len, rng, n)`: its identity is every
  field of the options (a dataclass with `<split>_examples` for each split), seq_len and seed."""
  return BuildSpec(
      task=task,
      version=version,
      features=features,
      split_sizes={split: getattr(options, f"{split}_examples") for split in splits},
      sample=lambda rng, n: sample(options, seq_len, rng, n),
      identity={**dataclasses.asdict(options), "seq_len": seq_len, "seed": seed},
      readable=readable,
      description=f"{title} {options} seq_len={seq_len} seed={seed}",
  )


def split_examples(spec: BuildSpec, split: str) -> Iterator[dict[str, np.ndarray]]:
  """The examples of `split` in order (what is stored on disk, or held in memory)."""
  if spec.examples is not None:
    yield from spec.examples(split)
    return
  # Hashes of the splits drawn before this one (held-out splits first) are skipped here.
  order = sorted(spec.split_sizes, key=lambda s: -_SPLIT_IDS.get(s, 99))
  seen: set[bytes] = set()
  for earlier in order[:order.index(split)]:
    for example in _unique_stream(spec, earlier, seen=set(seen)):
      seen.add(_digest(example))
  yield from _unique_stream(spec, split, seen=seen)


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
