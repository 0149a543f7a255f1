"""grouped_softmax: the landmark grouped-softmax kernels (Triton pallas_gpu.py and Mosaic
pallas_tpu.py, interpret mode) against the dense grouped_softmax_attention: output and gradients
of q, k, v and the landmark keys, in f32 and bf16, with ragged lengths, packed segments +
padding, several block lengths and the lax.cond fallback; which kernel runs where; the
kernel path's row moves (gathers both ways, no scatter, the gradients of plain gathers). (The
landmark module on its kernel path: tests/attention/test_mechanisms.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.attention.landmark import block_groups
from effattn.kernels import dispatch, hlo
from effattn.kernels.grouped_softmax import api as grouped
from effattn.kernels.grouped_softmax import pallas_gpu
from effattn.kernels.grouped_softmax import grouped_softmax_attention
from effattn.testing import assert_close
from effattn.testing.inputs import case_key
from effattn.testing.mechanisms import build


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
  ks = jax.random.split(case_key(name), 5)
  q, k, v, k_land, do = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype)
                         for kk in ks)
  return q, k, v, k_land, do


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
  assert_close("o", o_want, o_got, dtype=dtype, reduction=t)
  for gname, want, got in zip(("dq", "dk", "dv", "dk_land"), grads_want, grads_got):
    assert got.dtype == dtype, gname
    assert_close(gname, want, got, dtype=dtype, reduction=t)


@pytest.mark.parametrize("q_groups", [2, 3])
def test_query_tiles_of_several_groups(q_groups):
  """The Triton kernels with query tiles of several groups (rows of mixed roles: landmark path,
  own group, neither; segments starting inside a tile) match the dense oracle."""
  name = "packed-f32"
  (_, t, _, _), block_len, tile, _, dtype, _ = CASES[name]
  (q, k, v, k_land, do), gid, seg = _case(name)

  def kernel(q, k, v, k_land):
    return grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=block_len,
                                   impl="pallas_gpu", tile=tile, q_groups=q_groups,
                                   interpret=True)

  o_want, grads_want = _dense(name)
  o_got, grads_got = jax.jit(_value_and_grads, static_argnums=0)(kernel, (q, k, v, k_land), do)
  assert_close("o", o_want, o_got, dtype=dtype, reduction=t)
  for gname, want, got in zip(("dq", "dk", "dv", "dk_land"), grads_want, grads_got):
    assert_close(gname, want, got, dtype=dtype, reduction=t)


def test_float32_query_tiles_past_shared_memory_are_refused():
  """float32 q_groups 2 x tile 64 x head_dim 128 asked 256 KiB of shared memory on an H200 (227
  KiB there) and failed at launch: the op refuses it in one line, before tracing a kernel."""
  t = 128
  gid, seg = block_groups(jnp.arange(t)[None], None, 63), jnp.ones((1, t), jnp.int32)
  for d, q_groups in ((128, 2), (64, 4)):
    x = jnp.zeros((1, t, 1, d), jnp.float32)
    with pytest.raises(ValueError, match=rf"q_groups={q_groups} .*shared memory.*q_groups=1"):
      grouped.grouped_softmax(x, x, x, x, gid, seg, block_len=63, tile=64, q_groups=q_groups,
                              impl="pallas_gpu", interpret=True)
  # bfloat16 tiles are half the bytes: the same launch is not refused.
  x = jnp.zeros((1, t, 1, 128), jnp.bfloat16)
  jax.eval_shape(functools.partial(grouped.grouped_softmax, block_len=63, tile=64, q_groups=2,
                                   impl="pallas_gpu", interpret=True), x, x, x, x, gid, seg)


def test_a_tile_holds_its_block_and_landmark():
  """block_len = tile - 1 fills the tile (the landmark takes the last slot); block_len = tile
  cannot run the kernel: a forced path names why, the layout's exactness flag refuses it."""
  t = 40
  x = jax.random.normal(jax.random.key(0), (1, t, 1, 16))
  seg = jnp.ones((1, t), jnp.int32)
  gid = block_groups(jnp.arange(t)[None], None, 15)
  want = jax.jit(lambda x: grouped_softmax_attention(x, x, x, x, gid, seg, scale=0.25)[0])(x)
  got = jax.jit(lambda x: grouped.grouped_softmax(x, x, x, x, gid, seg, block_len=15, tile=16,
                                                  impl="pallas_gpu", interpret=True))(x)
  assert_close("o", want, got, dtype=jnp.float32, reduction=t)
  with pytest.raises(ValueError, match="block_len=16 >= tile=16"):
    grouped.grouped_softmax(x, x, x, x, block_groups(jnp.arange(t)[None], None, 16), seg,
                            block_len=16, tile=16, impl="pallas_gpu", interpret=True)
  gid16 = block_groups(jnp.arange(t)[None], None, 16)
  assert not bool(grouped.relayout(gid16, seg, max_groups=8, tile=16)["ok"])


