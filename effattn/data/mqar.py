"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023).

A sequence starts with `num_pairs` key-value pairs, keys drawn from the lower half of the
vocabulary and values from the upper half (disjoint, every key and value distinct within a
sequence); then every key is asked again once, at a position drawn with a power law over the
gap to the start of the query region (small gaps likely, as for repeated bigrams in real text);
the target at a query is the value that followed that key. Positions between queries hold random
tokens (Zoology's `random_non_queries`). Loss is on the answer positions only.

    vocab 12, 2 pairs, seq_len 12, random_non_queries=False:
      inputs   2  8  4  7  0  0  4  0  0  0  2  0
      targets  .  .  .  .  .  .  7  .  .  .  8  .     (weights 1 at the two answers)

Zoology's grid (vocab 8192, seq_len 64-512, 4-64 pairs, power_a 0.01) is expressible: only
`4 * num_pairs <= seq_len` and `num_pairs < vocab_size // 2` are required.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effattn.data.spec import BuildSpec, synthetic_spec, token_features

NAME = "mqar"
VERSION = "1.0.0"
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class MqarOptions:
  """Options of the MQAR task (seq_len and the generation seed are `data.seq_len`/`data.seed`).

  Attributes:
    vocab_size: tokens; keys come from [1, vocab_size // 2), values from [vocab_size // 2, vocab).
    num_pairs: key-value pairs per sequence; each key is queried exactly once.
    train_examples: size of the train split.
    test_examples: size of the test split.
    power_a: alpha of the power law p(gap) ~ alpha * gap**(alpha - 1) placing the queries
      (Zoology 0.01: queries cluster near the pairs; 1.0: uniform).
    random_non_queries: fill non-query positions with random tokens (Zoology True) or with 0.
  """

  vocab_size: int = 8192
  num_pairs: int = 8
  train_examples: int = 100_000
  test_examples: int = 3_000
  power_a: float = 0.01
  random_non_queries: bool = True

  def validate(self, seq_len: int) -> None:
    if self.vocab_size < 4:
      raise ValueError(f"data.mqar.vocab_size={self.vocab_size} must be >= 4")
    if not 1 <= self.num_pairs < self.vocab_size // 2:
      raise ValueError(
          f"data.mqar.num_pairs={self.num_pairs} must be in [1, vocab_size // 2 - 1 = "
          f"{self.vocab_size // 2 - 1}]: raise data.mqar.vocab_size or lower num_pairs")
    if 4 * self.num_pairs > seq_len:
      raise ValueError(
          f"data.mqar.num_pairs={self.num_pairs} needs data.seq_len >= 4 * num_pairs = "
          f"{4 * self.num_pairs} (got {seq_len}): raise data.seq_len or lower num_pairs")
    if self.power_a <= 0:
      raise ValueError(f"data.mqar.power_a={self.power_a} must be > 0 (Zoology uses 0.01)")
    for field in ("train_examples", "test_examples"):
      if getattr(self, field) < 1:
        raise ValueError(f"data.mqar.{field}={getattr(self, field)} must be >= 1")


OPTIONS = MqarOptions


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
  """[n, k] rows of k distinct integers from [low, high), each row in random order."""
  # Top-k of i.i.d. uniforms is a uniform k-subset; the permutation randomizes its order.
  scores = rng.random((n, high - low))
  subset = np.argpartition(scores, k - 1, axis=1)[:, :k]
  return rng.permuted(subset, axis=1) + low


def sample(options: MqarOptions, seq_len: int, rng: np.random.Generator, n: int) -> dict:
  """Draws n MQAR examples: inputs/targets int32 [n, seq_len], weights float32 [n, seq_len]."""
  vocab, pairs = options.vocab_size, options.num_pairs
  half = vocab // 2
  keys = _distinct(rng, n, 1, half, pairs)
  values = _distinct(rng, n, half, vocab, pairs)

  # Query gaps: `pairs` distinct gaps in [0, space) drawn without replacement with weights
  # p(g) ~ a * (g + 1)**(a - 1). Gumbel top-k draws exactly that sequential sampling law.
  context = 2 * pairs
  space = (seq_len - context) // 2
  log_p = np.log(options.power_a) + (options.power_a - 1) * np.log(np.arange(1, space + 1))
  gaps = np.argsort(-(log_p + rng.gumbel(size=(n, space))), axis=1)[:, :pairs]
  # Queries sit on even offsets of the query region, so two never touch and each has room
  # for its answer slot after it (Zoology's layout).
  query_pos = context + 2 * gaps

  if options.random_non_queries:
    inputs = rng.integers(0, vocab, size=(n, seq_len))
  else:
    inputs = np.zeros((n, seq_len), np.int64)
  inputs[:, 0:context:2] = keys
  inputs[:, 1:context:2] = values
  rows = np.arange(n)[:, None]
  inputs[rows, query_pos] = keys
  targets = np.zeros((n, seq_len), np.int32)
  targets[rows, query_pos] = values
  weights = np.zeros((n, seq_len), np.float32)
  weights[rows, query_pos] = 1.0
  return {"inputs": inputs.astype(np.int32), "targets": targets, "weights": weights}


def info(options: MqarOptions, seq_len: int) -> tuple[int, int | None, int]:
  del seq_len
  return options.vocab_size, None, PAD_ID


def spec(options: MqarOptions, *, seq_len: int, seed: int, data_dir: str) -> BuildSpec:
  """The data of MQAR with these options (splits: train, test)."""
  del data_dir  # generated, nothing to read
  options.validate(seq_len)
  return synthetic_spec(NAME, VERSION, options, sample, seq_len=seq_len, seed=seed,
                        features=token_features(seq_len),
                        readable=f"v{options.vocab_size}_p{options.num_pairs}_t{seq_len}_s{seed}",
                        title="MQAR")
