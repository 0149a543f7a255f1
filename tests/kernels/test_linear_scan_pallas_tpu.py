"""The Mosaic TPU kernel in interpret mode against the reference, and that it lowers for TPU."""

import jax
import jax.numpy as jnp
from jax import export

from effattn.kernels import dispatch
from tests.kernels.linear_scan_test_base import LinearScanSuite
from tests.kernels.test_linear_scan_pallas_gpu import loss_grads, pallas_call_names


class TestPallasTpuInterpret(LinearScanSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CHUNK = 8


def test_kernel_runs_forward_and_backward():
  x = jnp.ones((1, 40, 1, 16))
  names = pallas_call_names(loss_grads("pallas_tpu", True), x, x, x)
  assert sorted(names) == ["linear_scan_tpu", "linear_scan_tpu", "linear_scan_tpu_reverse",
                           "linear_scan_tpu_reverse"]


def test_lowers_to_mosaic():
  x = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
  with dispatch.lower_for("tpu"):  # choose as on the TPU this machine lacks
    exported = export.export(
        jax.jit(loss_grads("pallas_tpu", False)), platforms=["tpu"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(x, x, x)
  assert exported.mlir_module().count("tpu_custom_call") >= 4
