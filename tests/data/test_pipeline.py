"""Input pipeline: determinism from (seed, step), splits, eval padding, errors."""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from effattn.data import (batch_at, batch_indices, eval_batches, load_split, make_iterator,
                          positions_from_segments, task_info)
from effattn.data import mqar, pipeline
from effattn.testing.data import TINY_MQAR, data_config

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def _equal(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_format(mqar_cfg):
  batch = batch_at(load_split(mqar_cfg, "train"), 0, 8, seed=0)
  assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
  for k in BATCH_KEYS:
    assert batch[k].shape == (8, 32), k
  assert batch["weights"].dtype == np.float32
  for k in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[k].dtype == np.int32, k
  assert np.all(batch["segment_ids"] == 1)
  assert np.all(batch["positions"] == np.arange(32))


def test_generation_is_deterministic(tmp_path):
  a = data_config("mqar", tmp_path / "a", seq_len=32, **TINY_MQAR)
  b = data_config("mqar", tmp_path / "b", seq_len=32, **TINY_MQAR)
  c = data_config("mqar", tmp_path / "c", seq_len=32, seed=1, **TINY_MQAR)
  sa, sb, sc = (load_split(cfg, "test") for cfg in (a, b, c))
  everything = np.arange(len(sa))
  assert _equal(sa.get_batch(everything), sb.get_batch(everything))
  assert not np.array_equal(sa.get_batch(everything)["inputs"], sc.get_batch(everything)["inputs"])


def test_options_never_share_a_directory(mqar_cfg, tmp_path):
  other = data_config("mqar", mqar_cfg.data_dir, seq_len=32, **{**TINY_MQAR, "power_a": 0.5})
  longer = data_config("mqar", mqar_cfg.data_dir, seq_len=40, **TINY_MQAR)
  paths = {load_split(cfg, "test").path for cfg in (mqar_cfg, other, longer)}
  assert len(paths) == 3
  assert load_split(mqar_cfg, "test").path in paths  # same options: same directory again


def test_splits_are_disjoint(mqar_cfg):
  rows = {}
  for split in ("train", "test"):
    source = load_split(mqar_cfg, split)
    rows[split] = {r.tobytes() for r in source.get_batch(range(len(source)))["inputs"]}
    assert len(rows[split]) == len(source)
  assert not rows["train"] & rows["test"]


def test_batch_is_a_pure_function_of_seed_and_step(mqar_cfg):
  source = load_split(mqar_cfg, "train")
  first = batch_at(source, 5, 16, seed=3)
  for step in (0, 9, 2):  # any history in between
    batch_at(source, step, 16, seed=3)
  assert _equal(first, batch_at(load_split(mqar_cfg, "train"), 5, 16, seed=3))
  assert not np.array_equal(first["inputs"], batch_at(source, 6, 16, seed=3)["inputs"])
  assert not np.array_equal(first["inputs"], batch_at(source, 5, 16, seed=4)["inputs"])


def test_iterator_resumes_exactly(mqar_cfg):
  it = make_iterator(mqar_cfg, "train", 16, seed=7)
  full = [next(it) for _ in range(6)]
  resumed = make_iterator(mqar_cfg, "train", 16, seed=7, start_step=4, prefetch=0)
  assert _equal(next(resumed), full[4]) and _equal(next(resumed), full[5])
  source = load_split(mqar_cfg, "train")
  for step, batch in enumerate(full):
    assert _equal(batch, batch_at(source, step, 16, seed=7))


def test_each_epoch_is_a_permutation():
  n, b = 60, 16  # batches straddle epoch boundaries
  flat = np.concatenate([batch_indices(n, s, b, seed=0) for s in range(15)])  # 4 epochs
  for e in range(4):
    assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(flat[:n], flat[n:2 * n])  # reshuffled every epoch
  assert np.array_equal(batch_indices(n, 1, b, seed=0, shuffle=False), np.arange(16, 32))
  assert np.array_equal(batch_indices(n, 3, b, seed=0, shuffle=False),
                        np.r_[48:60, 0:4])


def test_process_slices_make_the_global_batch(mqar_cfg):
  source = load_split(mqar_cfg, "train")
  whole = batch_at(source, 2, 8, seed=0)
  parts = [batch_at(source, 2, 8, seed=0, process_index=i, process_count=2) for i in range(2)]
  for k in BATCH_KEYS:
    assert np.array_equal(whole[k][0::2], parts[0][k])
    assert np.array_equal(whole[k][1::2], parts[1][k])
  with pytest.raises(ValueError, match="process_count"):
    batch_at(source, 0, 7, seed=0, process_count=2)


def test_eval_batches_cover_the_split_once_in_order(mqar_cfg):
  source = load_split(mqar_cfg, "test")  # 60 examples
  batches = list(eval_batches(mqar_cfg, "test", 25))
  assert [b["inputs"].shape[0] for b in batches] == [25, 25, 25]
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in BATCH_KEYS}
  everything = source.get_batch(range(60))
  for k in BATCH_KEYS:
    assert np.array_equal(stacked[k][:60], everything[k])
  assert np.all(stacked["weights"][60:] == 0) and np.all(stacked["segment_ids"][60:] == 0)
  assert sum(b["weights"].sum() for b in batches) == 60 * 4
  capped = list(eval_batches(mqar_cfg, "test", 25, max_examples=30))
  assert len(capped) == 2 and capped[1]["weights"][5:].sum() == 0


