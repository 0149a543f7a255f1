"""Tokenizers of the text-based tasks: bytes by default, SentencePiece trained locally as an option.

Both share the special ids (ByT5's layout, with BOS where ByT5 has UNK):

    0 PAD   1 EOS   2 BOS   then bytes 0..255 as 3..258 (ByteTokenizer, vocab 259)
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
BYTE_OFFSET = 3


class ByteTokenizer:
  """UTF-8 bytes as tokens: lossless for any text, no training, vocab 259."""

  vocab_size = 256 + BYTE_OFFSET

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids int32 [n] of the text's UTF-8 bytes (no BOS/EOS added)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the byte tokens in `ids`; special tokens are dropped."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
    data = (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model (needs the `sentencepiece` package: `pip install -e ".[data]"`)."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # optional dependency

    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID, BOS_ID)]
    return self._sp.decode(ids)


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int, *,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` into `model_path` (+ .vocab) and loads it.

  Special ids match the byte tokenizer (PAD 0, EOS 1, BOS 2, UNK 3), so packing and padding
  are the same for both. SentencePiece's training is not bit-reproducible across runs, which is
  why the model is saved next to the data it tokenized.
  """
  try:
    import sentencepiece as spm
  except ImportError as e:
    raise ValueError("data.text.tokenizer='sentencepiece' needs the sentencepiece package: "
                     "pip install -e '.[data]' (or use tokenizer='byte')") from e
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
  # Trained to a temporary prefix then renamed, so a crash never leaves a half-written model.
  tmp = f"{prefix}.tmp{os.getpid()}"
  # Identity normalization and kept whitespace make decode(encode(text)) == text (code is
  # full of meaningful spaces); byte fallback encodes every character never seen in training.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=tmp, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=3,
      byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  for ext in (".model", ".vocab"):
    os.replace(tmp + ext, prefix + ext)
  return SentencePieceTokenizer(prefix + ".model")
