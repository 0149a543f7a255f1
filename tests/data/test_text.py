"""Text corpus: packing keeps every byte once, file-hash splits, SentencePiece, TFDS catalog."""

from __future__ import annotations

import os

import numpy as np
import pytest

from effattn.data import load_split, task_info, text, tokenizers
from effattn.testing.data import data_config

SEQ_LEN = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 files: short, empty, longer than several rows, UTF-8 and raw bytes, in subfolders."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(40):
    folder = root / f"d{i % 3}"
    folder.mkdir(exist_ok=True)
    size = [0, 1, 5, 63, 64, 65, 200, 500][i % 8]
    body = bytes(rng.integers(0, 256, size=size, dtype=np.uint8)) if i % 5 == 0 else (
        (f"doc {i}: héllo wörld ✓ " * 40).encode()[:size])
    (folder / f"f{i}.txt").write_bytes(body)
  return root


def _cfg(corpus, data_dir, **options):
  return data_config("text", data_dir, seq_len=SEQ_LEN, files=str(corpus / "**" / "*.txt"),
                     validation_fraction=0.2, test_fraction=0.2, **options)


def _documents(batch):
  """Splits the rows' tokens back into documents (each starts with BOS)."""
  inputs = batch["inputs"][batch["segment_ids"] > 0]
  targets = batch["targets"][batch["segment_ids"] > 0]
  starts = np.flatnonzero(inputs == tokenizers.BOS_ID)
  return ([inputs[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(inputs)])],
          [targets[a:b] for a, b in zip(starts, list(starts[1:]) + [len(inputs)])])


def test_packing_loses_and_duplicates_no_byte(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path)
  options = text.TextOptions(**cfg.text.to_dict())
  files = text.split_files(options)
  tok = tokenizers.ByteTokenizer()
  for split in text.SPLITS:
    source = load_split(cfg, split)
    batch = source.get_batch(range(len(source)))
    docs = [open(p, "rb").read() for p in files[split]]
    docs = [d for d in docs if d]
    total = sum(len(d) + 1 for d in docs)  # BOS + bytes per document
    assert len(source) == -(-total // SEQ_LEN)
    assert int(batch["weights"].sum()) == total
    inputs, targets = _documents(batch)
    assert [bytes((x - tokenizers.BYTE_OFFSET).astype(np.uint8)) for x in inputs] == docs
    for doc, tgt in zip(docs, targets):  # targets: the next token, EOS at the end
      assert np.array_equal(tgt, np.r_[tok.encode(doc), tokenizers.EOS_ID])
    # Segments: numbered 1.. within each row, positions restart at every segment.
    for seg, pos in zip(batch["segment_ids"], batch["positions"]):
      used = seg[seg > 0]
      assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
      assert np.all(pos[np.r_[True, np.diff(seg) != 0] & (seg > 0)] == 0)


def test_pack_splits_long_documents_across_rows():
  rows = list(text.pack(iter([np.arange(3, 13), np.array([7])]), seq_len=4))
  inputs = np.concatenate([r["inputs"] for r in rows])
  assert inputs.tolist() == [2, *range(3, 13), 2, 7, 0, 0, 0]
  assert [r["segment_ids"].tolist() for r in rows] == [[1] * 4, [1] * 4, [1, 1, 1, 2],
                                                       [1, 0, 0, 0]]  # renumbered per row


def test_file_hash_splits_are_disjoint_and_stable(corpus, tmp_path):
  options = text.TextOptions(files=str(corpus / "**" / "*.txt"), validation_fraction=0.2,
                             test_fraction=0.2)
  files = text.split_files(options)
  sets = [set(v) for v in files.values()]
  assert sum(map(len, sets)) == len(set().union(*sets)) == 40
  assert min(map(len, sets)) >= 3
  extra = corpus / "new_folder" / "zz_new.txt"  # also a new folder
  extra.parent.mkdir()
  extra.write_text("new file")
  try:
    after = text.split_files(options)
    for split in text.SPLITS:  # adding a file moves no other file
      assert set(files[split]) <= set(after[split])
  finally:
    extra.unlink()
    extra.parent.rmdir()


def test_default_corpus_is_the_standard_library():
  files = dict(text.local_files(text.TextOptions()))
  assert "os.py" in files and files["os.py"] == os.__file__
  assert not any("site-packages" in p for p in files.values()) and len(files) > 500
  files = text.split_files(text.TextOptions(max_files=200))
  assert len(files["train"]) > len(files["test"]) > 0


def test_bad_options_name_the_field(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"data.text.files='/nonexistent/\*.txt' matches no file"):
    load_split(data_config("text", tmp_path, seq_len=32, files="/nonexistent/*.txt"), "train")
  with pytest.raises(ValueError, match=r"data.text.tokenizer='bpe' must be"):
    task_info(data_config("text", tmp_path, seq_len=32, tokenizer="bpe"))
  with pytest.raises(ValueError, match=r"the test split got none of the 3 files"):
    load_split(data_config("text", tmp_path, seq_len=32, files=str(corpus / "d0" / "f1*.txt")),
               "train")
  with pytest.raises(ValueError, match=r"data.text.tfds_name='lm1b' is not prepared"):
    load_split(data_config("tfds:lm1b", tmp_path, seq_len=32), "train")


def test_sentencepiece_tokenizer_round_trips(tmp_path):
  pytest.importorskip("sentencepiece")
  import json as json_module  # a few real stdlib files as the corpus
  src = os.path.dirname(json_module.__file__)
  stdlib = os.path.dirname(src)
  files = ",".join(os.path.join(stdlib, d, "*.py") for d in ("json", "http", "urllib", "logging"))
  cfg = data_config("text", tmp_path, seq_len=128, files=files, tokenizer="sentencepiece",
                    vocab_size=512, validation_fraction=0.25, test_fraction=0.25)
  assert task_info(cfg).vocab_size == 512
  source = load_split(cfg, "train")
  tok = text.tokenizer(cfg)
  assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.vocab_size == 512
  assert os.path.exists(tok.model_path)
  options = text.TextOptions(**cfg.text.to_dict())
  inputs, _ = _documents(source.get_batch(range(len(source))))
  docs = [open(p, encoding="utf-8").read() for p in text.split_files(options)["train"]]
  assert [tok.decode(x) for x in inputs] == [d for d in docs if d]
  assert sum(map(len, inputs)) < 0.8 * sum(len(d.encode()) for d in docs)  # it compresses


def test_prepared_tfds_catalog_dataset_by_name(tmp_path):
  import tensorflow_datasets as tfds

  docs = ["first document", "second, longer document " * 5, "third ✓"]

  class FakeCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.2.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict(
                                       {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(docs), "test": self._generate_examples(docs[:1])}

    def _generate_examples(self, items):
      for i, d in enumerate(items):
        yield i, {"text": d}

  FakeCorpus(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  cfg = data_config("tfds:fake_corpus", tmp_path, seq_len=32)
  info = task_info(cfg)
  assert (info.name, info.vocab_size) == ("text", 259)
  source = load_split(cfg, "train")
  inputs, _ = _documents(source.get_batch(range(len(source))))
  assert [tokenizers.ByteTokenizer().decode(x) for x in inputs] == docs
  assert len(load_split(cfg, "test")) == 1
  cfg.text.text_key = "body"
  with pytest.raises(ValueError, match=r"data.text.text_key='body' is not a feature"):
    load_split(cfg, "test")
