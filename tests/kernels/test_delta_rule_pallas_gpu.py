"""The Triton kernels in interpret mode against the reference, and their lowering."""

from tests.kernels.delta_rule_test_base import DeltaRuleSuite, pytest_generate_tests  # noqa: F401


class TestPallasGpuInterpret(DeltaRuleSuite):
  IMPL = "pallas_gpu"
  INTERPRET = True
  CASE_NAMES = ("f32-strong-gates-chunk64", "bf16-weak-gates-chunk32")
