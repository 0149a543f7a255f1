"""The Mosaic GPU (Hopper) forward of the landmark grouped softmax on CPU: its tile arithmetic
and CTA walk (run here on plain arrays) give the Triton forward's o and lse; the kernel lowers
for cuda, alone and under jax.grad through the op with impl="pallas_mosaic_gpu" (the Mosaic
forward plus the Triton backward); the dispatcher keeps "auto" off it until its GPU check, and
both it and the kernel refuse what they cannot run in one line. The Mosaic backward
(bwd="mosaic": its dQ and dK/dV kernels): its tile arithmetic and both kernels' walks on plain
arrays give the Triton backward's dq, dk, dv; it lowers for cuda alone and under jax.grad.
Numbers of the kernels themselves need the GPU (no wgmma interpreter here; the backward runs in
jax's Mosaic GPU interpreter in scripts/interpret_grouped_softmax_mosaic.py):
scripts/bench_landmark.py --paths pallas_mosaic_gpu,pallas_mosaic_gpu_bwd."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from effattn.attention.landmark import block_groups
from effattn.kernels import dispatch, hlo
from effattn.kernels.grouped_softmax import api as grouped
from effattn.kernels.grouped_softmax import pallas_gpu

mgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu",
                           reason="this jax has no Pallas Mosaic GPU")
if not hasattr(mgpu, "LoweringSemantics") or not hasattr(mgpu.LoweringSemantics, "Warpgroup"):
  pytest.skip("this jax's Mosaic GPU has no warpgroup lowering semantics", allow_module_level=True)

from effattn.kernels.grouped_softmax import pallas_mosaic_gpu  # noqa: E402

LT, BLOCK_LEN = 64, 50


def _ids(t: int = 300):
  """gid, seg [2, T]: row 0 packs segments of 75, 130 and 40 tokens and 55 of padding (groups
  0-1, 2-4, 5, 6-7: segments start on even and odd groups, lengths ragged); row 1 is one
  segment starting mid-block (positions from 3: 47, 50 x 5, 3 tokens)."""
  seg, pos = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
  start = 0
  for s_id, n in ((1, 75), (2, 130), (3, 40)):
    seg[0, start:start + n], pos[0, start:start + n] = s_id, np.arange(n)
    start += n
  seg[1], pos[1] = 1, np.arange(t) + 3
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  return block_groups(pos, seg, BLOCK_LEN), seg


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _tiled(d: int, max_groups: int, h: int = 2, dtype=jnp.bfloat16):
  """The kernel's inputs as api.kernel_attention builds them: qg, kg, vg [2, G * 64, H, D]
  (each group's landmark key in its key tile's last slot), glen, gfirst [2, Gp]."""
  gid, seg = _ids()
  lay = grouped.relayout(gid, seg, max_groups=max_groups, tile=LT)
  b, t = gid.shape
  q, k, v, kl = (jax.random.normal(kk, (b, t, h, d)).astype(dtype)
                 for kk in jax.random.split(jax.random.key(d), 4))
  mask = lay["valid"][:, :, None, None]
  qg, kg, vg = (jnp.where(mask, jax.vmap(lambda x, i: x[i])(x, lay["slot_tok"]), 0)
                for x in (q, k, v))
  kg = kg.reshape(b, max_groups, LT, h, d).at[:, :, -1].set(kl[:, :max_groups]).reshape(qg.shape)
  return qg, kg, vg, lay["glen"], lay["gfirst"]


def _emulate(qg, kg, vg, glen, gfirst, scale):
  """The kernel's consumers on plain arrays: query group gc walks its CTA's streamed key groups
  (cta_range) with its roles, tile_update per tile (P rounded to the input dtype for P V, as
  the kernel's wgmma takes it), finish. Returns o [B, N, H, D] float32, lse [B, H, N]."""
  b, n, h, d = qg.shape
  n_groups = n // LT
  g2 = 2 * -(-n_groups // 2)
  c2 = scale * np.log2(np.e)
  pad = g2 - glen.shape[1]
  if pad > 0:
    glen = jnp.pad(glen, ((0, 0), (0, pad)))
    gfirst = jnp.concatenate([gfirst, jnp.broadcast_to(jnp.arange(glen.shape[1] - pad, g2),
                                                       (b, pad))], 1)
  qp = jnp.pad(qg, ((0, 0), (0, g2 * LT - n), (0, 0), (0, 0)))
  iota = lambda dim: lax.broadcasted_iota(jnp.int32, (LT, LT), dim)  # noqa: E731
  row = lambda x: x[:, None]  # noqa: E731

  def consumer(q_t, k_h, v_h, gl, gf, gc):  # q_t [64, D]; k_h, v_h [N, D]; gl, gf [G2]
    g0 = gc - gc % 2
    lo, count = pallas_mosaic_gpu.cta_range(gf[g0], gf[g0 + 1], g0, n_groups)

    def step(j, carry):
      acc, m, l = carry
      gk = lo + j
      k_t, v_t = (lax.dynamic_slice_in_dim(x, gk * LT, LT) for x in (k_h, v_h))
      s = jnp.dot(q_t, k_t.T, preferred_element_type=jnp.float32) * c2
      land, own = pallas_mosaic_gpu.roles(gk, gc, gf[gc])
      p, alpha, m, l = pallas_mosaic_gpu.tile_update(s, gl[gk], land, own, m, l, iota=iota,
                                                     bcast=row)
      pv = jnp.dot(p.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)
      return alpha[:, None] * acc + pv, m, l

    init = (jnp.zeros((LT, d)), jnp.full((LT,), pallas_mosaic_gpu.MASK_VALUE), jnp.zeros((LT,)))
    return pallas_mosaic_gpu.finish(*lax.fori_loop(0, count, step, init), bcast=row)

  per_group = jax.vmap(consumer, in_axes=(0, None, None, None, None, 0))
  per_head = jax.vmap(per_group, in_axes=(0, 0, 0, None, None, None))
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None))
  heads_first = lambda x: jnp.moveaxis(x, 2, 1)  # noqa: E731  [B, H, N, D]
  o, lse = jax.jit(per_row)(heads_first(qp).reshape(b, h, g2, LT, d), heads_first(kg),
                            heads_first(vg), glen, gfirst, jnp.arange(g2))
  # o [B, H, G2, 64, D], lse [B, H, G2, 64]
  o = jnp.moveaxis(o.reshape(b, h, g2 * LT, d), 1, 2)[:, :n]
  return o, lse.reshape(b, h, g2 * LT)[:, :, :n]


