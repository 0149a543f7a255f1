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


def _restore_module_state(bench, monkeypatch):
  """parse_args sets module state: each piece is restored after the test."""
  for name in ("B", "H", "D"):
    monkeypatch.setattr(bench, name, getattr(bench, name))
  monkeypatch.setattr(bench, "CHECK", dict(bench.CHECK))
  monkeypatch.setitem(bench.SMOKE, "on", bench.SMOKE["on"])
  monkeypatch.setitem(bench.FORM, "gated", True)
  monkeypatch.setattr(bench, "BASE", dict(bench.BASE))


def test_block_sizes_option_moves_every_part_s_default(bench, monkeypatch):
  _restore_module_state(bench, monkeypatch)
  bench.parse_args(["--smoke", "--block-sizes", "keep_w=False,num_stages_parallel=3,"
                                                  "unrolled=bwd_dqk+bwd_prep"])
  sizes = bench.block_sizes_for("split")
  assert not sizes.keep_w and sizes.num_stages_parallel == 3 and sizes.backward == "split"
  assert sizes.unrolled == ("bwd_dqk", "bwd_prep")
  assert bench.candidates("split")[0] == sizes
  for bad, word in (("keep=True", "field=value"), ("num_stages_parallel=0", "num_stages_parallel")):
    with pytest.raises(SystemExit):
      bench.parse_args(["--smoke", "--block-sizes", bad])
    with pytest.raises(ValueError, match=word):
      bench.parse_block_sizes(bad)


def test_ungated_form_zeroes_the_gates_and_names_fla_s_ungated_op(bench, monkeypatch):
  _restore_module_state(bench, monkeypatch)
  args = bench.parse_args(["--form", "ungated", "--smoke"])
  assert args.form == "ungated" and not bench.FORM["gated"]
  q, k, v, g, beta, *_ = bench.make_inputs(0, 1, 8, 2, 16)
  assert (g == 0).all() and (beta > 0).all() and (beta < 1).all()
  table = bench.markdown([], [], {"device": "H200", "form": args.form})
  assert "ungated form" in table
  monkeypatch.setitem(bench.FORM, "gated", True)
  assert (bench.make_inputs(0, 1, 8, 2, 16)[3] < 0).all()  # logsigmoid: a decay every token


@pytest.fixture
def smoke(bench, monkeypatch):
  """The module in --smoke state (tiny shapes, interpret mode), restored after the test."""
  _restore_module_state(bench, monkeypatch)
  bench.parse_args(["--smoke"])
  return bench


def test_breakdown_times_each_kernel_the_op_runs_and_the_sweep_checks_first(smoke, monkeypatch):
  bench, cache = smoke, {}
  default = bench.block_sizes_for("split")
  op = {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0, "fwd_bwd_kernels": 0}  # the op's row, as timed
  res, outs, base = bench.kernel_breakdown(128, "split", op, default, cache)
  names = [r["kernel"] for r in res["rows"]]
  assert names == ["delta_rule_wy", "delta_rule_fwd", "delta_rule_out", "delta_rule_bwd_prep",
                   "delta_rule_dstate", "delta_rule_bwd_dqk", "delta_rule_bwd_wy"]
  assert res["rows"][1]["grid"] == "1x1x2" and res["rows"][5]["grid"] == "1x2x1x2"  # walk, dqk
  for r in res["rows"]:
    assert r["ms"] > 0 and r["mib"] > 0 and r["share"] == r["ms"] / 4.0
  assert res["kernels_ms"] == pytest.approx(res["fwd_kernels_ms"] + res["bwd_kernels_ms"])
  assert res["custom_kernels_alone"] == 0  # interpret mode: no custom calls on CPU
  assert set(outs) == set(bench.OP_OUTPUTS) and len(cache) == 7
  table = bench.breakdown_markdown(res)
  assert "| delta_rule_bwd_dqk | 1x2x1x2 |" in table and "NOTE" not in table

  # The sweep: num_warps_bwd changes bwd_wy's program only, so only it is timed again.
  monkeypatch.setattr(bench, "kernel_candidates", lambda: [dict(num_warps_bwd=2)])
  monkeypatch.setattr(bench, "MIN_GAIN", -1.0)  # any candidate wins: the union path runs too
  sweep = bench.tune_kernels(128, "split", base, outs, cache, float("inf"))
  (row,) = sweep["rows"]
  assert row["ok"] and row["max_err"] == 0.0 and set(row["kernel_ms"]) == {"delta_rule_bwd_wy"}
  assert sweep["best"] == {"num_warps_bwd": 2} and len(cache) == 8
  assert "bwd_wy" in bench.tune_kernels_markdown(sweep)
  # A candidate whose outputs differ from the default's is not timed.
  wrong = dict(outs, dq=2 * outs["dq"])
  bad = bench.sweep_candidate(dict(num_warps_bwd=2), 128, "split", base, wrong, cache)
  assert not bad["ok"] and bad["max_err"] == pytest.approx(0.5) and "kernel_ms" not in bad
  late = bench.tune_kernels(128, "split", base, outs, cache, deadline=0.0)
  assert late["rows"][0]["skipped"] == "deadline" and late["best"] == {}


