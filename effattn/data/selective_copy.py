"""Selective copying (H3, Fu et al. 2023; Mamba, Gu & Dao 2023).

`num_tokens` data tokens sit at random positions of a region filled with a noise token; after a
separator the model must emit them in order. Unlike plain copying, the gaps vary, so a fixed
convolution/shift cannot solve it: the model has to select by content.

    seq_len 12, 3 tokens:
      inputs   .  a  .  .  b  .  .  .  c  |  a  b        (. noise, | separator)
      targets  0  0  0  0  0  0  0  0  0  a  b  c        (weights 1 on the last 3)

Token ids: 0 PAD, 1 NOISE, 2 SEP, data symbols 3 .. 3 + num_symbols - 1 (vocab num_symbols + 3).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effattn.data.spec import BuildSpec, synthetic_spec, token_features

NAME = "selective_copy"
VERSION = "1.0.0"
PAD_ID, NOISE_ID, SEP_ID = 0, 1, 2
FIRST_SYMBOL = 3


@dataclasses.dataclass(frozen=True)
class SelectiveCopyOptions:
  """Options of selective copying (the sequence length is data.seq_len).

  Attributes:
    num_tokens: data tokens to copy (Mamba: 16); the region before the separator has
      seq_len - num_tokens positions.
    num_symbols: distinct data tokens (Mamba: 16); the vocabulary is num_symbols + 3.
    train_examples: size of the train split.
    test_examples: size of the test split.
  """

  num_tokens: int = 16
  num_symbols: int = 16
  train_examples: int = 100_000
  test_examples: int = 1_000

  def validate(self, seq_len: int) -> None:
    for field in ("num_tokens", "num_symbols", "train_examples", "test_examples"):
      if getattr(self, field) < 1:
        raise ValueError(f"data.selective_copy.{field}={getattr(self, field)} must be >= 1")
    if seq_len < 2 * self.num_tokens:
      raise ValueError(f"data.selective_copy.num_tokens={self.num_tokens} needs data.seq_len >= "
                       f"2 * num_tokens = {2 * self.num_tokens} (got {seq_len}): raise "
                       f"data.seq_len or lower num_tokens")


OPTIONS = SelectiveCopyOptions


def sample(options: SelectiveCopyOptions, seq_len: int, rng: np.random.Generator,
           n: int) -> dict:
  """n examples: inputs/targets int32 [n, seq_len], weights float32 [n, seq_len]."""
  k = options.num_tokens
  region = seq_len - k
  # k distinct positions of the region per row, in increasing order (the copy order).
  where = np.sort(np.argpartition(rng.random((n, region)), k - 1, axis=1)[:, :k], axis=1)
  data = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + options.num_symbols, size=(n, k))
  rows = np.arange(n)[:, None]
  inputs = np.full((n, seq_len), NOISE_ID, np.int32)
  inputs[rows, where] = data
  inputs[:, region] = SEP_ID
  inputs[:, region + 1:] = data[:, :-1]
  targets = np.zeros((n, seq_len), np.int32)
  targets[:, region:] = data
  weights = np.zeros((n, seq_len), np.float32)
  weights[:, region:] = 1.0
  return {"inputs": inputs, "targets": targets, "weights": weights}


def info(options: SelectiveCopyOptions, seq_len: int) -> tuple[int, int | None, int]:
  del seq_len
  return options.num_symbols + FIRST_SYMBOL, None, PAD_ID


def spec(options: SelectiveCopyOptions, *, seq_len: int, seed: int, data_dir: str) -> BuildSpec:
  """The data of selective copying with these options (splits: train, test)."""
  del data_dir  # generated, nothing to read
  options.validate(seq_len)
  return synthetic_spec(NAME, VERSION, options, sample, seq_len=seq_len, seed=seed,
                        features=token_features(seq_len),
                        readable=f"k{options.num_tokens}_v{options.num_symbols}_t{seq_len}_s{seed}",
                        title="selective copy")
