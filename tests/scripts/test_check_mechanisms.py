"""scripts/check_mechanisms.py: its CPU self-test, in one process and in one per mechanism."""

import json
import os
import subprocess
import sys

from effattn.testing.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "check_mechanisms.py")


def run(*args, tmp_path):
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--out={tmp_path}", *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  with open(tmp_path / "check.json") as f:
    return proc, json.load(f)["rows"]


def test_jobs_check_each_mechanism_in_its_own_process_and_keep_the_order(tmp_path):
  """Two children at once; an unknown mechanism is an error row, the others still pass, and
  the run's exit status says a row failed."""
  proc, rows = run("--mechanisms=linear,nope,softmax", "--jobs=2", tmp_path=tmp_path)
  assert [r["mechanism"] for r in rows] == ["linear", "nope", "softmax"]
  assert rows[0]["ok"] and rows[2]["ok"], proc.stderr[-2000:]
  assert "nope" in rows[1]["error"] and "ok" not in rows[1]
  assert proc.returncode == 1


def test_the_interpreted_gpu_kernels_pass_in_one_process(tmp_path):
  """--interpret gpu: the auto path runs the Pallas GPU kernels in interpret mode against the
  xla path, so the row compares two different implementations."""
  proc, rows = run("--mechanisms=linear", "--interpret=gpu", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (row,) = rows
  assert row["ok"] and row["worst"]["auto"] > 0.0  # not the xla path twice


def test_children_get_the_flags_but_their_own_mechanisms_out_and_jobs():
  script = load_script("check_mechanisms")
  argv = ["--smoke", "--jobs", "3", "--mechanisms=a,b", "--out", "/x", "--dtype=float32",
          "--jobs=2", "--precision", "tensorfloat32"]
  assert script.child_argv(argv) == ["--smoke", "--dtype=float32", "--precision",
                                     "tensorfloat32"]
