"""scripts/bench_persistent.py on CPU: a --smoke run (one check case per dtype, the Triton
kernels interpreted) checks, times and reports every path; a path that failed its check is not
timed. The whole script's CPU run is `python scripts/bench_persistent.py --smoke`."""

import json

import pytest

from effattn.testing.scripts import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("bench_persistent")


def test_smoke_run_checks_then_times_every_path(bench, monkeypatch, tmp_path, capsys):
  # One case (window, packed segments + padding) keeps the interpreted compiles short.
  monkeypatch.setattr(bench, "SMOKE_CHECK_CASES", bench.SMOKE_CHECK_CASES[1:2])
  # The forced band kernels: Triton is what smoke's auto runs; Mosaic GPU has no interpreter.
  paths = [p for p in bench.PATHS if p not in bench.BAND_PATHS]
  result = bench.main(["--smoke", f"--out={tmp_path}", "--paths=" + ",".join(paths)])
  assert result["impls"] == ["auto", "xla"]  # a timed persistent path is checked first
  assert [(c["impl"], c["dtype"]) for c in result["check"]] == [
      (i, d) for d in ("bfloat16", "float32") for i in ("auto", "xla")]
  assert all(c["ok"] and set(c["max_rel_err"]) == set(bench.GRADS) for c in result["check"])
  (row,) = result["rows"]
  for name in paths:
    assert row[f"{name}_fwd_ms"] > 0 and row[f"{name}_fwdbwd_ms"] > 0
    assert row[f"{name}_kernels"] == (0, 0)  # interpreted / XLA: no custom call on CPU
  saved = json.loads((tmp_path / "bench_persistent.json").read_text())
  assert saved["rows"][0]["auto_fwd_ms"] == row["auto_fwd_ms"]
  out = capsys.readouterr().out
  assert "check: PASS" in out and "auto/cudnn_window" in out.splitlines()[-2]


def test_a_path_that_failed_its_check_is_not_timed(bench, monkeypatch, tmp_path, capsys):
  def check(impls, n_p, windowed=True):
    return [{"impl": i, "dtype": "float32", "max_rel_err": {"o": 1.0 if i == "auto" else 0.0},
             "ok": i != "auto"} for i in impls]

  monkeypatch.setattr(bench, "check", check)
  with pytest.raises(SystemExit):
    bench.main(["--smoke", f"--out={tmp_path}"])
  (row,) = json.loads((tmp_path / "bench_persistent.json").read_text())["rows"]
  assert "auto_fwd_ms" not in row and "its check failed" in row["auto_skipped"]
  assert row["cudnn_window_fwd_ms"] > 0 and row["cudnn_causal_fwdbwd_ms"] > 0
  out = capsys.readouterr().out
  assert "check failed: not timed" in out and out.rstrip().endswith("CHECK FAILED")


def test_forced_band_kernels_are_checked_in_the_dtypes_they_take(bench):
  assert set(bench.BAND_PATHS) <= set(bench.PATHS) and all(
      bench.PERSISTENT_PATHS[p] == p for p in bench.BAND_PATHS)
  assert "float32" in bench.refusal("pallas_mosaic_gpu", "float32")
  assert bench.refusal("pallas_mosaic_gpu_t128", "float32") == bench.refusal(
      "pallas_mosaic_gpu", "float32")
  assert bench.refusal("pallas_mosaic_gpu", "bfloat16") == ""
  assert bench.refusal("pallas_gpu", "float32") == bench.refusal("auto", "float32") == ""