def test_kernel_is_what_runs():
  b, t, h, d = 1, 20, 1, 16
  x = jnp.zeros((b, t, h, d))
  gid = block_groups(jnp.arange(t)[None], None, 8)
  seg = jnp.ones((b, t), jnp.int32)

  def names(impl):
    f = lambda x: grouped.grouped_softmax(x, x, x, x, gid, seg, block_len=8, tile=16,  # noqa
                                          impl=impl, interpret=True)
    return hlo.pallas_call_names(f, x)

  assert names("pallas_gpu") == ["landmark_grouped_fwd"]
  assert names("pallas_tpu") == ["landmark_grouped_tpu_fwd"]
  assert names("pallas") == ["landmark_grouped_fwd"]  # off TPU: the Triton kernel
  assert names("auto") == names("xla") == []  # CPU: the chunked path


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
    assert hlo.pallas_call_names(f, x) == ["landmark_grouped_tpu_fwd"], impl


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
    build("landmark", landmark={"tile": 12})


# kv_splits 1 with q_groups 1 is the default kernel: test_kernel_matches_dense[pallas_gpu-*].
@pytest.mark.parametrize("name,q_groups,kv_splits", [
    ("packed-f32", 1, 2), ("packed-f32", 1, 3),
    ("short-blocks-ragged-f32", 1, 2), ("short-blocks-ragged-f32", 1, 3),
    ("packed-bf16", 1, 3), ("packed-f32", 2, 3), ("short-blocks-ragged-f32", 2, 2)])
def test_split_dkv_backward(name, q_groups, kv_splits):
  """kv_splits = S: S dK/dV programs per key tile, each a share of its query tiles (3 gives
  uneven shares and, for short ranges, empty ones), float32 partials summed after: output and
  every gradient (q, k, v, landmark keys) against the dense oracle, with packed segments +
  padding, a ragged T and query tiles of two groups."""
  (_, t, _, _), block_len, tile, _, dtype, _ = CASES[name]
  (q, k, v, k_land, do), gid, seg = _case(name)

  def kernel(q, k, v, k_land):
    return grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=block_len,
                                   impl="pallas_gpu", tile=tile, q_groups=q_groups,
                                   kv_splits=kv_splits, interpret=True)

  if kv_splits > 1:
    names = hlo.pallas_call_names(jax.grad(lambda *a: jnp.sum(kernel(*a).astype(jnp.float32)),
                                           argnums=(0, 1, 2, 3)), q, k, v, k_land)
    assert "landmark_grouped_dkv_split" in names and "landmark_grouped_dkv" not in names, names
  o_want, grads_want = _dense(name)
  o_got, grads_got = jax.jit(_value_and_grads, static_argnums=0)(kernel, (q, k, v, k_land), do)
  assert_close("o", o_want, o_got, dtype=dtype, reduction=t)
  for gname, want, got in zip(("dq", "dk", "dv", "dk_land"), grads_want, grads_got):
    assert got.dtype == dtype, gname
    assert_close(gname, want, got, dtype=dtype, reduction=t)