def test_kernel_parts_wire_breakdown_sweep_and_the_winner_s_row(smoke, monkeypatch):
  bench = smoke
  calls = []
  monkeypatch.setattr(bench, "kernel_breakdown", lambda t, backward, op, bs, cache: (
      calls.append(("breakdown", t, op)) or ({"T": t, "rows": []}, {}, {})))
  monkeypatch.setattr(bench, "tune_kernels", lambda t, backward, *a, **k: (
      calls.append(("sweep", t)) or {"rows": [], "best": {"block_k": 32}}))
  monkeypatch.setattr(bench, "ours_row", lambda name, t, *a: {"impl": name, "T": t})
  monkeypatch.setattr(bench, "tune_kernels_markdown", lambda res: "")
  args = bench.parse_args(["--smoke", "--kernel-sizes", "64,128", "--tune-kernels"])
  rows = [{"impl": "ours pallas_gpu split", "T": 64, "fwd_bwd_ms": 1.0}]
  info = {"block_sizes": {"split": str(bench.block_sizes_for("split"))}, "kernels": {},
          "tune_kernels": {}}
  bench.kernel_parts(args, ["split"], rows, info, lambda r: None, lambda: "", 0.0)
  assert calls == [("breakdown", 64, rows[0]), ("sweep", 64), ("breakdown", 128, None)]
  assert rows[-1]["impl"] == "ours pallas_gpu split kernel-tuned" and rows[-1]["T"] == 64
  assert "block_k=32" in rows[-1]["block_sizes"] and set(info["kernels"]) == {
      "split T=64", "split T=128"}


def test_fwd_bwd_sweep_times_only_candidates_that_match_the_checked_default(smoke, monkeypatch):
  bench = smoke
  import dataclasses

  import jax.numpy as jnp
  default = bench.block_sizes_for("split")
  good, bad = (dataclasses.replace(default, num_warps_bwd=8),
               dataclasses.replace(default, num_warps_bwd=2))
  monkeypatch.setattr(bench, "candidates", lambda backward: [default, good, bad])
  factor = {default: 1.0, good: 1.0 + 1e-4, bad: 1.5}  # bad: a wrong tile's outputs

  def ours(cfg):
    fb = lambda q, k, v, g, beta, do: (factor[cfg] * q, (k, factor[cfg] * v))  # noqa: E731
    return None, fb
  monkeypatch.setattr(bench, "ours", ours)
  best, tuning = bench.tune_block_sizes([64], "split")
  assert tuning[f"T=64 {default}"] > 0 and tuning[f"T=64 {good}"] > 0
  assert jnp.isnan(tuning[f"T=64 {bad}"]) and tuning["best"] == str(best) and best != bad


def test_sweep_checks_the_new_block_size_options_and_times_only_their_kernels(smoke):
  """wy_form="split" (alone and at num_warps_wy 4), the earlier walk_form="scaled_keys" and
  unrolled=() (pallas_gpu.BlockSizes' defaults are "scaled_values" and ("bwd_dqk",) since the
  second H200 sweep of 2026-12-04) are --tune-kernels candidates ahead of the older sweep
  entries (--deadline cuts those first), wy_form="split" the smoke run's (its added
  delta_rule_wu counts as changed and is timed);
  so are the launch settings the 2026-12-04 sweep made defaults, undone one at a time: each
  agrees with the default's outputs and changes only the kernels it should (so only those
  are timed)."""
  bench, cache = smoke, {}
  assert bench.kernel_candidates()[2:] == bench.WY_OPTIONS[:1] + bench.WALK_OPTIONS
  assert bench.NEW_OPTIONS == [dict(wy_form="split"), dict(wy_form="split", num_warps_wy=4),
                               dict(walk_form="scaled_keys"), dict(unrolled=())]
  bench.SMOKE["on"] = False
  try:
    full = bench.kernel_candidates()
  finally:
    bench.SMOKE["on"] = True
  assert full[:len(bench.NEW_OPTIONS)] == bench.NEW_OPTIONS
  default = bench.block_sizes_for("split")
  op = {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0, "fwd_bwd_kernels": 0}
  _, outs, base = bench.kernel_breakdown(128, "split", op, default, cache)
  changes = {"keep_w": {"delta_rule_bwd_prep"},
             "dk_partial": {"delta_rule_bwd_dqk", "delta_rule_bwd_wy"},
             # bwd_dqk is unrolled by default (BlockSizes.unrolled)
             "num_stages_parallel": {"delta_rule_out", "delta_rule_bwd_prep",
                                     "delta_rule_bwd_wy"},
             "walk_form": {"delta_rule_fwd", "delta_rule_dstate"},
             "wy_form": {"delta_rule_wy", "delta_rule_wu"},
             "unrolled": {"delta_rule_bwd_dqk"}}
  earlier = [dict(keep_w=False), dict(dk_partial="float32"), dict(num_stages_parallel=None)]
  for over in bench.WY_OPTIONS[:1] + bench.WALK_OPTIONS + bench.UNROLLED_OPTIONS[:1] + earlier:
    row = bench.sweep_candidate(over, 128, "split", base, outs, cache)
    assert row["ok"] and row["max_err"] < 1e-2, row
    assert set(row["kernel_ms"]) == changes[next(iter(over))], row
