"""kernels/dispatch.py: one impl vocabulary, one rule for auto, one error for a forced path, and
the interpret switch that runs a whole mechanism's Pallas path on CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import dispatch
from effattn.kernels.block_sparse import block_sparse_attention, lists_from_block_mask
from effattn.kernels.grouped_softmax import grouped_softmax
from effattn.kernels.head_routing import head_routed_attention
from effattn.kernels.linear_scan import linear_scan
from effattn.kernels.memory_chunk import memory_update
from effattn.kernels.softmax import softmax_attention
from effattn.ranges import ConfigError
from effattn.testing import kernels
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build

F32, BF16 = np.dtype("float32"), np.dtype(jnp.bfloat16)
FAMILIES = ("softmax", "block_sparse", "grouped_softmax", "head_routing", "linear_scan",
            "memory_chunk")


def test_one_vocabulary_with_xla_and_reference_everywhere():
  assert dispatch.impls() == ("auto", "pallas", "pallas_gpu", "pallas_mosaic_gpu", "pallas_tpu",
                              "block_sparse", "cudnn", "xla", "reference")
  for op in FAMILIES:
    assert {"xla", "reference"} <= set(dispatch.family(op).names), op


# (op, shapes, backend) -> the path "auto" took before the dispatcher (the four hand-written
# choosers and softmax's): the GPU/TPU paths must not change.
AUTO_BEFORE = [
    ("softmax", dict(dtype=BF16, head_dim=64, dense_mask=False, segments=True, causal=True,
                     window=None), "gpu", "cudnn"),
    ("softmax", dict(dtype=F32, head_dim=64, dense_mask=False, segments=False, causal=True,
                     window=None), "gpu", "xla"),
    ("softmax", dict(dtype=BF16, head_dim=160, dense_mask=False, segments=False, causal=True,
                     window=None), "gpu", "xla"),
    ("softmax", dict(dtype=BF16, head_dim=64, dense_mask=True, segments=False, causal=True,
                     window=None), "gpu", "xla"),
    ("softmax", dict(dtype=BF16, head_dim=64, dense_mask=False, segments=True, causal=False,
                     window=8), "gpu", "xla"),
    ("softmax", dict(dtype=BF16, head_dim=64, dense_mask=False, segments=False, causal=True,
                     window=None), "tpu", "xla"),
    ("block_sparse", dict(head_dim=64), "gpu", "pallas_gpu"),
    ("block_sparse", dict(head_dim=128), "tpu", "pallas_tpu"),
    ("block_sparse", dict(head_dim=32), "gpu", "xla"),
    ("grouped_softmax", dict(head_dim=64, block_len=50, tile=64), "gpu", "pallas_gpu"),
    ("grouped_softmax", dict(head_dim=16, block_len=None, tile=16), "tpu", "pallas_tpu"),
    ("grouped_softmax", dict(head_dim=64, block_len=100, tile=64), "gpu", "xla"),
    ("grouped_softmax", dict(head_dim=48, block_len=50, tile=64), "tpu", "xla"),
    ("head_routing", dict(head_dim=16), "gpu", "pallas_gpu"),
    ("head_routing", dict(head_dim=128), "tpu", "pallas_tpu"),
    ("head_routing", dict(head_dim=24), "gpu", "xla"),
    ("linear_scan", dict(Dk=64, Dv=64, dtype=BF16), "gpu", "pallas_gpu"),
    ("linear_scan", dict(Dk=8, Dv=64, dtype=BF16), "gpu", "xla"),
    ("linear_scan", dict(Dk=8, Dv=8, dtype=F32), "tpu", "pallas_tpu"),
    ("memory_chunk", dict(Dk=64, Dv=64, chunk_size=64, depth=1), "gpu", "pallas_gpu"),
    ("memory_chunk", dict(Dk=256, Dv=256, chunk_size=64, depth=1), "gpu", "xla"),
    ("memory_chunk", dict(Dk=64, Dv=64, chunk_size=8, depth=1), "gpu", "xla"),
    ("memory_chunk", dict(Dk=64, Dv=64, chunk_size=8, depth=1), "tpu", "pallas_tpu"),
    ("memory_chunk", dict(Dk=64, Dv=64, chunk_size=12, depth=1), "tpu", "xla"),
    ("memory_chunk", dict(Dk=64, Dv=64, chunk_size=64, depth=2), "gpu", "xla"),
]


@pytest.mark.parametrize("op,shapes,backend,want", AUTO_BEFORE)
def test_auto_picks_todays_path(monkeypatch, op, shapes, backend, want):
  fam = dispatch.family(op)
  assert fam.choose("auto", **shapes).path == "xla"  # CPU: always xla
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert fam.choose("auto", **shapes) == (want, False)


def _one_call_per_family(impl, **kw):
  """Each op's public function on tiny inputs: proves every api.py asks the dispatcher."""
  x = jnp.zeros((1, 16, 2, 16))
  seg = jnp.ones((1, 16), jnp.int32)
  idx, cnt = lists_from_block_mask(jnp.ones((1, 2, 1, 1), bool))
  gates = jnp.ones((1, 16, 2))
  return {
      "softmax": lambda: softmax_attention(x, x, x, causal=True, impl=impl),
      "block_sparse": lambda: block_sparse_attention(
          jnp.zeros((1, 16, 2, 64)), jnp.zeros((1, 16, 2, 64)), jnp.zeros((1, 16, 2, 64)),
          idx, cnt, block_q=16, block_k=16, impl=impl, **kw),
      "grouped_softmax": lambda: grouped_softmax(x, x, x, x, jnp.zeros((1, 16), jnp.int32), seg,
                                                 tile=16, impl=impl, **kw),
      "head_routing": lambda: head_routed_attention(x, x, x, gates, block_q=16, block_k=16,
                                                    impl=impl, **kw),
      "linear_scan": lambda: linear_scan(x, x, x, impl=impl, **kw),
      "memory_update": lambda: memory_update(x, x, x, gates, gates, gates, chunk_size=16,
                                             impl=impl, **kw),
  }


