"""The landmark grouped-softmax kernels (Triton pallas_gpu.py and Mosaic pallas_tpu.py of
kernels/grouped_softmax, interpret mode) against the dense grouped_softmax_attention: output and
gradients of q, k, v and the landmark keys, in f32 and bf16, with ragged lengths, packed
segments + padding, several block lengths and the lax.cond fallback; plus the module on the
kernel path against its chunked path."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention.landmark import block_groups
from effattn.kernels import dispatch
from effattn.kernels.grouped_softmax import api as grouped
from effattn.kernels.grouped_softmax import grouped_softmax_attention
from tests.attention import oracles

# Tolerance relative to the largest reference value.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _layout(kind: str, b: int, t: int):
  """positions, segment_ids (or None) [B, T] for a layout kind."""
  idx = np.arange(t)
  if kind == "one":
    return jnp.asarray(np.broadcast_to(idx, (b, t))), None
  # Row 0: two packed segments + padding (segment 0, position 0); row 1: one segment that
  # starts mid-block (positions from 3) + padding.
  seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  a, c = t // 3, t - t // 5
  seg[0, :a], seg[0, a:c] = 1, 2
  pos[0, :a], pos[0, a:c] = np.arange(a), np.arange(c - a)
  if b > 1:
    seg[1, :c], pos[1, :c] = 1, np.arange(c) + 3
  return jnp.asarray(pos), jnp.asarray(seg)


def _inputs(name, b, t, h, d, dtype):
  ks = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 5)
  q, k, v, k_land, do = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype)
                         for kk in ks)
  return q, k, v, k_land, do


def _close(name, want, got, dtype):
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  assert np.all(np.isfinite(got)), f"{name}: not finite"
  atol = TOL[dtype] * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


CASES = {
    # name: (B, T, H, D), block_len, tile, layout, dtype, max_groups
    "packed-f32": ((2, 40, 2, 16), 8, 16, "packed", jnp.float32, None),
    "packed-bf16": ((2, 40, 2, 32), 8, 16, "packed", jnp.bfloat16, None),
    "short-blocks-ragged-f32": ((1, 33, 1, 16), 5, 16, "packed", jnp.float32, None),
    "block50-tile64-ragged-f32": ((1, 110, 1, 16), 50, 64, "one", jnp.float32, None),
    "fallback-f32": ((2, 40, 2, 16), 8, 16, "packed", jnp.float32, 4),
}
# Both kernels share grouped_softmax/common.py's math; the Triton one skips two cases to keep
# the file fast (its loop structure is covered by the others).
KERNEL_CASES = [(impl, name) for name in CASES for impl in ("pallas_gpu", "pallas_tpu")
                if impl == "pallas_tpu" or name not in ("short-blocks-ragged-f32", "fallback-f32")]


def _value_and_grads(f, args, do):
  o, vjp = jax.vjp(f, *args)
  return o, vjp(do)


def _case(name):
  """Inputs, groups and segments of a case."""
  (b, t, h, d), block_len, _, layout, dtype, _ = CASES[name]
  pos, seg_ids = _layout(layout, b, t)
  gid = block_groups(pos, seg_ids, block_len)
  seg = jnp.ones((b, t), jnp.int32) if seg_ids is None else seg_ids
  return _inputs(name, b, t, h, d, dtype), gid, seg


@functools.cache
def _dense(name):
  """The oracle's output and gradients, in float32 (computed once per case)."""
  (q, k, v, k_land, do), gid, seg = _case(name)
  d = q.shape[-1]

  def dense(q, k, v, k_land):
    return grouped_softmax_attention(q, k, v, k_land, gid, seg, scale=d ** -0.5)[0]

  f32 = [x.astype(jnp.float32) for x in (q, k, v, k_land)]
  return jax.jit(_value_and_grads, static_argnums=0)(dense, f32, do.astype(jnp.float32))


@pytest.mark.parametrize("impl,name", KERNEL_CASES, ids=[f"{i}-{n}" for i, n in KERNEL_CASES])
def test_kernel_matches_dense(impl, name):
  (_, t, _, _), block_len, tile, _, dtype, max_groups = CASES[name]
  (q, k, v, k_land, do), gid, seg = _case(name)
  lay = grouped.relayout(gid, seg, max_groups=max_groups or grouped.default_max_groups(
      t, block_len), tile=tile)
  assert bool(lay["ok"]) == (max_groups is None)  # the fallback case really falls back

  def kernel(q, k, v, k_land):
    return grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=block_len,
                                   impl=impl, tile=tile, max_groups=max_groups, interpret=True)

  o_want, grads_want = _dense(name)
  o_got, grads_got = jax.jit(_value_and_grads, static_argnums=0)(kernel, (q, k, v, k_land), do)
  assert o_got.dtype == dtype
  _close("o", o_want, o_got, dtype)
  for gname, want, got in zip(("dq", "dk", "dv", "dk_land"), grads_want, grads_got):
    assert got.dtype == dtype, gname
    _close(gname, want, got, dtype)


