"""Language modelling on real text that every machine has: local files, packed into sequences.

Sources, in order of precedence:
  * `tfds_name`: a TFDS catalog dataset (lm1b, pg19, wikitext/..., any with a text feature)
    that a user has prepared under data.data_dir in array_record format; read without
    TensorFlow, its own splits kept.
  * `files`: comma-separated globs of local text files (`**` recursive).
  * default: the source files (*.py) of the running Python's standard library (real code with
    prose docstrings, ~30 MB), site-packages excluded.
Local files are split train/validation/test by a hash of their path relative to the directory
their glob starts from, so a file's split never changes when files are added or removed.

Tokens: UTF-8 bytes by default (`tokenizers.ByteTokenizer`, vocab 259, lossless); or a
SentencePiece BPE model trained on the train split and saved next to the data
(`tokenizer="sentencepiece"`, needs the `data` extra). Each document becomes
[BOS] + tokens + [EOS]; inputs are its tokens but the last, targets the next ones. Documents
are laid end to end and cut into rows of data.seq_len; segment_ids number the document pieces of
a row (1, 2, ...; 0 on the padding of the last row), so attention can stay within a document
and nothing is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import os
import sysconfig
from typing import Iterator

import numpy as np

from effattn.data import tokenizers
from effattn.data.spec import BuildSpec

NAME = "text"
VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class TextOptions:
  """Options of the text corpus (the packed row length is data.seq_len).

  Attributes:
    files: comma-separated globs of local text files; "" = the Python standard library.
    tfds_name: a prepared TFDS catalog dataset, e.g. "lm1b" or "wikitext/wikitext-103-raw-v1"
      (overrides files); data.name="tfds:<name>" is a shorthand for it.
    text_key: the feature holding the text in a catalog dataset.
    tokenizer: "byte" or "sentencepiece".
    vocab_size: SentencePiece vocabulary (ignored for bytes, whose vocabulary is 259).
    validation_fraction: share of local files in the validation split.
    test_fraction: share of local files in the test split.
    max_files: use only this many local files (the first by path hash), 0 = all.
  """

  files: str = ""
  tfds_name: str = ""
  text_key: str = "text"
  tokenizer: str = "byte"
  vocab_size: int = 8192
  validation_fraction: float = 0.05
  test_fraction: float = 0.05
  max_files: int = 0

  def validate(self, seq_len: int) -> None:
    del seq_len  # any row length packs
    if self.tokenizer not in ("byte", "sentencepiece"):
      raise ValueError(f"data.text.tokenizer={self.tokenizer!r} must be 'byte' or "
                       f"'sentencepiece'")
    if self.tokenizer == "sentencepiece" and self.vocab_size < 300:
      raise ValueError(f"data.text.vocab_size={self.vocab_size} must be >= 300 with "
                       f"sentencepiece (256 byte pieces + specials are always in it)")
    fractions = (self.validation_fraction, self.test_fraction)
    if min(fractions) < 0 or sum(fractions) >= 1:
      raise ValueError(f"data.text.validation_fraction={self.validation_fraction} and "
                       f"test_fraction={self.test_fraction} must be >= 0 and sum below 1")
    if self.max_files < 0:
      raise ValueError(f"data.text.max_files={self.max_files} must be >= 0 (0 = all)")


OPTIONS = TextOptions


def _path_hash(relpath: str) -> float:
  digest = hashlib.sha1(relpath.replace(os.sep, "/").encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _glob_base(pattern: str) -> str:
  """The directory part of a glob before its first wildcard: "~/c/**/*.txt" -> "~/c"."""
  parts = pattern.split(os.sep)
  static = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
  base = os.sep.join(static[:-1] if len(static) == len(parts) else static)
  return base or (os.sep if pattern.startswith(os.sep) else ".")


def local_files(options: TextOptions) -> list[tuple[str, str]]:
  """(key, path) of every local file, ordered by a hash of the key, capped by max_files.

  The key is the path relative to the directory its glob starts from (for the stdlib: to the
  stdlib), so adding or removing files never changes another file's key, order or split.
  """
  files: dict[str, str] = {}  # path -> key
  if options.files:
    for pattern in (p.strip() for p in options.files.split(",") if p.strip()):
      pattern = os.path.expanduser(pattern)
      base = _glob_base(pattern)
      for path in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isfile(path):
          files.setdefault(os.path.abspath(path), os.path.relpath(path, base))
    if not files:
      raise ValueError(f"data.text.files={options.files!r} matches no file: give globs of "
                       f"existing text files (e.g. '~/corpus/**/*.txt')")
  else:
    root = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, names in os.walk(root):
      # Pruned, not filtered: site-packages can be far larger than the stdlib itself.
      subfolders[:] = sorted(d for d in subfolders if d not in _NOT_STDLIB)
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          files[path] = os.path.relpath(path, root)
  ordered = sorted(((key, path) for path, key in files.items()), key=lambda kp: _path_hash(kp[0]))
  return ordered[:options.max_files] if options.max_files else ordered


def split_files(options: TextOptions) -> dict[str, list[str]]:
  """Paths of each split's files, in the order they are packed."""
  files = local_files(options)
  out: dict[str, list[str]] = {s: [] for s in SPLITS}
  for key, path in files:
    u = _path_hash("split:" + key)  # independent of the ordering hash
    split = ("test" if u < options.test_fraction else
             "validation" if u < options.test_fraction + options.validation_fraction else "train")
    out[split].append(path)
  for split, paths in out.items():
    if not paths:
      raise ValueError(f"data.text: the {split} split got none of the {len(files)} files: "
                       f"give more files or raise data.text.{split}_fraction"
                       if split != "train" else
                       f"data.text: the train split got none of the {len(files)} files: "
                       f"lower data.text.validation_fraction/test_fraction")
  return out