@pytest.mark.parametrize("max_groups", [9])  # odd: the last CTA's second group is padding
def test_kernel_arithmetic_gives_the_triton_forward(max_groups):
  """tile_update / finish over cta_range's tiles with roles(): the Triton forward's o and lse
  (interpret mode) on several segments (starting on even and odd groups), ragged groups,
  absent groups and the padded group of an odd G."""
  qg, kg, vg, glen, gfirst = _tiled(64, max_groups)
  scale = 64 ** -0.5
  o, lse = _emulate(qg, kg, vg, glen, gfirst, scale)
  want_o, want_lse = pallas_gpu.forward(qg, kg, vg, glen, gfirst, lt=LT, scale=scale,
                                        interpret=True)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(o), np.asarray(want_o.astype(jnp.float32)),
                             atol=2e-2, rtol=2e-2)


def _backward_inputs(d: int, max_groups: int, h: int = 2):
  """The backward's inputs as api._kernel_bwd builds them, from the Triton forward (interpret
  mode): qg, kg, vg, lse, do (zero on invalid slots), delta, glen, gfirst, glast; and scale."""
  qg, kg, vg, glen, gfirst = _tiled(d, max_groups, h)
  glast = grouped.relayout(*_ids(), max_groups=max_groups, tile=LT)["glast"]
  scale = d ** -0.5
  o, lse = pallas_gpu.forward(qg, kg, vg, glen, gfirst, lt=LT, scale=scale, interpret=True)
  b, n = qg.shape[:2]
  valid = (jnp.arange(LT)[None, None, :] < glen[:, :n // LT, None]).reshape(b, n)
  do = jnp.where(valid[:, :, None, None], jax.random.normal(jax.random.key(7), qg.shape),
                 0).astype(qg.dtype)
  delta = jnp.moveaxis(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1), 1, 2)
  return (qg, kg, vg, lse, do, delta, glen, gfirst, glast), scale


def _emulate_backward(qg, kg, vg, lse, do, delta, glen, gfirst, glast, scale):
  """The backward kernels' consumers on plain arrays: dQ's query group gc walks cta_range's
  key groups with roles(), dK/dV's key group gk walks dkv_range's query groups with
  dkv_roles(), tile_grads per tile (P and dS rounded to the input dtype, as wgmma takes them).
  Returns dq, dk, dv [B, N, H, D] float32."""
  b, n, h, d = qg.shape
  n_groups = n // LT
  g2 = 2 * -(-n_groups // 2)
  glen2, gfirst2 = pallas_mosaic_gpu._pad_meta(glen, gfirst, g2)
  _, glast2 = pallas_mosaic_gpu._pad_meta(glen, glast, g2)
  pad = lambda x, axis: pallas_mosaic_gpu._pad_to(x, axis, g2 * LT)  # noqa: E731
  c2 = scale * np.log2(np.e)
  dt = qg.dtype
  iota = lambda dim: lax.broadcasted_iota(jnp.int32, (LT, LT), dim)  # noqa: E731
  row = lambda x: x[:, None]  # noqa: E731
  mm = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
  cut = lambda x, g: lax.dynamic_slice_in_dim(x, g * LT, LT)  # noqa: E731

  def dq_group(q_h, do_h, lse_h, delta_h, k_h, v_h, gl, gf, gc):
    g0 = gc - gc % 2
    lo, count = pallas_mosaic_gpu.cta_range(gf[g0], gf[g0 + 1], g0, n_groups)
    q_t, do_t, lse_t, delta_t = (cut(x, gc) for x in (q_h, do_h, lse_h, delta_h))

    def step(j, dq):
      gk = lo + j
      k_t, v_t = cut(k_h, gk), cut(v_h, gk)
      land, own = pallas_mosaic_gpu.roles(gk, gc, gf[gc])
      _, ds = pallas_mosaic_gpu.tile_grads(mm(q_t, k_t.T) * c2, mm(do_t, v_t.T), gl[gk], land,
                                           own, lse_t, delta_t, iota=iota, bcast=row)
      return dq + mm(ds.astype(dt), k_t)

    return lax.fori_loop(0, count, step, jnp.zeros((LT, d))) * scale

  def dkv_group(q_h, do_h, lse_h, delta_h, k_h, v_h, gl, gla, gk):
    g0 = gk - gk % 2
    count = pallas_mosaic_gpu.dkv_range(gla[g0], gla[g0 + 1], g0, n_groups)
    k_t, v_t = cut(k_h, gk), cut(v_h, gk)

    def step(j, carry):
      gq = g0 + j
      q_t, do_t, lse_t, delta_t = (cut(x, gq) for x in (q_h, do_h, lse_h, delta_h))
      land, own = pallas_mosaic_gpu.dkv_roles(gq, gk, gla[gk])
      p, ds = pallas_mosaic_gpu.tile_grads(mm(q_t, k_t.T) * c2, mm(do_t, v_t.T), gl[gk], land,
                                           own, lse_t, delta_t, iota=iota, bcast=row)
      dk, dv = carry
      return dk + mm(ds.astype(dt).T, q_t), dv + mm(p.astype(dt).T, do_t)

    dk, dv = lax.fori_loop(0, count, step, (jnp.zeros((LT, d)), jnp.zeros((LT, d))))
    return dk * scale, dv

  def run(fn, meta):
    per_group = jax.vmap(fn, in_axes=(None,) * 8 + (0,))
    per_head = jax.vmap(per_group, in_axes=(0,) * 6 + (None, None, None))
    per_row = jax.vmap(per_head, in_axes=(0,) * 8 + (None,))
    heads_first = lambda x: jnp.moveaxis(pad(x, 1), 2, 1)  # noqa: E731  [B, H, N2, D]
    return jax.jit(per_row)(heads_first(qg), heads_first(do), pad(lse, 2), pad(delta, 2),
                            heads_first(kg), heads_first(vg), glen2, meta, jnp.arange(g2))

  back = lambda x: jnp.moveaxis(x.reshape(b, h, g2 * LT, d), 1, 2)[:, :n]  # noqa: E731
  dq = run(dq_group, gfirst2)
  dk, dv = run(dkv_group, glast2)
  return back(dq), back(dk), back(dv)


@pytest.mark.parametrize("max_groups", [9])
def test_backward_arithmetic_gives_the_triton_backward(max_groups):
  """tile_grads over the dQ kernel's walk (cta_range, roles) and the dK/dV kernel's
  (dkv_range, dkv_roles): the Triton backward's dq, dk (the landmark keys' rows included), dv
  in interpret mode, on packed segments, ragged and absent groups and an odd G."""
  args, scale = _backward_inputs(64, max_groups)
  got = _emulate_backward(*args, scale)
  want = pallas_gpu.backward(*args, lt=LT, scale=scale, interpret=True)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    w = np.asarray(w.astype(jnp.float32))
    err = np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w))
    assert err < 2e-2, (name, err)
  dk_land = np.asarray(want[1].astype(jnp.float32)).reshape(2, max_groups, LT, -1)[:, :, -1]
  assert np.max(np.abs(dk_land)) > 0  # the landmark keys' gradients are compared, not zeros


