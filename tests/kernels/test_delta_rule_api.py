"""delta_rule's argument checks, path choice, and proof that the kernels run and lower."""

import logging
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from effattn.kernels import dispatch
from effattn.kernels.delta_rule import FAMILY, delta_rule, delta_rule_step, pallas_gpu
from effattn.kernels.hlo import pallas_call_names


def ones(*shape, dtype=jnp.float32):
  return jnp.ones(shape, dtype)


def test_auto_uses_xla_on_cpu_and_the_kernels_on_their_devices():
  choose = lambda impl, **kw: FAMILY.choose(  # noqa: E731
      impl, Dk=128, Dv=128, chunk_size=64, dtype=jnp.dtype(jnp.bfloat16), **kw)
  assert choose("auto").path == "xla"
  with dispatch.interpret_kernels("gpu"):
    assert choose("auto") == ("pallas_gpu", True)
  with dispatch.interpret_kernels("tpu"):
    assert choose("auto") == ("pallas_tpu", True)
  with pytest.raises(ValueError, match="impl='pallas' cannot run"):
    delta_rule(*[ones(1, 4, 1, 16)] * 3, ones(1, 4, 1), ones(1, 4, 1), impl="pallas")


@pytest.mark.parametrize("shapes,match", [
    (dict(Dk=12), "Dk=12 is not a power of two"),
    (dict(Dk=256), "Dk=256 > 128"),
    (dict(chunk_size=128), "chunk_size=128 > 64"),
    (dict(chunk_size=24), "chunk_size=24 is not a multiple of 16"),
])
def test_gpu_kernel_limits_say_why(shapes, match):
  args = dict(Dk=64, Dv=64, chunk_size=64, dtype=jnp.dtype(jnp.float32)) | shapes
  with dispatch.interpret_kernels("gpu"), pytest.raises(ValueError, match=match):
    FAMILY.choose("pallas_gpu", **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=ones(1, 5, 2, 8)), "q and k must both be"),
    (dict(v=ones(1, 4, 1, 8)), "v must be"),
    (dict(v=ones(1, 4, 2, 8, dtype=jnp.bfloat16)), "share one dtype"),
    (dict(log_gate=ones(1, 4)), r"log_gate must be \[B, T, H\]"),
    (dict(beta=ones(1, 4, 3)), r"beta must be \[B, T, H\]"),
    (dict(initial_state=ones(1, 2, 8, 4)), r"initial_state must be \[B, H, Dk, Dv\]"),
    (dict(segment_ids=jnp.ones((1, 5), jnp.int32)), r"segment_ids must be \[B, T\]"),
    (dict(chunk_size=0), "chunk_size=0 must be >= 1"),
])
def test_bad_arguments_name_the_field(kwargs, match):
  args = dict(q=ones(1, 4, 2, 8), k=ones(1, 4, 2, 8), v=ones(1, 4, 2, 8), log_gate=ones(1, 4, 2),
              beta=ones(1, 4, 2)) | kwargs
  positional = [args.pop(n) for n in ("q", "k", "v", "log_gate", "beta")]
  with pytest.raises(ValueError, match=match):
    delta_rule(*positional, impl="xla", **args)


def test_bad_decode_step_arguments_name_the_field():
  x = ones(2, 3, 8)
  with pytest.raises(ValueError, match=r"state must be \[B, H, Dk, Dv\]"):
    delta_rule_step(x, x, x, ones(2, 3), ones(2, 3), ones(2, 3, 8, 4))
  with pytest.raises(ValueError, match=r"beta must be \[B, H\]"):
    delta_rule_step(x, x, x, ones(2, 3), ones(2), ones(2, 3, 8, 8))


@pytest.mark.parametrize("field,value", [("block_v", 48), ("num_warps_bwd", 3), ("block_k", 8),
                                         ("backward", "tiled"), ("num_warps_wu", 3)])