def test_split_shares_are_balanced():
  """_split_range partitions [lo, hi) into S shares of n // S or n // S + 1 tiles, in order;
  auto_kv_splits (kv_splits=0) gives 1 at the bench's B 2, H 8, T 4,096 grid and more for few
  heads of a short row."""
  for lo, hi, splits in ((0, 10, 3), (5, 6, 3), (7, 7, 2), (3, 20, 8), (0, 2, 4)):
    shares = [tuple(int(x) for x in pallas_gpu._split_range(lo, hi, s, splits))  # noqa: SLF001
              for s in range(splits)]
    assert shares[0][0] == lo and shares[-1][1] == hi
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [b - a for a, b in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == hi - lo
  n_groups = grouped.default_max_groups(4096, 50)
  assert pallas_gpu.auto_kv_splits(n_groups, 2, 8) == 1
  assert pallas_gpu.auto_kv_splits(32, 1, 2) == 8
  assert pallas_gpu.auto_kv_splits(n_groups, 2, 4) == 2
  with pytest.raises(ValueError, match="kv_splits=-1 must be a whole number >= 0"):
    x = jnp.zeros((1, 8, 1, 16))
    grouped.grouped_softmax(x, x, x, x, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32),
                            kv_splits=-1)


@pytest.mark.parametrize("kv_splits", [1, 2])
def test_split_dkv_lowers_for_cuda(kv_splits):
  """The backward lowers to Triton at the bench's tile (D 128, block_len 50, tile 64, bf16):
  forward, dQ and dK/dV are Triton custom calls; with kv_splits 2 the dK/dV call writes two
  float32 partials of dK and of dV."""
  b, t, h, d = 1, 200, 2, 128
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, k_land, gid, seg):
    o = grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=50, tile=64,
                                impl="pallas_gpu", kv_splits=kv_splits)
    return jnp.sum(o.astype(jnp.float32))

  with dispatch.lower_for("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, x, ids, ids).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert len(calls) == 3, len(calls)  # forward, dQ, dK/dV (the kernel branch of the lax.cond)
  names = hlo.kernel_names(text)
  dkv = "landmark_grouped_dkv_split" if kv_splits > 1 else "landmark_grouped_dkv"
  assert dkv in names and "landmark_grouped_dq" in names, names
  split_calls = [c for c in calls if "f32>" in c and "tensor<2x1x" in c]
  assert bool(split_calls) == (kv_splits > 1), split_calls


def _autodiff_kernel_attention(q, k, v, k_land, lay, st):
  """kernel_attention as it was before permute.permute: plain gathers (autodiff transposes them
  into scatter-adds) and the landmark keys set into their slots."""
  take = jax.vmap(lambda xb, ib: xb[ib])
  b, slots = lay["valid"].shape
  n_groups = slots // st.tile
  mask = lay["valid"][:, :, None, None]
  qg, kg, vg = (jnp.where(mask, take(x, lay["slot_tok"]), 0) for x in (q, k, v))
  rows = k_land.shape[1]
  klg = (k_land[:, :n_groups] if rows >= n_groups else
         jnp.pad(k_land, ((0, 0), (0, n_groups - rows), (0, 0), (0, 0))))
  h, d = k.shape[2:]
  kg = kg.reshape(b, n_groups, st.tile, h, d).at[:, :, -1].set(klg.astype(kg.dtype))
  kernel = grouped._kernel  # noqa: SLF001
  og = kernel(qg, kg.reshape(b, slots, h, d), vg, lay["glen"], lay["gfirst"], lay["glast"], st)
  return take(og, lay["tok_slot"])


PERMUTE_CASES = {
    # name: (B, T, H, D), block_len, tile, layout, dtype, landmark rows (None: T)
    "one-segment": ((1, 150, 2, 16), 50, 64, "one", jnp.float32, None),
    "packed-padded": ((2, 130, 2, 16), 8, 16, "packed", jnp.float32, None),
    "ragged-t-bf16": ((2, 113, 1, 32), 50, 64, "packed", jnp.bfloat16, None),
    "few-landmark-rows": ((1, 61, 1, 16), 8, 16, "one", jnp.float32, 8),  # k_land padded
}


@pytest.mark.parametrize("name", PERMUTE_CASES)
def test_row_permutation_grads_are_the_autodiff_gathers(name, monkeypatch):
  """The op on its kernel path (Triton, interpreted): output and gradients of q, k, v, k_land
  with permute.permute (gathers by the inverse maps) equal those of the plain gathers autodiff
  transposes into scatter-adds, to float32 rounding; on layouts where slot_tok and tok_slot
  really are inverse maps between the tokens and the valid slots, none of them a landmark's."""
  (b, t, h, d), block_len, tile, layout, dtype, land_rows = PERMUTE_CASES[name]
  pos, seg_ids = _layout(layout, b, t)
  gid = block_groups(pos, seg_ids, block_len)
  seg = jnp.ones((b, t), jnp.int32) if seg_ids is None else seg_ids
  lay = grouped.relayout(gid, seg, max_groups=grouped.default_max_groups(t, block_len),
                         tile=tile)
  assert bool(lay["ok"])  # the kernel branch runs
  slot_tok, tok_slot, valid = (np.asarray(lay[n]) for n in ("slot_tok", "tok_slot", "valid"))
  rows = np.arange(b)[:, None]
  assert (slot_tok[rows, tok_slot] == np.arange(t)).all()
  assert valid[rows, tok_slot].all() and valid.sum() == b * t
  assert not valid.reshape(b, -1, tile)[:, :, -1].any()
  q, k, v, k_land, do = _inputs(name, b, t, h, d, dtype)
  k_land = k_land[:, :land_rows]
  if land_rows is not None:
    assert land_rows <= valid.shape[1] // tile  # the padded branch of group_tiles

  def run():  # a new function each time: jit traces it again (and so sees the patch)
    def op(q, k, v, k_land):
      return grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=block_len,
                                     impl="pallas_gpu", tile=tile, interpret=True)
    return jax.jit(_value_and_grads, static_argnums=0)(op, (q, k, v, k_land), do)

  got = run()
  monkeypatch.setattr(grouped, "kernel_attention", _autodiff_kernel_attention)
  want = run()
  for gname, w, g in zip(("o", "dq", "dk", "dv", "dk_land"), jax.tree.leaves(want),
                         jax.tree.leaves(got)):
    assert g.dtype == w.dtype == dtype, gname
    w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
    assert np.abs(w).max() > 0, gname
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-7 * np.abs(w).max(), err_msg=gname)