def test_tile_grads_is_common_grads_step():
  """One tile per role (landmark path, own group, neither) against common.grads_step, which
  takes the same scores and the roles as scalars."""
  from effattn.kernels.grouped_softmax import common
  ks = jax.random.split(jax.random.key(3), 6)
  q, k, v, do = (jax.random.normal(kk, (LT, 32)) for kk in ks[:4])
  lse = jax.random.normal(ks[4], (LT,)) + 3.0
  delta = jax.random.normal(ks[5], (LT,))
  c2 = 0.2
  iota = lambda dim: lax.broadcasted_iota(jnp.int32, (LT, LT), dim)  # noqa: E731
  for land, own in ((True, False), (False, True), (False, False)):
    want = common.grads_step(q, k, v, 41, land, own, do, lse, delta, c2, LT)
    s = jnp.dot(q, k.T) * c2
    got = pallas_mosaic_gpu.tile_grads(s, jnp.dot(do, v.T), 41, jnp.bool_(land), jnp.bool_(own),
                                       lse, delta, iota=iota, bcast=lambda x: x[:, None])
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)


def _mosaic_calls(text: str) -> int:
  return text.count("custom_call @mosaic_gpu")


@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16),
                                     (64, jnp.float16)])
def test_forward_lowers_for_cuda_with_the_triton_contract(d, dtype):
  """One Mosaic GPU kernel (odd G: a padded last group), o and lse shaped and typed as the
  Triton forward's."""
  x = jax.ShapeDtypeStruct((2, 9 * LT, 2, d), dtype)
  meta = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  mosaic = functools.partial(pallas_mosaic_gpu.forward, lt=LT, scale=d ** -0.5)
  text = jax.jit(mosaic).trace(x, x, x, meta, meta).lower(lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 1 and "landmark_grouped_mgpu_fwd" in text
  triton = functools.partial(pallas_gpu.forward, lt=LT, scale=d ** -0.5)
  assert jax.eval_shape(mosaic, x, x, x, meta, meta) == jax.eval_shape(triton, x, x, x, meta,
                                                                       meta)


def _stand_in_hopper(monkeypatch, cc: str = "9.0"):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(grouped, "_hopper", lambda: "" if cc.startswith("9") else
                      f"compute capability {cc} is not 9.x")


@pytest.mark.parametrize("d", [64, 128])
def test_grad_lowers_the_mosaic_forward_and_the_triton_backward(monkeypatch, d):
  """impl="pallas_mosaic_gpu", bwd="triton" under jax.grad, on packed segments with ragged
  groups: the kernel branch of the lax.cond is the Mosaic forward and the Triton dQ and dK/dV
  kernels (no Triton forward)."""
  bwd = "triton"
  _stand_in_hopper(monkeypatch)
  gid, seg = _ids()
  x = jax.ShapeDtypeStruct((*gid.shape, 2, d), jnp.bfloat16)

  def loss(q, k, v, k_land, gid, seg):
    o = grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=BLOCK_LEN, tile=LT,
                                impl="pallas_mosaic_gpu", bwd=bwd)
    return jnp.sum(o.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, x, gid, seg).lower(
      lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 1 and "landmark_grouped_mgpu_fwd" in text
  names = [n for n in hlo.kernel_names(text) if n.startswith("landmark_grouped")]
  assert names == ["landmark_grouped_dq", "landmark_grouped_dkv"], names


@pytest.mark.parametrize("d,bwd", [(64, None), (128, None), (128, "mosaic")])
def test_grad_lowers_the_mosaic_forward_and_backward(monkeypatch, d, bwd):
  """bwd="mosaic" (the default) under jax.grad, packed segments, ragged groups: three Mosaic
  GPU kernels (forward, dQ, dK/dV) and no Triton landmark kernel."""
  _stand_in_hopper(monkeypatch)
  gid, seg = _ids()
  x = jax.ShapeDtypeStruct((*gid.shape, 2, d), jnp.bfloat16)

  def loss(q, k, v, k_land, gid, seg):
    o = grouped.grouped_softmax(q, k, v, k_land, gid, seg, block_len=BLOCK_LEN, tile=LT,
                                impl="pallas_mosaic_gpu", bwd=bwd)
    return jnp.sum(o.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(x, x, x, x, gid, seg).lower(
      lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 3
  for name in ("landmark_grouped_mgpu_fwd", "landmark_grouped_mgpu_dq",
               "landmark_grouped_mgpu_dkv"):
    assert name in text, name
  assert not [n for n in hlo.kernel_names(text) if n.startswith("landmark_grouped")]


@pytest.mark.parametrize("d", [64, 128])
def test_backward_lowers_for_cuda_with_the_triton_contract(d):
  """Two Mosaic GPU kernels at an odd G (a padded last group in each), dq, dk, dv shaped and
  typed as the Triton backward's."""
  x = jax.ShapeDtypeStruct((2, 9 * LT, 2, d), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((2, 2, 9 * LT), jnp.float32)
  meta = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  args = (x, x, x, vec, x, vec, meta, meta, meta)
  mosaic = functools.partial(pallas_mosaic_gpu.backward, lt=LT, scale=d ** -0.5, bwd="mosaic")
  text = jax.jit(mosaic).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 2
  assert "landmark_grouped_mgpu_dq" in text and "landmark_grouped_mgpu_dkv" in text
  triton = functools.partial(pallas_gpu.backward, lt=LT, scale=d ** -0.5)
  assert jax.eval_shape(mosaic, *args) == jax.eval_shape(triton, *args)


def test_bwd_names_one_of_the_backwards():
  with pytest.raises(ValueError, match=r"bwd='cudnn' is not one of \('mosaic', 'triton'\)"):
    pallas_mosaic_gpu.backward(*[None] * 9, lt=LT, scale=0.1, bwd="cudnn")
  x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  gid, seg = jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32)
  with pytest.raises(ValueError, match=r"^bwd='fast' is not one of \('mosaic', 'triton'\)"):
    grouped.grouped_softmax(x, x, x, x, gid, seg, bwd="fast")


SHAPES = dict(head_dim=128, dtype="bfloat16", block_len=BLOCK_LEN, tile=LT)


def test_auto_takes_the_mosaic_kernels_on_hopper(monkeypatch):
  """First in the table and checked on an H200: on a (stand-in) Hopper GPU "auto" and "pallas"
  take it for bf16 at head_dim 64 / 128; float32, head_dim 32 and a non-Hopper GPU fall back to
  Triton; its name reaches the op from a mechanism's impl."""
  _stand_in_hopper(monkeypatch)
  fam = grouped.FAMILY
  assert fam.names[:2] == ("pallas_mosaic_gpu", "pallas_gpu")
  for impl in ("auto", "pallas", "pallas_mosaic_gpu"):
    assert fam.choose(impl, **SHAPES) == ("pallas_mosaic_gpu", False), impl
    assert fam.choose(impl, **{**SHAPES, "head_dim": 64}) == ("pallas_mosaic_gpu", False)
  assert fam.choose("auto", **{**SHAPES, "dtype": "float32"}) == ("pallas_gpu", False)
  assert fam.choose("auto", **{**SHAPES, "head_dim": 32}) == ("pallas_gpu", False)
  assert dispatch.op_impl("pallas_mosaic_gpu", "grouped_softmax") == "pallas_mosaic_gpu"
  _stand_in_hopper(monkeypatch, cc="8.0")
  assert fam.choose("auto", **SHAPES) == ("pallas_gpu", False)


def test_forced_off_hopper_names_the_compute_capability(monkeypatch):
  _stand_in_hopper(monkeypatch, cc="8.0")
  with pytest.raises(dispatch.PathError, match=r"^grouped_softmax impl='pallas_mosaic_gpu' "
                     r"cannot run: compute capability 8.0 is not 9.x; impl='auto' would run "
                     r"pallas_gpu$"):
    grouped.FAMILY.choose("pallas_mosaic_gpu", **SHAPES)


@pytest.mark.parametrize("dtype,d,why", [
    (jnp.float32, 64, r"dtype=float32 is not one of \('bfloat16',\)"),
    (jnp.bfloat16, 32, r"head_dim=32 is not one of \(64, 128\)"),
])
def test_forced_refuses_float32_and_head_dim_32_in_one_line(monkeypatch, dtype, d, why):
  _stand_in_hopper(monkeypatch)
  x = jnp.zeros((1, 128, 1, d), dtype)
  gid, seg = jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32)
  with pytest.raises(dispatch.PathError) as err:
    grouped.grouped_softmax(x, x, x, x, gid, seg, block_len=BLOCK_LEN, tile=LT,
                            impl="pallas_mosaic_gpu")
  message = str(err.value)
  assert "\n" not in message
  assert re.fullmatch(rf"grouped_softmax impl='pallas_mosaic_gpu' cannot run: {why}; "
                      r"impl='auto' would run pallas_gpu", message), message


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": jnp.float32}, r"q.dtype=float32 is not bfloat16 or float16 .*impl='pallas_gpu'"),
    ({"d": 96}, r"head_dim=96 is not one of \(64, 128\); use impl='pallas_gpu'"),
    ({"lt": 32}, r"tile=32 is not 64 .*use tile=64 or impl='pallas_gpu'"),
    ({"interpret": True}, "interpret=True cannot run .*impl='pallas_gpu' with interpret=True"),
])
def test_kernel_refuses_with_a_value_error_naming_the_fix(kwargs, match):
  d, dtype, lt = kwargs.pop("d", 64), kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("lt", LT)
  q = jnp.zeros((1, 128, 1, d), dtype)
  meta = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match=match):
    pallas_mosaic_gpu.forward(q, q, q, meta, meta, lt=lt, scale=0.1, **kwargs)


