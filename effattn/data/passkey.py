"""Passkey retrieval (the landmark-attention protocol, Mohtashami & Jaggi 2023).

A random key is hidden in repeated filler text at a controlled depth and asked for at the end:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    them. I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 68512. Remember it. 68512 is the pass key.
    The grass is green. The sky is blue. ...
    What is the pass key? The pass key is 68512

The needle (`needle`) is the protocol's number of `key_digits` digits, or a word drawn from
WORDS (100 common English nouns of 4-8 letters; RULER's S-NIAH has word needles too): "The pass
key is falcon. Remember it. falcon is the pass key." Byte-level tokens
(`tokenizers.ByteTokenizer`, BOS first); the targets are the next tokens and only the key's
characters (digits or letters) are weighted. Depth d in [0, 1] puts round(d * filler) filler characters
before the key line, as in the landmark code (both filler pieces are prefixes of the repeated
filler). `passkey_example(length, depth, rng)` builds one example of any length for the
length x depth evaluation grid; training examples have length data.seq_len, or a uniform
length in [min_length, seq_len] padded to seq_len when min_length > 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effattn.data import tokenizers
from effattn.data.spec import BuildSpec, synthetic_spec, token_features

NAME = "passkey"
VERSION = "1.0.0"

DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
# The word needles: none of them occurs in the filler, the description or the question.
WORDS = (
    "anchor", "apple", "arrow", "badger", "barrel", "basket", "beacon", "bottle", "bridge",
    "bucket", "butter", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cattle",
    "cellar", "cherry", "circus", "clock", "cobalt", "copper", "cotton", "crayon", "dagger",
    "desert", "dragon", "drum", "eagle", "falcon", "feather", "fiddle", "forest", "fossil",
    "garden", "garlic", "ginger", "glacier", "goblet", "granite", "hammer", "harbor", "helmet",
    "hermit", "island", "jacket", "jungle", "kettle", "kitten", "ladder", "lantern", "lemon",
    "lizard", "magnet", "marble", "meadow", "mirror", "monkey", "mustard", "needle", "noodle",
    "oyster", "paddle", "panther", "parrot", "pebble", "pepper", "pillow", "pirate", "planet",
    "pocket", "potato", "puzzle", "rabbit", "ribbon", "rocket", "saddle", "salmon", "silver",
    "spider", "squirrel", "statue", "tablet", "teapot", "thunder", "tiger", "tomato", "tunnel",
    "turtle", "velvet", "violin", "walnut", "wagon", "window", "wizard", "yogurt", "zebra",
    "zipper",
)
NEEDLES = ("number", "word")
_TOKENIZER = tokenizers.ByteTokenizer()


def _info_line(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key."


def _shortest(key: str, include_description: bool) -> int:
  """The example with this key and no filler at all, in tokens."""
  return len(_prompt(key, 0, 0, include_description)) + 1 + len(key)


def min_length(key_digits: int = 5, include_description: bool = True,
               needle: str = "number") -> int:
  """The shortest length every key of this needle fits in (no filler at all), in tokens."""
  longest = "0" * key_digits if needle == "number" else max(WORDS, key=len)
  return _shortest(longest, include_description)


def _draw_key(rng: np.random.Generator, needle: str, key_digits: int) -> str:
  if needle == "number":
    return str(int(rng.integers(10 ** (key_digits - 1), 10 ** key_digits)))
  if needle == "word":
    return WORDS[int(rng.integers(len(WORDS)))]
  raise ValueError(f"passkey needle={needle!r} must be one of {NEEDLES}")


def _prompt(key: str, n_prefix: int, n_suffix: int, include_description: bool) -> str:
  filler = " ".join([FILLER] * (max(n_prefix, n_suffix) // (len(FILLER) + 1) + 1))
  lines = [filler[:n_prefix], _info_line(key), filler[:n_suffix], QUESTION]
  if include_description:
    lines.insert(0, DESCRIPTION)
  return "\n".join(lines)


def passkey_example(length: int, depth: float, rng: np.random.Generator, *, key_digits: int = 5,
                    include_description: bool = True,
                    needle: str = "number") -> dict[str, np.ndarray]:
  """One passkey example of exactly `length` tokens with the key at `depth` (0 = start, 1 = end).

  Returns inputs int32 [length], targets int32 [length] (next tokens), weights float32 [length]
  (1 at the positions whose target is a character of the key) and passkey (the key: an int for
  the number needle, a str for the word needle).
  """
  shortest = min_length(key_digits, include_description, needle)
  if length < shortest:
    raise ValueError(f"passkey length={length} must be >= {shortest} (the prompt without filler)"
                     f": raise the length or set include_description=False")
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey depth={depth} must be in [0, 1]")
  key = _draw_key(rng, needle, key_digits)
  filler = length - _shortest(key, include_description)
  n_prefix = int(round(depth * filler))
  text = _prompt(key, n_prefix, filler - n_prefix, include_description)
  tokens = np.concatenate([[tokenizers.BOS_ID], _TOKENIZER.encode(f"{text} {key}")])
  assert len(tokens) == length + 1, (len(tokens), length)
  weights = np.zeros(length, np.float32)
  weights[-len(key):] = 1.0
  return {"inputs": tokens[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
          "weights": weights, "passkey": int(key) if needle == "number" else key}


def passkey_batch(length: int, depth: float, num_examples: int, seed: int, *, key_digits: int = 5,
                  include_description: bool = True, needle: str = "number") -> dict[str, np.ndarray]:
  """`num_examples` examples at one (length, depth) cell of the evaluation grid, as a batch.

  The batch has the pipeline's format ([N, length] inputs/targets/weights/segment_ids/
  positions) plus passkey [N] (int64 numbers, or str words); the same (length, depth, seed)
  always gives the same keys.
  """
  from effattn.data.pipeline import complete_batch

  rng = np.random.default_rng([seed, length, int(round(depth * 1e6))])
  examples = [passkey_example(length, depth, rng, key_digits=key_digits,
                              include_description=include_description, needle=needle)
              for _ in range(num_examples)]
  batch = complete_batch({k: np.stack([e[k] for e in examples])
                          for k in ("inputs", "targets", "weights")})
  batch["passkey"] = np.asarray([e["passkey"] for e in examples],
                                np.int64 if needle == "number" else str)
  return batch


@dataclasses.dataclass(frozen=True)
class PasskeyOptions:
  """Options of the passkey task (the training length is data.seq_len).

  Attributes:
    train_examples: size of the train split.
    test_examples: size of the test split.
    min_length: 0: every example is data.seq_len long; else lengths uniform in
      [min_length, seq_len], padded to seq_len (segment_ids 0 on the padding).
    min_depth: smallest depth of the key (fraction of the filler before it).
    max_depth: largest depth.
    key_digits: digits of the key (5 in the landmark protocol; the number needle).
    include_description: start with the landmark task description (as the protocol does).
    needle: "number" (a key of key_digits digits) or "word" (a word of WORDS).
  """

  train_examples: int = 20_000
  test_examples: int = 500
  min_length: int = 0
  min_depth: float = 0.0
  max_depth: float = 1.0
  key_digits: int = 5
  include_description: bool = True
  needle: str = "number"

  def validate(self, seq_len: int) -> None:
    for field in ("train_examples", "test_examples", "key_digits"):
      if getattr(self, field) < 1:
        raise ValueError(f"data.passkey.{field}={getattr(self, field)} must be >= 1")
    if self.needle not in NEEDLES:
      raise ValueError(f"data.passkey.needle={self.needle!r} must be one of {NEEDLES}")
    shortest = min_length(self.key_digits, self.include_description, self.needle)
    if seq_len < shortest:
      raise ValueError(f"data.seq_len={seq_len} is shorter than the shortest passkey prompt "
                       f"({shortest} tokens): raise data.seq_len or set "
                       f"data.passkey.include_description=False")
    if self.min_length and not shortest <= self.min_length <= seq_len:
      raise ValueError(f"data.passkey.min_length={self.min_length} must be 0 or in "
                       f"[{shortest}, data.seq_len={seq_len}]")
    if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
      raise ValueError(f"data.passkey.min_depth={self.min_depth}, max_depth={self.max_depth} "
                       f"must satisfy 0 <= min_depth <= max_depth <= 1")


OPTIONS = PasskeyOptions


def sample(options: PasskeyOptions, seq_len: int, rng: np.random.Generator, n: int) -> dict:
  """n training examples padded to seq_len: inputs/targets/segment_ids [n, T], weights [n, T]."""
  out = {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
         "weights": np.zeros((n, seq_len), np.float32),
         "segment_ids": np.zeros((n, seq_len), np.int32)}
  lo = options.min_length or seq_len
  for i in range(n):
    length = int(rng.integers(lo, seq_len + 1))
    depth = float(rng.uniform(options.min_depth, options.max_depth))
    example = passkey_example(length, depth, rng, key_digits=options.key_digits,
                              include_description=options.include_description,
                              needle=options.needle)
    for k in ("inputs", "targets", "weights"):
      out[k][i, :length] = example[k]
    out["segment_ids"][i, :length] = 1
  return out


def info(options: PasskeyOptions, seq_len: int) -> tuple[int, int | None, int]:
  del options, seq_len
  return tokenizers.ByteTokenizer.vocab_size, None, tokenizers.PAD_ID


def spec(options: PasskeyOptions, *, seq_len: int, seed: int, data_dir: str) -> BuildSpec:
  """The data of passkey retrieval with these options (splits: train, test)."""
  del data_dir  # generated, nothing to read
  options.validate(seq_len)
  return synthetic_spec(NAME, VERSION, options, sample, seq_len=seq_len, seed=seed,
                        features=token_features(seq_len, segment_ids=True),
                        readable=f"t{seq_len}_d{options.min_depth:g}-{options.max_depth:g}_s{seed}",
                        title="passkey")
