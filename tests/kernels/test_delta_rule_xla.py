"""The chunked jnp path (and its hand-written backward) against the token recurrence."""

from tests.kernels.delta_rule_test_base import DeltaRuleSuite, pytest_generate_tests  # noqa: F401


class TestXla(DeltaRuleSuite):
  IMPL = "xla"
  CASE_NAMES = ("f32-ragged-segments-state",)