@pytest.mark.parametrize("op", list(_one_call_per_family("pallas")))
def test_pallas_on_cpu_is_one_line_naming_why_and_the_fallback(op):
  with pytest.raises(dispatch.PathError) as err:
    _one_call_per_family("pallas")[op]()
  message = str(err.value)
  assert "\n" not in message
  assert re.search(r"impl='pallas' cannot run: .*(backend cpu|no Pallas kernel).*; "
                   r"impl='auto' would run xla$", message), message


@pytest.mark.parametrize("op", ["block_sparse", "head_routing", "linear_scan", "memory_update"])
def test_forced_kernel_off_device_needs_interpret(op):
  with pytest.raises(dispatch.PathError, match=r"impl='pallas_gpu' cannot run: backend is cpu "
                     r"\(interpret=True runs it in the Pallas interpreter"):
    _one_call_per_family("pallas_gpu")[op]()


def test_forced_path_errors_name_the_limit_and_what_auto_runs():
  fam = dispatch.family("block_sparse")
  with pytest.raises(dispatch.PathError, match=r"^block_sparse impl='pallas_gpu' cannot run: "
                     r"head_dim=32 is not one of \(64, 128\); impl='auto' would run xla$"):
    fam.choose("pallas_gpu", interpret=True, head_dim=32)
  with pytest.raises(dispatch.PathError, match="block_sparse has no 'cudnn' path"):
    fam.choose("cudnn", head_dim=64)
  with pytest.raises(dispatch.PathError, match="impl='flash' is not one of"):
    fam.choose("flash", head_dim=64)
  with pytest.raises(dispatch.PathError, match="softmax impl='cudnn' cannot run: backend is cpu"):
    softmax_attention(jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1, 8)),
                      jnp.zeros((1, 4, 1, 8)), causal=True, impl="cudnn")


def test_device_limits_hold_on_the_device_not_in_the_bare_interpreter(monkeypatch):
  fam = dispatch.family("memory_chunk")
  shapes = dict(Dk=16, Dv=16, chunk_size=8, depth=1)
  assert fam.choose("pallas_gpu", interpret=True, **shapes) == ("pallas_gpu", True)
  with dispatch.interpret_kernels("gpu"):  # stands in for the GPU: its limits apply
    assert fam.choose("auto", **shapes).path == "xla"
    with pytest.raises(dispatch.PathError, match="chunk_size=8 is not a power of two >= 16"):
      fam.choose("pallas_gpu", **shapes)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(dispatch.PathError, match="chunk_size=8 is not a power of two >= 16"):
    fam.choose("pallas_gpu", **shapes)
  with pytest.raises(dispatch.PathError, match="depth=2: the kernels hold the linear"):
    fam.choose("pallas", **dict(shapes, chunk_size=16, depth=2))