def test_block_sizes_are_checked(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_gpu.BlockSizes(**{field: value})


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_out_dtype_and_state_dtype(impl):
  x = ones(1, 6, 1, 4, dtype=jnp.bfloat16)
  g = ones(1, 6, 1)
  run = lambda **kw: jax.eval_shape(  # noqa: E731
      lambda x, g: delta_rule(x, x, x, -g, g, impl=impl, **kw), x, g)
  o, s = run(out_dtype=jnp.float32)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert run()[0].dtype == jnp.bfloat16


def loss_grads(impl, interpret, segments, block_sizes=None):
  def f(q, k, v, g, b):
    seg = jnp.ones(q.shape[:2], jnp.int32) if segments else None
    o, s = delta_rule(q, k, v, g, b, segment_ids=seg, impl=impl, interpret=interpret,
                      block_sizes=block_sizes)
    return jnp.vdot(o, jnp.cos(o)).real + jnp.vdot(s, s)
  return jax.grad(f, argnums=(0, 1, 2, 3, 4))


def _shapes(b, t, h, d, dtype):
  tok = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  gate = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  return tok, tok, tok, gate, gate


STAGES = ["bwd", "bwd_prep", "dstate", "fwd", "out", "wy"]
KERNELS = {"pallas_gpu": [f"delta_rule_{s}" for s in STAGES],
           "pallas_tpu": [f"delta_rule_tpu_{s}" for s in STAGES]}
# backward="split": the per-chunk gradient kernel becomes its scores half and its WY half.
SPLIT_KERNELS = sorted(["delta_rule_bwd_dqk", "delta_rule_bwd_wy"]
                       + [f"delta_rule_{s}" for s in STAGES if s != "bwd"])
SPLIT = pallas_gpu.BlockSizes(backward="split")
FUSED = pallas_gpu.BlockSizes(backward="fused")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernels_run_forward_and_backward(impl):
  args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(1, 40, 1, 16, jnp.float32)]
  # Forward: inverse + W, U; the state walk; the outputs. Backward: W + within-chunk cotangents;
  # the reverse walk; the per-chunk gradients (one kernel fused, two split).
  sizes = FUSED if impl == "pallas_gpu" else None
  assert sorted(pallas_call_names(loss_grads(impl, True, False, sizes), *args)) == KERNELS[impl]


def test_split_backward_is_the_default_and_runs_its_kernels():
  args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(1, 40, 1, 16, jnp.float32)]
  assert pallas_gpu.BlockSizes() == SPLIT
  names = pallas_call_names(loss_grads("pallas_gpu", True, False), *args)
  assert sorted(names) == SPLIT_KERNELS


