"""scripts/bench_memory.py on CPU: every form of the chunk loops passes its check at tiny
shapes, and a form that failed its check is not timed."""

import pytest

from effattn.testing.scripts import load_script


@pytest.fixture(scope="module")
def bench():
  module = load_script("bench_memory")
  module.SMOKE["on"] = True  # the Pallas kernels interpreted
  return module


def test_blocks_skip_a_form_that_failed_its_check(bench):
  results = {"check": [{"loops": "fused", "ok": True}, {"loops": "split", "ok": False}]}
  bench.blocks(results, 32, 1, 1, 16, 16)
  timed = [(r["loops"], r["block_v"]) for r in results["blocks"]]
  assert timed == [("fused", None), ("fused", 16), ("split bwd", 16), ("hoisted", 16)]
  assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in results["blocks"])
  assert "| pallas_gpu loops split bwd, block_v=16 (1 programs" in bench.table(results)


def test_nothing_is_timed_without_a_passed_check(bench, capsys):
  assert not bench.checked({}, "op")  # part 1 did not run
  failed = {"check": [{"loops": "fused", "ok": False}, {"loops": None, "ok": True}]}
  assert not bench.checked(failed, "layer")
  assert "layer: not timed" in capsys.readouterr().out
  # Another form's failure leaves the fused kernel and xla timeable (blocks skips that form).
  assert bench.checked({"check": [{"loops": "fused", "ok": True}, {"loops": None, "ok": True},
                                  {"loops": "split", "ok": False}]}, "op")


def test_launch_times_only_the_pairs_that_passed_their_check(bench):
  results = {"check": [{"loops": "hoisted", "launch": (4, 2), "ok": True},
                       {"loops": "hoisted", "launch": (2, 1), "ok": False}]}
  bench.launch(results, 32, 1, 1, 32, 16, pairs=((2, 1), (4, 2), (8, 3)))
  timed = [(r["warps"], r["stages"], r["loops"]) for r in results["launch"]]
  assert timed == [(4, 2, "hoisted")]
  assert results["launch"][0]["fwd_ms"] > 0 and results["launch"][0]["fwdbwd_ms"] > 0
  assert "warps 4, stages 2" in bench.table(results)
  # A launch pair's failure does not keep blocks from timing the split loops.
  assert bench.checked({"check": [{"loops": "fused", "ok": True}, {"loops": None, "ok": True}]
                        + results["check"]}, "launch")
