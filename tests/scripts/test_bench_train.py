"""scripts/bench_train.py runs on synthetic batches, without TFDS, and reports every config."""

import json
import os
import subprocess
import sys

import pytest

from effattn.testing.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROGRAM = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_train", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
rows = bench.main(sys.argv[2:])
print("ROWS" + json.dumps({"rows": rows, "tfds": "tensorflow_datasets" in sys.modules}))
"""


def test_bench_train_tiny_on_cpu(tmp_path):
  args = ["--mechanisms=mha,swa", "--seq_lens=16", "--d_model=32", "--num_layers=1",
          "--num_heads=2", "--vocab_size=64", "--tokens_per_batch=64", "--steps=1",
          "--warmup=1", "--dtype=float32", "--window=8", f"--out={tmp_path}"]
  proc = subprocess.run([sys.executable, "-c", _PROGRAM,
                         os.path.join(ROOT, "scripts", "bench_train.py"), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("ROWS", 1)[1])
  assert not out["tfds"]  # the GPU image has no TFDS
  rows = out["rows"]
  assert [(r["mechanism"], r["seq_len"]) for r in rows] == [("mha", 16), ("swa", 16)]
  for r in rows:
    assert r["error"] is None and r["tokens_per_sec"] > 0 and r["batch"] * r["seq_len"] == 64
    assert r["kernels"] == 0  # CPU: XLA attention, no custom kernel
    assert r["peak_gib"] is None  # CPU keeps no allocator statistics
  assert "| swa | 16 |" in (tmp_path / "bench_train.md").read_text()
  assert "| kernels |" in (tmp_path / "bench_train.md").read_text()
  assert len(json.loads((tmp_path / "bench_train.json").read_text())["rows"]) == 2


def test_mechanism_options_in_the_spec():
  bench = load_script("bench_train")
  args = bench.parse_args(["--num_heads=8"])
  config = bench.make_config(args, "neural_memory:variant=lmm:chunk_size=32", 128)
  assert config.model.attention.name == "neural_memory"
  assert config.model.attention.neural_memory.variant == "lmm"
  assert config.model.attention.neural_memory.chunk_size == 32
  assert bench.make_config(args, "gqa:window=64", 128).model.attention.num_kv_heads == 2
  assert bench.make_config(args, "gqa:window=64", 128).model.attention.window == 64
  with pytest.raises(ValueError, match="'top_w' is neither an option of moh"):
    bench.make_config(args, "moh:top_w=2", 128)
  with pytest.raises(ValueError, match="is not option=value"):
    bench.split_spec("moh:top_k")
  assert bench.mechanism_names("mha,moh:top_k=2") == ["mha", "moh:top_k=2"]
  with pytest.raises(ValueError, match="neither baselines"):
    bench.mechanism_names("flash")