@pytest.mark.parametrize("backward", ["fused", "split"])
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "packed"])
def test_lowers_to_triton_with_its_names(segments, backward):
  """Lowering for CUDA (no GPU needed) emits the Triton custom calls by name (six fused, seven
  split)."""
  block_sizes = pallas_gpu.BlockSizes(backward=backward)
  with dispatch.lower_for("gpu"):
    exported = export.export(
        jax.jit(loss_grads("pallas_gpu", False, segments, block_sizes)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *_shapes(2, 200, 2, 128, jnp.bfloat16))
  text = exported.mlir_module()
  names = KERNELS["pallas_gpu"] if backward == "fused" else SPLIT_KERNELS
  assert [text.count(f'name = "{n}"') for n in names] == [1] * len(names)


def test_lowers_to_mosaic():
  with dispatch.lower_for("tpu"):
    exported = export.export(
        jax.jit(loss_grads("pallas_tpu", False, True)), platforms=["tpu"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(
            *_shapes(1, 300, 2, 128, jnp.bfloat16))
  assert exported.mlir_module().count("tpu_custom_call") >= 6


def pallas_calls(fn, *args) -> dict:
  """{name: the pallas_call eqn} of every kernel in the jaxpr of fn(*args), nested included."""
  calls = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        calls[eqn.params["name"]] = eqn
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return calls


def _loops(eqn) -> int:
  """How many loops (scan / while) the kernel body of a pallas_call eqn holds."""
  return str(eqn.params["jaxpr"]).count("scan[") + str(eqn.params["jaxpr"]).count("while[")


def stages(eqn) -> int:
  params = eqn.params["compiler_params"]
  return (params["triton"] if isinstance(params, dict) else params).num_stages


PARALLEL = ("delta_rule_out", "delta_rule_bwd_prep", "delta_rule_bwd_dqk", "delta_rule_bwd_wy")


def test_block_size_options_change_only_their_kernels():
  """keep_w (default): bwd_prep reads q, k, gcum, dO (no beta, no T) and writes dlocal only;
  dk_partial="compute" (default): bwd_dqk hands dk_a over in the compute dtype;
  num_stages_parallel (default 2): the parallel kernels loop over value blocks (a real loop)
  at that many stages, but those in unrolled (default bwd_dqk) keep the unrolled loop at one
  stage. Each earlier setting (W recomputed, f32 dk_a, the unrolled loop at one stage, all four
  pipelined) stays a forced path."""
  args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(1, 40, 1, 32, jnp.bfloat16)]
  sizes = lambda **kw: pallas_gpu.BlockSizes(block_v=16, **kw)  # noqa: E731
  assert (sizes().keep_w, sizes().dk_partial, sizes().num_stages_parallel,
          sizes().unrolled) == (True, "compute", 2, ("bwd_dqk",))
  earlier = dict(keep_w=False, dk_partial="float32", num_stages_parallel=None)
  plain = pallas_calls(loss_grads("pallas_gpu", True, False, sizes(**earlier)), *args)
  prep = plain["delta_rule_bwd_prep"]
  assert (len(prep.invars), len(prep.outvars)) == (6, 2)
  assert plain["delta_rule_bwd_dqk"].outvars[1].aval.dtype == jnp.float32
  for name in PARALLEL:
    assert _loops(plain[name]) == 0 and stages(plain[name]) == 1, name

  default = pallas_calls(loss_grads("pallas_gpu", True, False, sizes()), *args)
  prep = default["delta_rule_bwd_prep"]
  assert (len(prep.invars), len(prep.outvars)) == (4, 1)
  assert sorted(default) == sorted(plain)
  assert default["delta_rule_bwd_dqk"].outvars[1].aval.dtype == jnp.bfloat16
  for name in PARALLEL:
    piped = name != "delta_rule_bwd_dqk"
    assert (_loops(default[name]), stages(default[name])) == ((1, 2) if piped else (0, 1)), name
  assert stages(default["delta_rule_wy"]) == 1

  recompute = pallas_calls(loss_grads("pallas_gpu", True, False, sizes(keep_w=False)), *args)
  assert len(recompute["delta_rule_bwd_prep"].invars) == 6
  piped = pallas_calls(loss_grads("pallas_gpu", True, False,
                                  sizes(num_stages_parallel=3, unrolled=())), *args)
  for name in PARALLEL:
    assert _loops(piped[name]) == 1 and stages(piped[name]) == 3, name
  every = pallas_calls(loss_grads("pallas_gpu", True, False, sizes(unrolled=())), *args)
  for name in PARALLEL:
    assert _loops(every[name]) == 1 and stages(every[name]) == 2, name


WALKS = ("delta_rule_fwd", "delta_rule_dstate")


@pytest.mark.parametrize("segments", [False, True])
def test_walk_form_changes_only_the_walks(segments):
  """walk_form="scaled_values" (the default) against "scaled_keys" (the earlier walks): every
  kernel but the two walks is the same (same kernel jaxpr, same launch); in the walks the gates
  are exp2 of scaled exponents with G_last a scalar load (no reduce_sum, no exp), and no
  [C, Dk] operand is multiplied: every 2-d mul in the walk bodies is [C, bv] or [Dk, bv]
  (keep * state). scaled_keys: exp and reduce_sum."""
  args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(1, 40, 1, 32, jnp.bfloat16)]
  sizes = lambda **kw: pallas_gpu.BlockSizes(block_v=16, **kw)  # noqa: E731
  assert sizes().walk_form == "scaled_values"
  keys = pallas_calls(loss_grads("pallas_gpu", True, segments,
                                    sizes(walk_form="scaled_keys")), *args)
  walked = pallas_calls(loss_grads("pallas_gpu", True, segments, sizes()), *args)
  assert sorted(walked) == sorted(keys)
  for name, eqn in keys.items():
    same = str(walked[name].params["jaxpr"]) == str(eqn.params["jaxpr"])
    assert same == (name not in WALKS), name
    assert stages(walked[name]) == stages(eqn), name
  for name in WALKS:
    before, after = (set(re.findall(r"= (exp2?|reduce_sum)\b", str(c[name].params["jaxpr"])))
                     for c in (keys, walked))
    assert (before, after) == ({"exp", "reduce_sum"}, {"exp2"}), name
    jaxpr = walked[name].params["jaxpr"]
    body = next(e for e in jaxpr.eqns if e.primitive.name in ("scan", "while"))
    body = body.params.get("jaxpr", body.params.get("body_jaxpr"))
    muls = [e.outvars[0].aval.shape for e in body.jaxpr.eqns
            if e.primitive.name == "mul" and len(e.outvars[0].aval.shape) == 2]
    assert muls and all(sh[1] == 16 for sh in muls), (name, muls)  # [., bv]: nothing [C, Dk]


def warps(eqn) -> int:
  params = eqn.params["compiler_params"]
  return (params["triton"] if isinstance(params, dict) else params).num_warps


def test_wy_split_form_adds_delta_rule_wu_and_changes_only_delta_rule_wy():
  """wy_form="split": delta_rule_wy reads k, beta, gcum (and runs) and writes only T [B, Tp, H,
  C]; the added delta_rule_wu reads T, k, v, beta, gcum (and carry) and writes W and U by two
  [C, C] x [C, D] dots at num_warps_wu; every other kernel is the default's (same kernel jaxpr,
  same launch), and it lowers for CUDA with delta_rule_wu once beside the seven split-backward
  kernels."""
  args = [jnp.zeros(s.shape, s.dtype) for s in _shapes(1, 40, 1, 32, jnp.bfloat16)]
  sizes = lambda **kw: pallas_gpu.BlockSizes(block_v=16, **kw)  # noqa: E731
  assert (sizes().wy_form, sizes().num_warps_wu) == ("blocked", 4)
  for segments in (False, True):
    default = pallas_calls(loss_grads("pallas_gpu", True, segments, sizes()), *args)
    split = pallas_calls(loss_grads("pallas_gpu", True, segments,
                                    sizes(wy_form="split", num_warps_wu=8)), *args)
    assert sorted(split) == sorted([*default, "delta_rule_wu"])
    for name, eqn in default.items():
      if name != "delta_rule_wy":
        assert str(split[name].params["jaxpr"]) == str(eqn.params["jaxpr"]), name
        assert (stages(split[name]), warps(split[name])) == (stages(eqn), warps(eqn)), name
    wy, wu, masks = split["delta_rule_wy"], split["delta_rule_wu"], int(segments)
    assert (len(wy.invars), len(wy.outvars)) == (3 + masks, 1)
    assert wy.outvars[0].aval == default["delta_rule_wy"].outvars[0].aval  # T as before
    assert (len(wu.invars), len(wu.outvars)) == (5 + masks, 2)
    assert (warps(wy), warps(wu)) == (2, 8)
    dots = [[v.aval.shape for v in e.invars] for e in wu.params["jaxpr"].eqns
            if e.primitive.name == "dot_general"]
    assert dots == [[(64, 64), (64, 32)]] * 2, dots  # C = 64, Dk = Dv = 32
  with dispatch.lower_for("gpu"):
    exported = export.export(
        jax.jit(loss_grads("pallas_gpu", False, True, pallas_gpu.BlockSizes(wy_form="split"))),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *_shapes(2, 200, 2, 128, jnp.bfloat16))
  text = exported.mlir_module()
  names = SPLIT_KERNELS + ["delta_rule_wu"]
  assert [text.count(f'name = "{n}"') for n in names] == [1] * len(names)


@pytest.mark.parametrize("field,value", [("dk_partial", "bfloat16"), ("num_stages_parallel", 0),
                                         ("unrolled", ("bwd",)), ("unrolled", "bwd_dqk"),
                                         ("walk_form", "scaled_queries"),
                                         ("wy_form", "tiled")])
def test_block_size_options_are_checked(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_gpu.BlockSizes(**{field: value})


def _abstract(b, t, h, d, dtype=jnp.bfloat16):
  tok = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  gate = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  return tok, tok, tok, gate, gate


def test_int32_offsets_keep_auto_off_the_kernels_and_a_forced_call_says_why(caplog):
  """The per-chunk states [B, H, N*Dk, Dv] at B 8, H 16, D 128: 2**30 elements at T 32k (the
  kernels), 2**31 at T 64k (the last index, 2**31 - 1, still an int32), more one chunk later
  (int32 offsets: "auto" falls to xla, a forced pallas_gpu raises one line naming the size and
  the fix). Abstract shapes only: nothing is allocated."""
  assert pallas_gpu.largest_array(8, 32768, 16, 128, 128, 64) == (
      "the per-chunk states [B, H, N*Dk, Dv]", 2 ** 30)
  assert pallas_gpu.largest_array(1, 1000, 1, 16, 16, 64)[0].startswith("a token array")
  shapes = dict(Dk=128, Dv=128, chunk_size=64, dtype=jnp.dtype(jnp.bfloat16), B=8, H=16)
  with dispatch.lower_for("gpu"), caplog.at_level(logging.INFO):
    assert FAMILY.choose("auto", T=32768, **shapes).path == "pallas_gpu"
    assert FAMILY.choose("auto", T=65536, **shapes).path == "pallas_gpu"
    assert FAMILY.choose("auto", T=65536 + 1, **shapes).path == "xla"  # padded to 65600
    assert any("using xla path" in r.getMessage() and "> 2**31" in r.getMessage()
               for r in caplog.records)
    assert FAMILY.choose("auto", T=32768 + 1, **shapes).path == "pallas_gpu"  # padded to 32832
    run = lambda impl, t: jax.eval_shape(  # noqa: E731
        lambda *a: delta_rule(*a, impl=impl), *_abstract(8, t, 16, 128))
    o, final = run("auto", 65600)  # traced on the xla path, abstractly
    assert o.shape == (8, 65600, 16, 128) and final.shape == (8, 16, 128, 128)
    with pytest.raises(ValueError) as err:
      run("pallas_gpu", 65600)
  msg = str(err.value)
  assert "\n" not in msg and "2149580800 elements > 2**31" in msg and "states" in msg
  assert "use impl='xla'" in msg and "impl='auto' would run xla" in msg
  # Each other sizing that crosses the bound: B 16 past T 32k, or a token array at Dv 2**13.
  assert not pallas_gpu.int32_offsets(16, 32768, 16, 128, 128, 64)
  assert pallas_gpu.int32_offsets(16, 32768 + 64, 16, 128, 128, 64)
  assert "token array" in pallas_gpu.int32_offsets(1, 2 ** 18 + 64, 1, 16, 2 ** 13, 64)
  assert not pallas_gpu.int32_offsets(1, 2 ** 18, 1, 16, 2 ** 13, 64)