def test_positions_from_segments():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]


def test_import_needs_no_tfds_and_build_needs_no_tensorflow(tmp_path):
  # A fresh interpreter: nothing imported by other tests. Where TensorFlow is not installed (CI)
  # any import of it fails; where it is, the last assert catches it.
  script = f"""
import sys
import effattn.data, effattn.data.registry, effattn.data.mqar
assert "tensorflow_datasets" not in sys.modules, "importing effattn.data imported tfds"
from effattn.testing.data import data_config
cfg = data_config("mqar", {str(tmp_path)!r}, seq_len=16, vocab_size=32, num_pairs=2,
                  train_examples=20, test_examples=10)
b = effattn.data.batch_at(effattn.data.load_split(cfg, "train"), 0, 4, seed=0)
assert b["inputs"].shape == (4, 16)
assert "tensorflow" not in sys.modules, "preparing or reading data imported tensorflow"
print("ok")
"""
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=os.getcwd())
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
  assert glob.glob(str(tmp_path / "effattn_mqar" / "*" / "*" / "*.array_record*"))


def test_unknown_task_lists_the_known(tmp_path):
  cfg = data_config("mqar", tmp_path, seq_len=32)
  cfg.name = "mqra"
  with pytest.raises(ValueError, match=r"data.name='mqra'.*known: \[.*'mqar'"):
    task_info(cfg)


@pytest.mark.parametrize("change,match", [
    (dict(num_pairs=9), r"data.mqar.num_pairs=9 needs data.seq_len >= 4 \* num_pairs = 36"),
    (dict(num_pairs=40, vocab_size=64), r"data.mqar.num_pairs=40 must be in \[1, .* 31\]"),
    (dict(power_a=0.0), r"data.mqar.power_a=0.0 must be > 0"),
    (dict(test_examples=0), r"data.mqar.test_examples=0 must be >= 1"),
])
def test_bad_options_name_the_field(tmp_path, change, match):
  with pytest.raises(ValueError, match=match):
    task_info(data_config("mqar", tmp_path, seq_len=32, **{**TINY_MQAR, **change}))


def test_unknown_option_and_bad_common_fields(tmp_path):
  cfg = data_config("mqar", tmp_path, seq_len=32)
  cfg.mqar.num_kv_pairs = 8
  with pytest.raises(ValueError, match=r"data.mqar.num_kv_pairs is not an option of mqar"):
    task_info(cfg)
  with pytest.raises(ValueError, match=r"data.seq_len=1 must be an int >= 2"):
    task_info(data_config("mqar", tmp_path, seq_len=1))
  with pytest.raises(ValueError, match=r"data.seed=-1"):
    task_info(data_config("mqar", tmp_path, seq_len=32, seed=-1))
  with pytest.raises(ValueError, match=r"split='validation' is not a split of mqar"):
    load_split(data_config("mqar", tmp_path, seq_len=16, vocab_size=32, num_pairs=2,
                           train_examples=20, test_examples=10), "validation")