@pytest.mark.parametrize("bwd", [False, True])
@pytest.mark.parametrize("outcome,timed", [("pass", True), ("fail", False), ("skipped", False)])
def test_bench_checks_the_mosaic_path_before_timing_it(monkeypatch, tmp_path, outcome, timed,
                                                       bwd):
  """scripts/bench_landmark.py --paths ...,pallas_mosaic_gpu (check and timing stubbed): the
  path is checked even under --no_check, timed only when every case that ran passed, and
  otherwise reported with the reason (CPU: skipped, no crash). bwd: the paths of the Mosaic
  forward with the Mosaic backward (pallas_mosaic_gpu_bwd), checked as their own label."""
  from effattn.testing.scripts import load_script
  bench = load_script("bench_landmark")
  checked, skips = [], []
  rows = {"pass": [{"ok": True, "dtype": "bfloat16", "D": 128, "max_rel_err": {"o": 1e-3}}],
          "fail": [{"ok": False, "dtype": "bfloat16", "D": 128, "max_rel_err": {"o": 1.0}}],
          "skipped": [{"ok": True, "skipped": "backend is cpu", "max_rel_err": {}}]}[outcome]

  def check(shape, block_len, tile, kv_splits=None, impl="pallas_gpu"):
    checked.append(impl)
    return rows

  def bench_one(b, t, h, d, block_len, tile, reps, tuning=(), paths=bench.PATHS, skip=None):
    skips.append(dict(skip or {}))
    return {"B": b, "T": t, **{f"{p}_skipped": why for p, why in (skip or {}).items() if why}}

  monkeypatch.setattr(bench, "check", check)
  monkeypatch.setattr(bench, "bench_one", bench_one)
  monkeypatch.setattr(bench, "why_not_here", lambda *a: "")  # a stand-in Hopper at --dim 128
  label = "pallas_mosaic_gpu_bwd" if bwd else "pallas_mosaic_gpu"
  argv = ["--out", str(tmp_path), "--no_check", "--tune", "", "--kv_splits", "", "--shapes",
          "2x4096", "--paths", f"kernel,{label},{label}_core"]
  if outcome == "fail":
    with pytest.raises(SystemExit):
      bench.main(argv)
  else:
    bench.main(argv)
  assert checked == [label]  # --no_check skips (a), not the Mosaic check
  assert set(skips[0]) == {label, f"{label}_core"}
  assert (not any(skips[0].values())) == timed, skips