@pytest.mark.parametrize("cc,dtype,block,want", [
    ("9.0", "bfloat16", 64, "pallas_mosaic_gpu"), ("9.0", "bfloat16", 128, "pallas_mosaic_gpu"),
    ("9.0", "float16", 64, "pallas_gpu"),  # not yet checked on the GPU in float16
    ("9.0", "float32", 64, "pallas_gpu"), ("9.0", "bfloat16", 32, "pallas_gpu"),
    ("8.0", "bfloat16", 64, "pallas_gpu")])
def test_block_sparse_auto_takes_mosaic_gpu_on_hopper_only(monkeypatch, cc, dtype, block, want):
  from effattn.kernels.block_sparse import api
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "_hopper", lambda: "" if cc.startswith("9") else f"cc {cc}")
  fam = dispatch.family("block_sparse")
  shapes = dict(head_dim=128, dtype=dtype, block_q=block, block_k=block)
  assert fam.choose("auto", **shapes) == (want, False)


def test_a_new_backend_is_one_entry():
  """A Hopper-only Mosaic GPU kernel ahead of Triton: "auto" takes it on compute capability
  9.x only, and its name joins the vocabulary."""
  cc = {"value": "8.0"}
  fam = dispatch.Family("toy_block_sparse", (
      dispatch.Path("pallas_mosaic_gpu", platform="gpu", interpretable=False,
                    device=lambda: "" if cc["value"].startswith("9.") else
                    f"compute capability {cc['value']} (needs 9.x)"),
      dispatch.Path("pallas_gpu", platform="gpu"),
      dispatch.Path("xla"),
      dispatch.Path("reference"),
  ))
  try:
    assert "pallas_mosaic_gpu" in dispatch.impls()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(jax, "default_backend", lambda: "gpu")
      assert fam.choose("auto").path == "pallas_gpu"
      assert fam.choose("pallas").path == "pallas_gpu"
      cc["value"] = "9.0"
      assert fam.choose("auto").path == "pallas_mosaic_gpu"
      assert fam.choose("pallas").path == "pallas_mosaic_gpu"
    with pytest.raises(dispatch.PathError, match="pallas_mosaic_gpu' cannot run: backend is cpu"):
      fam.choose("pallas_mosaic_gpu", interpret=True)  # no interpreter for it
  finally:
    del dispatch._FAMILIES["toy_block_sparse"]  # pylint: disable=protected-access


def test_auto_limits_hold_where_the_dispatcher_chooses_not_for_a_named_path(monkeypatch):
  """auto_limits (built, not yet checked on its device): "auto" and "pallas" skip the path for
  such inputs and say why, as for any limit; naming the path runs it."""
  from effattn.kernels import paths  # noqa: E402
  unchecked = dispatch.Limit(("window",), lambda window: "" if window is None else
                             f"window={window}: not yet checked")
  fam = dispatch.Family("toy_unchecked", (
      dispatch.Path("pallas_mosaic_gpu", platform="gpu", interpretable=False,
                    auto_limits=(unchecked,)),
      dispatch.Path("pallas_gpu", platform="gpu", limits=(dispatch.one_of("head_dim", (64,)),)),
      dispatch.Path("xla"),
      dispatch.Path("reference"),
  ))
  try:
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fam.choose("auto", head_dim=64, window=None).path == "pallas_mosaic_gpu"
    assert fam.choose("auto", head_dim=64, window=8).path == "pallas_gpu"
    logged = paths._LOGGED  # pylint: disable=protected-access
    assert ("toy_unchecked", "pallas_gpu", "pallas_mosaic_gpu: window=8: not yet checked") in logged
    assert fam.choose("pallas", head_dim=64, window=8).path == "pallas_gpu"
    assert fam.choose("pallas_mosaic_gpu", head_dim=32, window=8).path == "pallas_mosaic_gpu"
    mosaic = fam.path("pallas_mosaic_gpu")
    assert fam.why_not(mosaic, dict(window=8)) == ""
    assert fam.why_not(mosaic, dict(window=8), chosen=True) == "window=8: not yet checked"
    with pytest.raises(dispatch.PathError, match=r"^toy_unchecked impl='pallas' cannot run: "
                       r"pallas_mosaic_gpu: window=8: not yet checked; pallas_gpu: head_dim=32 "
                       r"is not one of \(64,\); impl='auto' would run xla$"):
      fam.choose("pallas", head_dim=32, window=8)
  finally:
    del dispatch._FAMILIES["toy_unchecked"]  # pylint: disable=protected-access


