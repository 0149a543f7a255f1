"""scripts/sweep.py: the grid, names, resume rules, results, and a tiny 2x2 sweep end to end."""

import csv
import json
import os
import subprocess
import sys

import pytest

from effattn.testing.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sweep_lib = load_script("sweep")  # once per process: tests/test_configs.py expands sweeps too

TINY = '''
def get_sweep():
  return {
      "name": "tiny",
      "config": "configs/mqar.py",
      "fixed": {"model.d_model": 16, "model.num_heads": 2, "train.steps": 2,
                "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 0,
                "checkpoint.every": 2, "checkpoint.async_save": False,
                "data.mqar.vocab_size": 32, "data.mqar.num_pairs": 2,
                "data.mqar.train_examples": 64, "data.mqar.test_examples": 16,
                "eval.batch_size": 8, "data.data_dir": DATA_DIR},
      "axes": {"attention": [{"label": "mha", "model.attention.name": "softmax"},
                             {"label": "swa4", "model.attention.name": "softmax",
                              "model.attention.window": 4}],
               "data.seq_len": [16]},  # one length: one dataset to build (CI time)
  }
'''


def _sweep(**kw):
  base = dict(name="s", config=os.path.join(ROOT, "configs", "mqar.py"), axes={
      "attention": [{"label": "a", "model.attention.name": "softmax"},
                    {"label": "b", "model.attention.name": "softmax",
                     "model.attention.window": 8}],
      "data.seq_len": [64, 128], "seed": [0, 1], "optimizer.learning_rate": [1e-3, 3e-3]})
  base.update(kw)
  return sweep_lib.Sweep(**base)


def test_grid_names_and_overrides():
  variants = sweep_lib.expand(_sweep())
  assert len(variants) == 16 and len({v.name for v in variants}) == 16
  v = variants[-1]
  assert v.name == "attention=b,seq_len=128,seed=1,learning_rate=0.003"
  assert v.overrides == {"model.attention.name": "softmax", "model.attention.window": 8,
                         "data.seq_len": 128, "seed": 1, "optimizer.learning_rate": 3e-3}
  flags = sweep_lib.override_flags(v.overrides)
  assert "--config.optimizer.learning_rate=0.003" in flags
  assert "--config.model.attention.window=8" in flags
  with pytest.raises(ValueError, match="repeated labels"):
    sweep_lib.expand(_sweep(axes={"attention": [{"label": "x", "a.b": 1}, {"label": "x"}]}))


def test_command_line_axes_and_sets(tmp_path):
  s = sweep_lib.load_sweep(os.path.join(ROOT, "configs", "mqar.py"),
                           ["data.seq_len=64,128", "config.model.attention.window=none,16"],
                           ["train.steps=10", "optimizer.learning_rate=3e-3"])
  assert s.axes == {"data.seq_len": [64, 128], "model.attention.window": [None, 16]}
  assert s.fixed == {"train.steps": 10, "optimizer.learning_rate": 0.003}
  assert sweep_lib.parse_value("true") is True and sweep_lib.parse_value("gated") == "gated"
  with pytest.raises(ValueError, match="must look like key=value"):
    sweep_lib.load_sweep(os.path.join(ROOT, "configs", "mqar.py"), ["data.seq_len"], [])
  bad = tmp_path / "bad.py"
  bad.write_text("X = 1\n")
  with pytest.raises(ValueError, match="neither get_sweep"):
    sweep_lib.load_sweep(str(bad), [], [])


def test_axis_values_holding_commas_are_separated_by_semicolons(tmp_path):
  mqar = os.path.join(ROOT, "configs", "mqar.py")
  s = sweep_lib.load_sweep(mqar, ["model.pattern=3*lightning,softmax:window=512;softmax",
                                  "data.seq_len=64,128"], ["model.num_layers=4"])
  assert s.axes == {"model.pattern": ["3*lightning,softmax:window=512", "softmax"],
                    "data.seq_len": [64, 128]}
  variant = sweep_lib.expand(s)[0]
  assert variant.overrides["model.pattern"] == "3*lightning,softmax:window=512"
  train = sweep_lib.commands(s, variant, str(tmp_path))[0]
  assert "--config.model.pattern=3*lightning,softmax:window=512" in train
  one = sweep_lib.load_sweep(mqar, ["model.pattern=3*lightning,softmax;"], [])
  assert one.axes == {"model.pattern": ["3*lightning,softmax"]}  # a trailing ';': one value
  with pytest.raises(ValueError, match="separate the axis' values with ';'"):
    sweep_lib.load_sweep(mqar, ["model.pattern=3*lightning,softmax"], [])
  for bad in ("data.seq_len=64,,128", "model.pattern=a;;b", "data.seq_len=", "data.seq_len=;"):
    with pytest.raises(ValueError, match="an empty value"):
      sweep_lib.load_sweep(mqar, [bad], [])


