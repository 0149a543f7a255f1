"""The Mosaic TPU kernels in interpret mode against the reference, and their lowering."""

from tests.kernels.delta_rule_test_base import DeltaRuleSuite, pytest_generate_tests  # noqa: F401


class TestPallasTpuInterpret(DeltaRuleSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CASE_NAMES = ("f32-ragged-segments-state",)
