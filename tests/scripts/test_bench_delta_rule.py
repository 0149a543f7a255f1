"""scripts/bench_delta_rule.py on CPU: a --smoke run checks the kernels and reports its rows."""

import json

import pytest

from effattn.testing.scripts import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("bench_delta_rule")


def test_smoke_run_checks_and_times_the_kernels(bench, tmp_path):
  results = bench.main(["--smoke", f"--out={tmp_path}"])
  checks = results["info"]["correctness"]  # one per backward, each before its timing
  assert [c["case"].split()[0] for c in checks] == ["backward=fused", "backward=split"]
  for check in checks:
    assert check["ok"], check
    assert set(check["errs"]) == set(bench.CHECK_NAMES)
  rows = results["rows"]
  assert [r["impl"] for r in rows] == ["ours pallas_gpu fused", "ours pallas_gpu split"]
  for row in rows:
    assert row["T"] == 64 and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert row["fwd_bwd_kernels"] == 0  # interpret mode: no custom calls on CPU
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(rows, default=str))
  assert "| 64 | ours pallas_gpu split |" in (tmp_path / "table.md").read_text()


def test_table_sets_ours_beside_fla(bench):
  ours = {"impl": "ours pallas_gpu", "T": 8192, "fwd_ms": 2.0, "fwd_bwd_ms": 5.0,
          "fwd_kernels": 3, "fwd_bwd_kernels": 6}
  fla = {"impl": "fla chunk_gated_delta_rule", "T": 8192, "fwd_ms": 3.0, "fwd_bwd_ms": 6.0}
  failed = {"impl": "fla chunk_gated_delta_rule", "T": 32768, "error": "OutOfMemoryError()"}
  table = bench.markdown([ours], [fla, failed], {"device": "H200"})
  assert "| 8192 | ours pallas_gpu | 2.000 | 5.000 |" in table and "1.50x / 1.20x" in table
  assert "| 3 / 6 |" in table and "| 32768 | fla chunk_gated_delta_rule | error |" in table


def test_ungated_form_zeroes_the_gates_and_names_fla_s_ungated_op(bench, monkeypatch):
  # parse_args sets module state: each piece is restored after the test.
  for name in ("B", "H", "D"):
    monkeypatch.setattr(bench, name, getattr(bench, name))
  monkeypatch.setattr(bench, "CHECK", dict(bench.CHECK))
  monkeypatch.setitem(bench.SMOKE, "on", bench.SMOKE["on"])
  monkeypatch.setitem(bench.FORM, "gated", True)
  args = bench.parse_args(["--form", "ungated", "--smoke"])
  assert args.form == "ungated" and not bench.FORM["gated"]
  q, k, v, g, beta, *_ = bench.make_inputs(0, 1, 8, 2, 16)
  assert (g == 0).all() and (beta > 0).all() and (beta < 1).all()
  table = bench.markdown([], [], {"device": "H200", "form": args.form})
  assert "ungated form" in table
  monkeypatch.setitem(bench.FORM, "gated", True)
  assert (bench.make_inputs(0, 1, 8, 2, 16)[3] < 0).all()  # logsigmoid: a decay every token