def test_kernel_is_what_runs():
  b, t, h, d = 1, 20, 1, 16
  x = jnp.zeros((b, t, h, d))
  gid = block_groups(jnp.arange(t)[None], None, 8)
  seg = jnp.ones((b, t), jnp.int32)

  def jaxpr(impl):
    f = lambda x: grouped.grouped_softmax(x, x, x, x, gid, seg, block_len=8, tile=16,  # noqa
                                          impl=impl, interpret=True)
    return str(jax.make_jaxpr(f)(x))

  assert "landmark_grouped_fwd" in jaxpr("pallas_gpu")
  assert "landmark_grouped_tpu_fwd" in jaxpr("pallas_tpu")
  assert "landmark_grouped_fwd" in jaxpr("pallas")  # off TPU: the Triton kernel
  assert "landmark_grouped" not in jaxpr("auto")  # CPU: the chunked path
  assert "landmark_grouped" not in jaxpr("xla")


def test_tpu_backend_gets_the_mosaic_kernel(monkeypatch):
  x = jnp.zeros((1, 20, 1, 16))
  gid = block_groups(jnp.arange(20)[None], None, 8)
  seg = jnp.ones((1, 20), jnp.int32)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  # The module's "auto" and "pallas" reach grouped_softmax unchanged.
  for impl in {dispatch.op_impl("auto", "grouped_softmax"),
               dispatch.op_impl("pallas", "grouped_softmax")}:
    f = lambda x, impl=impl: grouped.grouped_softmax(  # noqa: E731
        x, x, x, x, gid, seg, block_len=8, tile=16, impl=impl, interpret=True)
    assert "landmark_grouped_tpu_fwd" in str(jax.make_jaxpr(f)(x)), impl


def test_bad_arguments_named():
  x = jnp.zeros((1, 8, 1, 16))
  gid, seg = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
  call = lambda **kw: grouped.grouped_softmax(x, x, x, x, gid, seg, **kw)  # noqa: E731
  with pytest.raises(ValueError, match="impl"):
    call(impl="triton")
  with pytest.raises(ValueError, match="tile"):
    call(tile=48)
  with pytest.raises(ValueError, match="block_len"):
    call(impl="pallas_gpu", block_len=50, tile=16)
  with pytest.raises(ValueError, match="head_dim"):
    y = jnp.zeros((1, 8, 1, 8))
    grouped.grouped_softmax(y, y, y, y, gid, seg, impl="pallas_gpu")
  with pytest.raises(ValueError, match="head_dim"):
    grouped.grouped_softmax(y, y, y, y, gid, seg, impl="pallas_tpu")
  with pytest.raises(ValueError, match="k_land"):
    grouped.grouped_softmax(x, x, x, x[:, :, :, :8], gid, seg)
  with pytest.raises(ValueError, match="dtypes"):
    grouped.grouped_softmax(x, x.astype(jnp.bfloat16), x, x, gid, seg)
  with pytest.raises(ValueError, match="tile"):
    oracles.build("landmark", landmark={"tile": 12})


def test_module_kernel_path_equals_chunked_path():
  opts = {"block_len": 8, "tile": 16, "query_chunk": 8, "top_k": 100}
  kernel = oracles.build("landmark", num_heads=2, impl="pallas",
                         landmark={**opts, "interpret": True})
  chunked = oracles.build("landmark", num_heads=2, impl="xla", landmark=opts)
  b, t = 2, 30
  x, _ = oracles.random_inputs(batch=b, length=t)
  pos, seg = _layout("packed", b, t)
  real = np.asarray(seg) > 0

  def loss(module, x):  # padded rows carry no loss, as in training
    y, _ = module(x, positions=pos, segment_ids=seg, train=True)
    return jnp.sum(jnp.where(real[..., None], y, 0.0) ** 2), y

  (l_k, y_k), g_k = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(kernel, x)
  (l_c, y_c), g_c = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(chunked, x)
  _close("y", y_c, y_k, jnp.float32)
  np.testing.assert_allclose(float(l_k), float(l_c), rtol=1e-5)
  for (path, a), (_, c) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(g_k)),
                               jax.tree_util.tree_leaves_with_path(nnx.state(g_c))):
    _close(f"grad {jax.tree_util.keystr(path)}", c, a, jnp.float32)


@pytest.mark.parametrize("max_groups,want", [(0, 0.0), (2, 1.0)])
def test_runtime_fallback_is_reported_in_aux(max_groups, want):
  """The module's kernel path (interpret switch, as on a GPU) says in aux how many rows took the
  lax.cond fallback: none with room for every block, all when the layout holds 2 blocks."""
  module = oracles.build("landmark", num_heads=2, impl="auto", landmark={
      "block_len": 8, "tile": 16, "query_chunk": 8, "max_groups": max_groups})
  x, _ = oracles.random_inputs(batch=2, length=30)
  pos, seg = _layout("packed", 2, 30)
  with dispatch.interpret_kernels("gpu"):
    y, aux = module(x, positions=pos, segment_ids=seg)
  assert float(aux["grouped_softmax_fallback_frac"]) == want
  y_ref, aux_ref = oracles.build("landmark", num_heads=2, impl="xla", landmark={
      "block_len": 8, "tile": 16, "query_chunk": 8})(x, positions=pos, segment_ids=seg)
  assert "grouped_softmax_fallback_frac" not in aux_ref  # a path with no runtime fallback
  real = np.asarray(seg) > 0
  _close("y", np.where(real[..., None], y_ref, 0), np.where(real[..., None], y, 0), jnp.float32)
