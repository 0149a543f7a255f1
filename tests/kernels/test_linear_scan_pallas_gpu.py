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
  BLOCK_SIZES = pallas_gpu.BlockSizes(splits=1)  # the one-pass kernel


class TestPallasGpuPartsInterpret(LinearScanSuite):
  """T in parts scanned by separate programs: 3 chunks of 16 in 2 parts of 2 chunks, so a part
  boundary inside the sequence and a part holding only padding at the end (T up to 40)."""
  IMPL = "pallas_gpu"
  INTERPRET = True
  BLOCK_SIZES = pallas_gpu.BlockSizes(splits=2)


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


@pytest.mark.parametrize("shape,passes", [((2, 100, 2, 64), ("",)),
                                          ((1, 2048, 2, 128), ("", "_states"))])
def test_lowers_to_triton_with_its_name(shape, passes):
  """Lowering for CUDA (no GPU needed) emits the Triton custom calls named by the kernel: one
  pass per scan, or (a long T on a small grid) a states pass and an outputs pass."""
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  with dispatch.lower_for("gpu"):  # choose as on the GPU this machine lacks
    exported = export.export(
        jax.jit(loss_grads("pallas_gpu", False)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            x, x, x)
  text = exported.mlir_module()
  for suffix in ("", "_states"):
    want = 2 if suffix in passes else 0
    assert text.count(f'name = "linear_scan{suffix}"') == want
    assert text.count(f'name = "linear_scan_reverse{suffix}"') == want


@pytest.mark.parametrize("field,value", [("chunk", 48), ("block_v", 8)])
def test_block_sizes_must_be_powers_of_two(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_gpu.BlockSizes(**{field: value})


def test_rejects_head_dims_the_tiles_cannot_hold():
  x = jnp.ones((1, 8, 1, 12))
  with pytest.raises(ValueError, match="Dk=12.*impl='xla'"):
    linear_scan(x, x, jnp.ones((1, 8, 1, 16)), impl="pallas_gpu", interpret=True)


def test_parts_follow_the_grid():
  """splits=0 cuts T into parts while the grid is small, one pass once it is large."""
  assert pallas_gpu.parts_for(0, 32, 256) == (8, 32)  # B=2, H=8, Dv/block_v=2 at T=16k
  assert pallas_gpu.parts_for(0, 256, 256) == (1, 256)  # B=8, H=16: one pass
  assert pallas_gpu.parts_for(0, 32, 12) == (3, 4)  # parts of at least MIN_PART_CHUNKS
  assert pallas_gpu.parts_for(5, 32, 12) == (4, 3)  # 5 parts of 3 chunks would leave one empty
  assert pallas_gpu.parts_for(1, 32, 12) == (1, 12)


def test_parts_run_a_states_pass_per_scan():
  x = jnp.ones((1, 40, 1, 16))

  def grads(q, k, v):
    def f(q, k, v):
      o, s = linear_scan(q, k, v, jnp.full((1,), -0.5), impl="pallas_gpu", chunk_size=16,
                         block_sizes=pallas_gpu.BlockSizes(splits=2), interpret=True)
      return jnp.vdot(o, jnp.cos(o)) + jnp.vdot(s, s)
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  names = pallas_call_names(grads, x, x, x)
  # Each of the 4 scans (1 forward, 3 backward) is a states pass and an outputs pass.
  assert sorted(names) == sorted(["linear_scan", "linear_scan_states"] * 2
                                 + ["linear_scan_reverse", "linear_scan_reverse_states"] * 2)
