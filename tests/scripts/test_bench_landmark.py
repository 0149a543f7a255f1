"""scripts/bench_landmark.py's --kv_splits sweep (no kernels run: check and timing stubbed; the
whole script's CPU run is `python scripts/bench_landmark.py --smoke`)."""

from effattn.testing.scripts import load_script


def test_split_sweep_checks_first_and_skips_a_failed_split(monkeypatch, capsys):
  bench = load_script("bench_landmark")
  checked, timed = [], []

  def check(shape, block_len, tile, kv_splits=None):
    checked.append(kv_splits)
    return [{"dtype": "float32", "kv_splits": kv_splits, "max_rel_err": {"o": 0.0},
             "ok": kv_splits != 2}]

  def bench_one(b, t, h, d, block_len, tile, reps, tuning=(), paths=bench.PATHS):
    timed.append((t, dict(tuning)["kv_splits"]))
    assert paths == ("kernel", "kernel_core")
    return {f"{n}_{w}": 1.0 for n in paths for w in ("fwd_ms", "fwdbwd_ms")} | {
        f"{n}_kernels": (1, 3) for n in paths}

  monkeypatch.setattr(bench, "check", check)
  monkeypatch.setattr(bench, "bench_one", bench_one)
  result = {"check": [{"ok": True}]}
  rows = bench.bench_splits("1,2,0", [(2, 4096)], 8, 128, 50, 64, 1, (2, 300, 2), result)
  assert checked == [2, 0]  # 1 is the default kernel, which the main check covers
  assert [r["ok"] for r in result["check_kv_splits"]] == [False, True]
  assert timed == [(4096, 1), (4096, 0)]  # the failed split is not timed
  assert [r["kv_splits"] for r in rows] == [1, 2, 0]
  assert "skipped" in rows[1] and "kernel_core_fwd_ms" not in rows[1]
  assert rows[2]["programs_per_key_tile"] == 1  # auto_kv_splits at B 2, H 8, T 4,096
  assert rows[0]["kernel_core_kernels"] == (1, 3)
  bench.print_splits(rows, 8, 128, 50)
  out = capsys.readouterr().out
  assert "skipped: check failed" in out and "1.00x" in out
  assert bench.bench_splits("", [(2, 4096)], 8, 128, 50, 64, 1, (2, 300, 2), {}) == []


def test_bwd_parts_time_each_backward_kernel_alone_and_gate_the_mosaic_ones(monkeypatch, capsys):
  """--bwd_parts at smoke size (Triton kernels in interpret mode): dq and dkv each timed on the
  forward's residuals, the function each times returns what its name says (dq alone; dk, dv),
  and the Mosaic kernels are reported with the reason they were not timed."""
  bench = load_script("bench_landmark")
  monkeypatch.setitem(bench.SMOKE, "on", True)
  measured = []

  def measure(fn, res, dog, reps):
    out = fn(res, dog)
    measured.append([x.shape for x in (out if isinstance(out, tuple) else (out,))])
    return {"ms": 1.5, "kernels": 1, "kernel_names": [], "compile_s": 0.0}

  monkeypatch.setattr(bench, "measure", measure)
  row = bench.bench_bwd_parts(1, 40, 2, 16, 8, 16, 1, mosaic_skip="its check failed")
  assert len(measured) == 2
  dq_shapes, dkv_shapes = measured
  assert len(dq_shapes) == 1 and len(dkv_shapes) == 2 and dkv_shapes[0] == dq_shapes[0]
  assert row["triton_dq_ms"] == row["triton_dkv_ms"] == 1.5 and row["triton_dq_kernels"] == 1
  assert row["mosaic_skipped"] == "its check failed" and "mosaic_dq_ms" not in row
  bench.print_bwd_parts([row], 2, 16, 8)
  out = capsys.readouterr().out
  assert "triton dq 1.50 [1]; triton dkv 1.50 [1]; mosaic not timed: its check failed" in out
