"""effattn/kernels/hlo.py on real lowered and compiled modules (CPU: lowered for other platforms).

Lowering for CUDA or TPU needs no device, so the Triton, Mosaic and cuDNN custom calls a GPU or
TPU would run are read from the text they really produce; CPU compilation gives real compiled
HLO (with LAPACK custom calls, which are not kernels of ours).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from effattn.kernels import hlo

X = jnp.ones((16, 128), jnp.float32)


def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def doubled(x, name="my_double", compiler_params=None, interpret=False):
  return pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name=name,
                        compiler_params=compiler_params, interpret=interpret)(x)


def lowered_for(platform, fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("platform,params,target,family", [
    ("cuda", pltriton.CompilerParams(), "__gpu$xla.gpu.triton", "triton"),
    ("cuda", plmgpu.CompilerParams(), "mosaic_gpu_v2", "mosaic_gpu"),
    ("tpu", pltpu.CompilerParams(), "tpu_custom_call", "mosaic_tpu"),
])
def test_pallas_kernels_by_name_in_stablehlo_and_hlo(platform, params, target, family):
  def two_kernels(x):
    return doubled(doubled(x, "first", params), "second", params) + 1.0

  low = lowered_for(platform, two_kernels, X)
  # Compiled GPU/TPU HLO carries op_name metadata, as the HLO dialect with debug info does.
  hlo_text = low.as_text(dialect="hlo", debug_info=True)
  calls = hlo.kernels(hlo_text)
  assert [(c.target, c.family) for c in calls] == [(target, family)] * 2
  assert hlo.kernel_names(hlo_text) == ["first", "second"]
  assert hlo.count_kernels(low.as_text()) == 2
  stablehlo_names = hlo.kernel_names(low.as_text())
  # Mosaic GPU keeps its name only inside the serialized module: the target stands in.
  assert stablehlo_names == (["first", "second"] if family != "mosaic_gpu" else [target] * 2)


def test_cudnn_attention_is_a_kernel_and_cublas_is_not():
  def calls(a):
    sm = jax.ffi.ffi_call("__cudnn$fmhaSoftmax", jax.ShapeDtypeStruct(a.shape, a.dtype))(a)
    return jax.ffi.ffi_call("__cublas$gemm", jax.ShapeDtypeStruct(a.shape, a.dtype))(sm)

  low = lowered_for("cuda", calls, X)
  for text in (low.as_text(), low.as_text(dialect="hlo")):
    assert [(c.target, c.family) for c in hlo.custom_calls(text)] == [
        ("__cudnn$fmhaSoftmax", "cudnn"), ("__cublas$gemm", None)]
    assert hlo.kernel_names(text) == ["__cudnn$fmhaSoftmax"]


def test_compiled_cpu_module_library_calls_are_not_kernels():
  a = jnp.eye(4) * 2.0
  text = hlo.compiled_text(jnp.linalg.cholesky, a)
  assert [c.family for c in hlo.custom_calls(text)] == [None]
  assert "lapack" in hlo.custom_calls(text)[0].target
  assert hlo.count_kernels(text) == 0


def test_dead_custom_call_is_gone_from_the_compiled_text():
  """Why benchmarks read the compiled text: XLA drops a custom call whose output it proves
  unused (here a select on a constant), which the lowered module still holds."""
  a = jnp.eye(4) * 2.0
  dead = jax.jit(lambda a: jnp.where(False, jnp.linalg.cholesky(a), a))
  assert len(hlo.custom_calls(dead.lower(a).as_text())) == 1
  assert hlo.custom_calls(hlo.compiled_text(dead, a)) == []


def test_interpret_mode_names_from_locations_and_jaxpr():
  @jax.custom_vjp
  def f(x):
    return doubled(x, "fwd_kernel", interpret=True)

  f.defvjp(lambda x: (f(x), None), lambda _, g: (doubled(g, "bwd_kernel", interpret=True),))
  loss = jax.grad(lambda x: jnp.sum(f(x) ** 2))
  low = jax.jit(loss).lower(X)
  assert hlo.count_kernels(low.as_text()) == 0  # inlined: no custom call
  assert hlo.located_pallas_names(low.as_text(debug_info=True)) == {"fwd_kernel", "bwd_kernel"}
  assert hlo.pallas_call_names(loss, X) == ["fwd_kernel", "bwd_kernel"]


def test_names_inside_quoted_blobs_are_not_read():
  line = ('%k = f32[4] custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", '
          'backend_config={ir = "ML\\22 name = \\22decoy\\22 \\5C", name = "real", num_warps = 4}')
  assert hlo.kernel_names(line) == ["real"]
  nested = 'metadata={op_name="jit(f)/transpose(jvp(scan_bwd))/pallas_call"}'
  assert hlo.kernel_names(line.replace('name = "real", ', "") + ", " + nested) == ["scan_bwd"]