@pytest.mark.parametrize("impl,op,want", [
    ("auto", "block_sparse", "auto"), ("xla", "softmax", "xla"),
    ("reference", "head_routing", "reference"), ("cudnn", "softmax", "cudnn"),
    ("cudnn", "block_sparse", "auto"), ("pallas", "softmax", "auto"),
    ("pallas", "head_routing", "pallas"), ("pallas_tpu", "memory_chunk", "pallas_tpu"),
    ("pallas_gpu", "softmax", "auto"),
])
def test_one_rule_maps_a_mechanism_impl_to_each_op(impl, op, want):
  assert dispatch.op_impl(impl, op) == want


def test_mechanism_impl_errors_are_one_line():
  # dynamic_mask forced onto the GPU kernel on CPU: the dispatcher's error, not a KeyError.
  attn = build("dynamic_mask", impl="pallas_gpu")
  x, pos = random_inputs(batch=1, length=8)
  with pytest.raises(dispatch.PathError, match=r"^block_sparse impl='pallas_gpu' cannot run: "
                     "backend is cpu"):
    jax.eval_shape(lambda x: attn(x, positions=pos), x)  # the error comes at trace time
  with pytest.raises(ConfigError, match=r"^model.attention.impl='cudnn': no op of linear has "
                     "that path"):
    build("linear", impl="cudnn")
  with pytest.raises(ConfigError, match=r"model.attention.impl='fast' is not one of"):
    build("softmax", impl="fast")


def _kernels(module, x, pos) -> set[str]:
  """The pallas_calls of the module's lowered forward (a fresh lambda: jit would reuse a trace
  made under another switch)."""
  return kernels.lowered_pallas_names(lambda x: module(x, positions=pos)[0], x)


def test_interpret_switch_runs_a_mechanism_on_its_pallas_kernel():
  """(Its numbers against the reference path: tests/attention/test_mechanisms.py.)"""
  attn = build("linear", d_model=32, num_heads=2, impl="auto")  # head_dim 16
  x, pos = random_inputs(batch=1, length=16)
  assert not _kernels(attn, x, pos)  # CPU: the xla path
  with dispatch.interpret_kernels("gpu"):
    assert _kernels(attn, x, pos) == {"linear_scan"}
  with dispatch.interpret_kernels("tpu"):
    assert _kernels(attn, x, pos) == {"linear_scan_tpu"}
  with pytest.raises(ValueError, match="platform must be one of"):
    with dispatch.interpret_kernels("cuda"):
      pass


def test_deep_memory_has_no_kernel_said_once_under_auto_and_refused_when_forced():
  from effattn.kernels import paths  # noqa: E402
  opts = {"variant": "lmm", "depth": 2, "chunk_size": 4, "conv_size": 2}
  x, pos = random_inputs(batch=1, length=8, d_model=16)
  with dispatch.interpret_kernels("gpu"):
    deep = build("neural_memory", d_model=16, num_heads=2, impl="auto",
                 neural_memory=opts)
    y, _ = deep(x, positions=pos)
    assert np.all(np.isfinite(np.asarray(y)))
    assert any(op == "memory_chunk" and path == "xla" and "depth=2" in why
               for op, path, why in paths._LOGGED)  # pylint: disable=protected-access
    forced = build("neural_memory", d_model=16, num_heads=2, impl="pallas",
                   neural_memory=opts)
    with pytest.raises(dispatch.PathError, match=r"^memory_chunk impl='pallas' cannot run: "
                       r"pallas_gpu: depth=2: the kernels hold the linear \(depth-1\) memory "
                       r"only.*; impl='auto' would run xla$"):
      forced(x, positions=pos)


def test_lower_for_chooses_as_on_the_device_without_interpreting():
  with dispatch.lower_for("gpu"):
    assert dispatch.family("softmax").choose(
        "auto", dtype=BF16, head_dim=64, dense_mask=False, segments=False, causal=True,
        window=None) == ("cudnn", False)
    assert dispatch.family("block_sparse").choose("pallas", head_dim=64) == ("pallas_gpu", False)
  with dispatch.lower_for("tpu"):
    assert dispatch.family("head_routing").choose("auto", head_dim=64) == ("pallas_tpu", False)
