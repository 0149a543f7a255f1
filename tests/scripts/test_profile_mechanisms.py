"""scripts/profile_mechanisms.py: every group plans its rows, and a CPU smoke run at tiny sizes
times layers and stages, old against new, with the outputs of both variants compared."""

import json

import pytest

from effattn.testing.scripts import load_script


def test_every_group_plans_its_entries():
  profile = load_script("profile_mechanisms")
  plan = profile.entries(profile.parse_args([]))
  labels = [label for _, label, _ in plan]
  assert labels[:3] == ["mha", "dynamic_mask old", "dynamic_mask new"]
  assert labels[-1] == "neural_memory mac"  # the slowest to compile last (--max_seconds)
  assert {"neural_memory mag old", "neural_memory mag new", "neural_memory mal old",
          "neural_memory lmm", "neural_memory mac", "moh 75%", "moh 50%", "landmark",
          "landmark block 63"} <= set(labels)
  specs = dict((label, spec) for _, label, spec in plan)
  assert specs["moh 50%"] == "moh:num_shared_heads=2:top_k=2"
  assert specs["dynamic_mask old"] == "dynamic_mask:select_impl=dense"
  new_only = profile.entries(profile.parse_args(["--variants=new", "--groups=neural_memory"]))
  assert [label for _, label, _ in new_only] == [
      "neural_memory mag new", "neural_memory mal new", "neural_memory lmm", "neural_memory mac"]
  with pytest.raises(ValueError, match="--groups"):
    profile.entries(profile.parse_args(["--groups=flash"]))


def test_smoke_run_on_cpu(tmp_path):
  profile = load_script("profile_mechanisms")
  # One group: the other groups' entries are planned by test_every_group_plans_its_entries.
  rows = profile.main(["--smoke", "--groups=dynamic_mask", f"--out={tmp_path}",
                       "--rows=mask old layer,mask new layer,selection"])
  assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
  names = [(r["entry"], r["row"]) for r in rows]
  assert names == [("dynamic_mask old", "layer"), ("dynamic_mask old", "top-w selection (dense)"),
                   ("dynamic_mask new", "layer"), ("dynamic_mask new", "top-w selection (ranked)")]
  assert rows[2]["diff"] == 0.0  # the ranked selection keeps exactly the dense one's keys
  for r in rows:
    assert r["ms"] > 0 and r["kernels"] == 0 and r["temp_gib"] is not None
  table = (tmp_path / "profile.md").read_text()
  assert "| dynamic_mask new | top-w selection (ranked) |" in table
  assert len(json.loads((tmp_path / "profile.json").read_text())["rows"]) == len(rows)