@pytest.mark.parametrize("platform", ["gpu", "mosaic_gpu"])
def test_kernel_path_glue_has_no_scatter(platform):
  """jax.grad of the kernel path (relayout, group tiling, kernels, un-tiling; the lax.cond's
  xla branch is left out), lowered for cuda at the bench's tile (bf16, D 64, block_len 50,
  tile 64): its row moves are gathers both ways, with no scatter (atomics on GPU) and no
  landmark-slot set."""
  if platform == "mosaic_gpu":
    mgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if not hasattr(getattr(mgpu, "LoweringSemantics", None), "Warpgroup"):
      pytest.skip("this jax's Mosaic GPU has no warpgroup lowering semantics")
  b, t, h, d, block_len, tile = 2, 300, 2, 64, 50, 64
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  max_groups = 2 * -(-grouped.default_max_groups(t, block_len) // 2)  # even, as on Mosaic
  static = grouped._Static  # noqa: SLF001
  st = static(tile=tile, scale=d ** -0.5, interpret=False, platform=platform)

  def loss(q, k, v, k_land, gid, seg):
    lay = grouped.relayout(gid, seg, max_groups=max_groups, tile=tile)
    return jnp.sum(grouped.kernel_attention(q, k, v, k_land, lay, st).astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, x, ids, ids).lower(
      lowering_platforms=("cuda",)).as_text()
  prefix = "landmark_grouped_mgpu" if platform == "mosaic_gpu" else "landmark_grouped"
  kernels = (f"{prefix}_dq", f"{prefix}_dkv")
  assert all(name in text for name in kernels), kernels  # the backward is in this program
  # (Matched as an op: the Triton kernels' serialized IR may hold the word.)
  scatters = [line.strip()[:120] for line in text.splitlines() if "stablehlo.scatter" in line]
  assert not scatters, scatters
