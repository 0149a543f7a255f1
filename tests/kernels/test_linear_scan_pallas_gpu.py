"""The Triton kernel in interpret mode against the reference, and proof that it is what runs."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from effattn.kernels import dispatch
from effattn.kernels.linear_scan import linear_scan, pallas_gpu
from tests.kernels.linear_scan_test_base import LinearScanSuite


class TestPallasGpuInterpret(LinearScanSuite):
  IMPL = "pallas_gpu"
  INTERPRET = True


def pallas_call_names(fn, *args):
  """Names of every pallas_call in the jaxpr of fn(*args), nested jaxprs included."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(eqn.params["name"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def loss_grads(impl, interpret):
  def f(q, k, v):
    o, s = linear_scan(q, k, v, jnp.full((q.shape[2],), -0.5), impl=impl, interpret=interpret)
    return jnp.vdot(o, jnp.cos(o)) + jnp.vdot(s, s)
  return jax.grad(f, argnums=(0, 1, 2))


def test_kernel_runs_forward_and_backward():
  x = jnp.ones((1, 40, 1, 16))
  names = pallas_call_names(loss_grads("pallas_gpu", True), x, x, x)
  # 1 forward scan + the 3 transposed scans of the backward (dq causal; dk, dv reverse).
  assert sorted(names) == ["linear_scan", "linear_scan", "linear_scan_reverse",
                           "linear_scan_reverse"]


def test_lowers_to_triton_with_its_name():
  """Lowering for CUDA (no GPU needed) emits the Triton custom calls named by the kernel."""
  x = jax.ShapeDtypeStruct((2, 100, 2, 64), jnp.bfloat16)
  with dispatch.lower_for("gpu"):  # choose as on the GPU this machine lacks
    exported = export.export(
        jax.jit(loss_grads("pallas_gpu", False)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            x, x, x)
  text = exported.mlir_module()
  assert text.count('name = "linear_scan"') == 2
  assert text.count('name = "linear_scan_reverse"') == 2


@pytest.mark.parametrize("field,value", [("chunk", 48), ("block_v", 8)])
def test_block_sizes_must_be_powers_of_two(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_gpu.BlockSizes(**{field: value})


def test_rejects_head_dims_the_tiles_cannot_hold():
  x = jnp.ones((1, 8, 1, 12))
  with pytest.raises(ValueError, match="Dk=12.*impl='xla'"):
    linear_scan(x, x, jnp.ones((1, 8, 1, 16)), impl="pallas_gpu", interpret=True)