def test_data_dir_that_is_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"data.data_dir=.*is not a directory"):
    load_split(data_config("mqar", tmp_path / "file", seq_len=32, **TINY_MQAR), "test")


def test_corrupt_data_is_reported(tmp_path):
  cfg = data_config("mqar", tmp_path, seq_len=16, vocab_size=32, num_pairs=2, train_examples=20,
                    test_examples=10)
  path = load_split(cfg, "test").path
  for f in glob.glob(os.path.join(path, "*-test.array_record*")):
    os.remove(f)
  with pytest.raises(ValueError, match=r"incomplete or corrupt.*delete that directory"):
    load_split(cfg, "test")


def test_too_small_an_example_space_fails_clearly(tmp_path):
  # 2 pairs from a 6-token vocabulary at seq_len 8 without noise: few distinct sequences.
  cfg = data_config("mqar", tmp_path, seq_len=8, vocab_size=6, num_pairs=2, train_examples=500,
                    test_examples=10, random_non_queries=False)
  with pytest.raises(ValueError, match=r"too few distinct sequences"):
    load_split(cfg, "train")


def test_default_data_dir_is_expanded(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  cfg = data_config("mqar", "", seq_len=32)
  assert pipeline.resolve(cfg).data_dir == str(tmp_path / "effattn_data")
  assert dataclasses.asdict(pipeline.resolve(cfg).options) == dataclasses.asdict(
      mqar.MqarOptions())


def test_concurrent_processes_prepare_once_and_read_the_same(tmp_path):
  script = f"""
import sys
from effattn.testing.data import data_config
import effattn.data
cfg = data_config("mqar", {str(tmp_path)!r}, seq_len=32, vocab_size=64, num_pairs=4,
                  train_examples=3000, test_examples=50)
b = effattn.data.batch_at(effattn.data.load_split(cfg, "train"), 1, 4, seed=0)
print(b["inputs"].sum())
"""
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  last_lines = [out.strip().splitlines()[-1] for out, _ in outs]
  assert last_lines[0] == last_lines[1]
  assert sum("Downloading and preparing" in out for out, _ in outs) == 1  # one generated
  versions = glob.glob(str(tmp_path / "effattn_mqar" / "*" / "*"))
  assert [os.path.basename(v) for v in versions] == ["1.0.0"], versions  # no leftovers


@pytest.mark.parametrize("name", ["mqar", "listops"])
def test_without_tfds_the_same_data_is_generated_in_memory(name, tmp_path):
  kwargs = (dict(seq_len=32, **TINY_MQAR) if name == "mqar" else
            dict(seq_len=40, min_length=5, max_length=40, max_depth=4, train_examples=30,
                 validation_examples=10, test_examples=10))
  cfg = data_config(name, tmp_path, **kwargs)
  on_disk = {split: batch_at(load_split(cfg, split), 1, 8, seed=5) for split in ("train", "test")}
  # sys.modules[name] = None makes `import tensorflow_datasets` raise ImportError.
  script = f"""
import sys
sys.modules["tensorflow_datasets"] = None
import numpy as np
import effattn.data
from effattn.testing.data import data_config
cfg = data_config({name!r}, {str(tmp_path / "unused")!r}, **{kwargs!r})
out = {{}}
for split in ("train", "test"):
  for k, v in effattn.data.batch_at(effattn.data.load_split(cfg, split), 1, 8, seed=5).items():
    out[split + "/" + k] = v
np.savez({str(tmp_path / "memory.npz")!r}, **out)
"""
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "generating" in done.stderr and not (tmp_path / "unused").exists()
  in_memory = np.load(tmp_path / "memory.npz")
  for split, batch in on_disk.items():
    for k, v in batch.items():
      assert np.array_equal(in_memory[f"{split}/{k}"], v), (split, k)
