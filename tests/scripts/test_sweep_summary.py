"""scripts/sweep.py reads the `summary` of every extra eval task's report into its tables as
eval_<name> columns (the attention entropy of configs/sweeps/claims/mala_mqar.py)."""

import json
import os

from effattn.testing.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sweep_lib = load_script("sweep")


def _write(path, report):
  with open(path, "w") as f:
    json.dump(report, f)


def test_extra_task_summaries_become_columns(tmp_path):
  sweep = sweep_lib.Sweep(name="s", config=os.path.join(ROOT, "configs", "mqar.py"),
                          axes={"attention": [{"label": "a", "model.attention.name": "softmax"},
                                              {"label": "b", "model.attention.name": "linear"}]},
                          eval_tasks=("accuracy", "entropy"))
  variants = sweep_lib.expand(sweep)
  for variant, norm in zip(variants, (0.25, 0.75)):
    wd = tmp_path / variant.name
    os.makedirs(wd)
    _write(wd / "config.json", {"train": {"steps": 5}, "data": {"seq_len": 64}})
    _write(wd / "eval.json", {"step": 5, "accuracy": 0.5, "loss": 1.0})
    _write(wd / "eval_entropy.json", {"step": 5, "summary": {"entropy_norm": norm},
                                      "layers": [{"entropy_norm": [norm]}]})
  rows, text = sweep_lib.collect(sweep, variants, str(tmp_path))
  assert [r["eval_entropy_norm"] for r in rows] == [0.25, 0.75]
  assert all(r["status"] == "done" for r in rows)
  header = text.split("## All variants")[1].strip().splitlines()[0]
  assert "eval_entropy_norm" in header and "layers" not in header
  assert "eval_entropy_norm" in open(tmp_path / "results.csv").readline()
