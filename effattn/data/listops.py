"""ListOps of Long Range Arena (Tay et al. 2021; Nangia & Bowman 2018).

Nested expressions of MAX, MIN, MED (median, rounded down) and SM (sum mod 10) over digits, e.g.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

classified into the 10 possible values. Trees are drawn as LRA's generator draws them (an
operator with probability 0.25 until max_depth, 2..max_args arguments, operators and digits
uniform) and kept when their token count lies strictly between min_length and max_length (LRA:
500 and 2000, depth 10, 10 arguments). Tokens are LRA's after its preprocessing (parentheses
dropped): 0 PAD, digits 0-9 as 1-10, [MIN 11, [MAX 12, [MED 13, [SM 14, ] 15. Inputs are padded
to data.seq_len (segment_ids 0 on the padding); targets are [] int32 labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effattn.data.spec import BuildSpec, synthetic_spec

NAME = "listops"
VERSION = "1.0.0"
PAD_ID = 0
DIGIT_OFFSET = 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
_OP_IDS = tuple(TOKEN_ID[op] for op in OPERATORS)
_END_ID = TOKEN_ID[END]
_OPERATOR_P = 0.25  # LRA's VALUE_P: probability that a node below max_depth is an operator


def apply(op: str, args: list[int]) -> int:
  """The value of operator `op` on digit arguments, as LRA computes it."""
  if op == "[MIN":
    return min(args)
  if op == "[MAX":
    return max(args)
  if op == "[MED":
    return int(np.median(args))
  if op == "[SM":
    return sum(args) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; operators: {OPERATORS}")


class _TooLong(Exception):
  """Raised mid-generation once a tree passes max_length (it would be rejected anyway)."""


class _Uniforms:
  """Uniform [0, 1) draws served from blocks: a scalar numpy draw per node is the bottleneck."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._block = rng.random(8192)
    self._i = 0

  def __call__(self) -> float:
    if self._i == len(self._block):
      self._block, self._i = self._rng.random(8192), 0
    self._i += 1
    return float(self._block[self._i - 1])

  def integer(self, low: int, high: int) -> int:
    """Uniform integer in [low, high)."""
    return low + int(self() * (high - low))


def _tree(u: _Uniforms, depth: int, options: ListOpsOptions, out: list[int]) -> int:
  """Appends one random subtree's token ids to `out` and returns its value."""
  if depth < options.max_depth and u() <= _OPERATOR_P:
    op = u.integer(0, len(OPERATORS))
    out.append(_OP_IDS[op])
    num_args = u.integer(2, options.max_args + 1)
    args = [_tree(u, depth + 1, options, out) for _ in range(num_args)]
    out.append(_END_ID)
    if len(out) >= options.max_length:
      raise _TooLong
    return apply(OPERATORS[op], args)
  digit = u.integer(0, 10)
  out.append(digit + DIGIT_OFFSET)
  if len(out) >= options.max_length:
    raise _TooLong
  return digit


def random_expression(u: _Uniforms, options: ListOpsOptions) -> tuple[list[int], int]:
  """Draws trees until one has a length in (min_length, max_length); returns (tokens, label)."""
  while True:
    tokens: list[int] = []
    try:
      label = _tree(u, 1, options, tokens)
    except _TooLong:
      continue
    if options.min_length < len(tokens) < options.max_length:
      return tokens, label


def to_text(tokens) -> str:
  """The expression as text, e.g. "[MAX 4 3 [MIN 2 3 ] ]" (padding dropped)."""
  return " ".join(VOCAB[t] for t in tokens if t != PAD_ID)


@dataclasses.dataclass(frozen=True)
class ListOpsOptions:
  """Options of ListOps (inputs are padded to data.seq_len; LRA uses 2000).

  Attributes:
    min_length: expressions have more tokens than this (LRA 500).
    max_length: and fewer than this (LRA 2000); must be <= data.seq_len + 1.
    max_depth: depth where every node becomes a digit (LRA 10).
    max_args: most arguments of an operator (LRA 10).
    train_examples: size of the train split (LRA 96,000).
    validation_examples: size of the validation split (LRA 2,000).
    test_examples: size of the test split (LRA 2,000).
  """

  min_length: int = 500
  max_length: int = 2000
  max_depth: int = 10
  max_args: int = 10
  train_examples: int = 96_000
  validation_examples: int = 2_000
  test_examples: int = 2_000

  def validate(self, seq_len: int) -> None:
    for field in ("train_examples", "validation_examples", "test_examples", "max_depth"):
      if getattr(self, field) < 1:
        raise ValueError(f"data.listops.{field}={getattr(self, field)} must be >= 1")
    if self.max_args < 2:
      raise ValueError(f"data.listops.max_args={self.max_args} must be >= 2")
    if not 0 <= self.min_length < self.max_length - 1:
      raise ValueError(f"data.listops.min_length={self.min_length} must be in [0, max_length - 1)"
                       f" = [0, {self.max_length - 1}): lengths are strictly between the two")
    if self.max_length - 1 > seq_len:
      raise ValueError(f"data.listops.max_length={self.max_length} allows expressions of "
                       f"{self.max_length - 1} tokens, longer than data.seq_len={seq_len}: set "
                       f"data.seq_len >= max_length - 1 or lower max_length")


OPTIONS = ListOpsOptions


def sample(options: ListOpsOptions, seq_len: int, rng: np.random.Generator, n: int) -> dict:
  """n examples: inputs/segment_ids int32 [n, seq_len] (padded), targets int32 [n]."""
  inputs = np.zeros((n, seq_len), np.int32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  targets = np.zeros((n,), np.int32)
  u = _Uniforms(rng)
  for i in range(n):
    tokens, targets[i] = random_expression(u, options)
    inputs[i, :len(tokens)] = tokens
    segment_ids[i, :len(tokens)] = 1
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids}


def info(options: ListOpsOptions, seq_len: int) -> tuple[int, int | None, int]:
  del options, seq_len
  return len(VOCAB), 10, PAD_ID


def spec(options: ListOpsOptions, *, seq_len: int, seed: int, data_dir: str) -> BuildSpec:
  """The data of ListOps with these options (splits: train, validation, test)."""
  del data_dir  # generated, nothing to read
  options.validate(seq_len)
  return synthetic_spec(NAME, VERSION, options, sample, seq_len=seq_len, seed=seed,
                        features={"inputs": ((seq_len,), np.int32), "targets": ((), np.int32),
                                  "segment_ids": ((seq_len,), np.int32)},
                        readable=f"l{options.min_length}-{options.max_length}_t{seq_len}_s{seed}",
                        title="ListOps", splits=("train", "validation", "test"))