def test_default_sweep_has_the_baselines_and_every_registered_mechanism():
  from effattn import attention

  s = sweep_lib.load_sweep(os.path.join(ROOT, "configs", "sweeps", "mqar_mechanisms.py"), [], [])
  labels = [e["label"] for e in s.axes["attention"]]
  assert labels[:3] == ["mha", "gqa", "swa32"]
  assert set(labels[3:]) == set(attention.names()) - {"softmax"}
  assert {"data.seq_len", "seed", "optimizer.learning_rate"} <= set(s.axes)


def test_family_sweeps_cover_every_registered_mechanism():
  from effattn import attention

  for name in ("mqar_families.py", "passkey_families.py"):
    s = sweep_lib.load_sweep(os.path.join(ROOT, "configs", "sweeps", name), [], [])
    used = {e["model.attention.name"] for e in s.axes["attention"]}
    assert used == set(attention.names()), name


def test_processes_can_share_a_gpu():
  one = sweep_lib.device_env("gpu", "0", 0)
  assert one["CUDA_VISIBLE_DEVICES"] == "0" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in one
  four = sweep_lib.device_env("gpu", "1", 3, per_device=4)
  assert four["CUDA_VISIBLE_DEVICES"] == "1"
  assert float(four["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.2)
  assert four["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_aggregate_means_seeds_then_takes_the_best_other_setting():
  s = _sweep()
  rows = []
  for v in sweep_lib.expand(s):
    acc = 0.5 + 0.1 * v.overrides["seed"] + (0.3 if v.overrides["optimizer.learning_rate"] ==
                                             3e-3 else 0.0)
    rows.append({**{a: v.overrides.get(a, lab) for a, lab in v.labels.items()},
                 "status": "done", "eval_accuracy": acc, "tokens_per_sec": 100.0})
  points = sweep_lib.aggregate(s, rows)
  assert len(points) == 4  # 2 mechanisms x 2 lengths
  for p in points:
    assert p["quality"] == pytest.approx(0.85)  # lr 3e-3, mean of seeds 0.8 and 0.9
    assert p["best"] == {"optimizer.learning_rate": 3e-3} and p["seeds"] == 2
  assert sweep_lib.pareto([(1, 0.5), (2, 0.4), (3, 0.45), (0.5, 0.9)]) == [
      (3, 0.45), (1, 0.5), (0.5, 0.9)]
  assert sweep_lib.pareto([(1, 2.0), (2, 3.0)], higher_is_better=False) == [(2, 3.0), (1, 2.0)]


def test_resume_rules_and_launch_script(tmp_path, monkeypatch):
  s = _sweep(axes={"data.seq_len": [64, 128]})
  variants = sweep_lib.expand(s)
  wd = str(tmp_path / variants[0].name)
  os.makedirs(wd)
  json.dump({"train": {"steps": 50}}, open(os.path.join(wd, "config.json"), "w"))
  assert not sweep_lib.is_done(s, wd)  # interrupted: no eval at the final step
  json.dump({"step": 40}, open(os.path.join(wd, "eval.json"), "w"))
  assert not sweep_lib.is_done(s, wd)
  json.dump({"step": 50}, open(os.path.join(wd, "eval.json"), "w"))
  assert sweep_lib.is_done(s, wd)
  assert sweep_lib.run_variant(s, variants[0], wd, {})["status"] == "skipped"

  # An unfinished variant is started again with the same command (train.py resumes it).
  calls = []
  monkeypatch.setattr(sweep_lib.subprocess, "run",
                      lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
  wd2 = str(tmp_path / variants[1].name)
  assert sweep_lib.run_variant(s, variants[1], wd2, {})["status"] == "done"
  assert calls == sweep_lib.commands(s, variants[1], wd2)
  other = sweep_lib.Variant(variants[1].name, variants[1].labels, {"data.seq_len": 256})
  with pytest.raises(ValueError, match="other overrides"):
    sweep_lib.run_variant(s, other, wd2, {})

  path = sweep_lib.write_launch_script(s, variants, str(tmp_path))
  lines = open(path).read().splitlines()
  assert len(lines) == 2 + len(variants)
  assert "--config.data.seq_len=128" in lines[1 + 2] and "eval.py" in lines[1 + 2]


def test_tiny_sweep_end_to_end(tmp_path):
  """A 2 x 1 grid on CPU through the command line: trains, evaluates, tables and plots (grid
  expansion over several axes: test_grid_names_and_overrides)."""
  spec = tmp_path / "tiny.py"
  spec.write_text(f"DATA_DIR = {str(tmp_path / 'data')!r}\n" + TINY)
  out = tmp_path / "sweep"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), f"--config={spec}",
         f"--workdir={out}", "--mode=parallel", "--parallel=2"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["attention"], r["data.seq_len"]) for r in rows] == [("mha", "16"), ("swa4", "16")]
  assert all(r["status"] == "done" and r["step"] == "2" for r in rows)
  assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 and float(r["tokens_per_sec"]) > 0
             for r in rows)
  for png in ("accuracy_vs_seq_len.png", "tokens_per_sec_vs_seq_len.png", "frontier.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  assert "| mha |" in (out / "results.md").read_text()
  # Run again: every variant is finished, so nothing trains.
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert again.returncode == 0 and again.stdout.count(": skipped") == 2, again.stdout[-2000:]