def pack(documents: Iterator[np.ndarray], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
  """Packs token documents (without BOS/EOS) into rows of seq_len; see the module docstring.

  Yields inputs, targets, segment_ids int32 [seq_len]; the last row is padded with 0.
  """
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids")}
  fill, segment = 0, 0
  for doc in documents:
    tokens = np.concatenate([[tokenizers.BOS_ID], doc, [tokenizers.EOS_ID]]).astype(np.int32)
    inputs, targets = tokens[:-1], tokens[1:]
    start = 0
    while start < len(inputs):
      take = min(seq_len - fill, len(inputs) - start)
      segment += 1
      row["inputs"][fill:fill + take] = inputs[start:start + take]
      row["targets"][fill:fill + take] = targets[start:start + take]
      row["segment_ids"][fill:fill + take] = segment
      fill += take
      start += take
      if fill == seq_len:
        yield row
        row = {k: np.zeros(seq_len, np.int32) for k in row}
        fill, segment = 0, 0
  if fill:
    yield row


def _catalog_source(options: TextOptions, data_dir: str, split: str | None = None):
  """The prepared catalog builder (split None) or the split's data source."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ValueError(f"data.text.tfds_name={options.tfds_name!r} needs tensorflow_datasets: "
                     f"pip install tensorflow-datasets") from e

  try:
    catalog = tfds.core.read_only_builder.builder_from_files(options.tfds_name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 -- TFDS raises several types for "not there"
    raise ValueError(
        f"data.text.tfds_name={options.tfds_name!r} is not prepared under data.data_dir="
        f"{data_dir!r} ({type(e).__name__}): prepare it once with `tfds build "
        f"{options.tfds_name} --data_dir={data_dir} --file_format=array_record`") from e
  if split is None:
    return catalog
  try:
    return catalog.as_data_source(split)
  except Exception as e:  # noqa: BLE001
    raise ValueError(
        f"data.text.tfds_name={options.tfds_name!r} cannot be read without TensorFlow "
        f"({type(e).__name__}: {e}): rebuild it with --file_format=array_record") from e


def _catalog_texts(options: TextOptions, data_dir: str, split: str) -> Iterator[bytes]:
  source = _catalog_source(options, data_dir, split)
  for i in range(len(source)):
    record = source[i]
    if options.text_key not in record:
      raise ValueError(f"data.text.text_key={options.text_key!r} is not a feature of "
                       f"{options.tfds_name}; features: {sorted(record)}")
    text = record[options.text_key]
    yield text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def tokenizer_path(data_dir: str, config_name: str) -> str:
  return os.path.join(data_dir, f"effattn_{NAME}", config_name, "tokenizer", "spm.model")


def _tokenizer(options: TextOptions, texts_for_training, model_path: str):
  if options.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  if os.path.exists(model_path):
    return tokenizers.SentencePieceTokenizer(model_path)

  def lines():  # SentencePiece learns from lines; newlines are encoded by byte fallback
    for text in texts_for_training():
      yield from text.decode("utf-8", errors="replace").split("\n")

  try:
    return tokenizers.train_sentencepiece(lines(), model_path, options.vocab_size)
  except RuntimeError as e:
    raise ValueError(f"data.text.vocab_size={options.vocab_size}: SentencePiece could not train "
                     f"on this corpus ({e}); lower vocab_size or give more text") from e


def info(options: TextOptions, seq_len: int) -> tuple[int, int | None, int]:
  del seq_len
  vocab = options.vocab_size if options.tokenizer == "sentencepiece" else (
      tokenizers.ByteTokenizer.vocab_size)
  return vocab, None, tokenizers.PAD_ID


def _identity(options: TextOptions, seq_len: int, data_dir: str) -> tuple[dict, tuple[str, ...]]:
  """What determines the data, and the splits."""
  identity = {**dataclasses.asdict(options), "seq_len": seq_len}
  if options.tfds_name:
    catalog = _catalog_source(options, data_dir)
    identity["catalog"] = {"version": str(catalog.info.version),
                           "splits": {s: v.num_examples for s, v in catalog.info.splits.items()}}
    return identity, tuple(catalog.info.splits)
  split_files(options)  # fails now, before preparing, if a split would be empty
  h = hashlib.sha1()
  for key, path in local_files(options):  # a changed, added or removed file gives new data
    st = os.stat(path)
    h.update(f"{key}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  identity["corpus"] = h.hexdigest()
  return identity, SPLITS


def spec(options: TextOptions, *, seq_len: int, seed: int, data_dir: str) -> BuildSpec:
  """The packed corpus for these options (the seed does not change text data)."""
  del seed  # document order is fixed by path hashes; one copy serves every seed
  options.validate(seq_len)
  identity, splits = _identity(options, seq_len, data_dir)
  source = options.tfds_name.replace("/", "-") if options.tfds_name else (
      "files" if options.files else "stdlib")
  tok = "byte" if options.tokenizer == "byte" else f"spm{options.vocab_size}"
  features = {"inputs": ((seq_len,), np.int32), "targets": ((seq_len,), np.int32),
              "segment_ids": ((seq_len,), np.int32)}
  readable = f"{source}_{tok}_t{seq_len}"
  config_name = BuildSpec(task=NAME, version=VERSION, features=features, identity=identity,
                          readable=readable, description="").config_name

  def texts(split: str) -> Iterator[bytes]:
    if options.tfds_name:
      return _catalog_texts(options, data_dir, split)
    return (_read(p) for p in split_files(options)[split])

  def examples(split: str) -> Iterator[dict[str, np.ndarray]]:
    tok = _tokenizer(options, lambda: texts("train"), tokenizer_path(data_dir, config_name))
    return pack((tok.encode(t) for t in texts(split) if t), seq_len)

  return BuildSpec(task=NAME, version=VERSION, features=features, identity=identity,
                   readable=readable, description=f"text {options} seq_len={seq_len}",
                   splits=splits, examples=examples)


def tokenizer(data_cfg) -> tokenizers.ByteTokenizer | tokenizers.SentencePieceTokenizer:
  """The tokenizer of a text config (SentencePiece: the one saved when the data was prepared)."""
  from effattn.data import pipeline

  r = pipeline.resolve(data_cfg)
  if r.task.name != NAME:
    raise ValueError(f"data.name={r.task.name!r} has no text tokenizer; use data.name='text'")
  if r.options.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  config_name = spec(r.options, seq_len=r.seq_len, seed=r.seed, data_dir=r.data_dir).config_name
  path = tokenizer_path(r.data_dir, config_name)
  if not os.path.exists(path):
    raise ValueError(f"no SentencePiece model at {path}: prepare the data first "
                     f"(effattn.data.load_split(config.data, 'train'))")
  return tokenizers.SentencePieceTokenizer(path)
