"""Block-sparse flash attention in Pallas Mosaic GPU (Hopper: warpgroups, wgmma, TMA).

Same contract as pallas_gpu.py (the Triton backend): `forward` and `backward` take the arguments
api.py normalizes (lengths padded to the list's tiles, int32 lists) and return the same results.
Three warp-specialized kernels, each a CTA of three warpgroups:

  forward  grid (H, T/128, B):     two consumer warpgroups own 64 query rows each; a producer
                                   warpgroup streams the listed K/V tiles through `num_stages`
                                   shared-memory stages by TMA; the consumers run QK^T and PV on
                                   wgmma, taking turns on the tensor core (a schedule barrier)
                                   so one's softmax overlaps the other's matmul;
  dQ       grid (H, T/128, B):     the same split, streaming K/V, dq += dS K;
  dK/dV    grid (H_kv, S/128, B):  two consumer warpgroups own 64 keys each; the producer
                                   streams Q/dO tiles of every query head of the key head's
                                   group (GQA without repeats) from the transposed lists.

`backward(bwd=...)` also offers a dK/dV kernel over 64-query TMA stages ("staged") and the same
kernel adding dQ by TMA reduce-add ("fused", "fused_keys": one backward kernel); they compute
the same gradients but were slower on the H200 (docs/mosaic_gpu.md), so "split" (the dQ and
dK/dV kernels above) is the default.

A CTA covers 128 query rows (or keys), and both consumers walk one list. Lists made at tile 128
are used as they are; lists made at 64 are merged in pairs of rows (2c, 2c+1) and each consumer
masks the tiles that are not in its own row (the pair's union is streamed, so a pattern whose
paired rows differ costs up to twice its visited tiles: prefer block 128 here). Element masks
(causality by positions, the sliding window, segments, the top-w threshold) and the key bias are
the ones of common.py. Inputs must be bfloat16 or float16 (wgmma), head dim 64 or 128, tiles 64
or 128; anything else raises a ValueError naming the argument and the path to use instead (the
dispatcher's limits in api.py keep `auto` from choosing these kernels for such inputs).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from effattn.kernels.block_sparse.common import (LN2, LOG2E, Aux, block_mask_from_lists,
                                                 element_mask, lists_from_block_mask)

Q_VECS = ("q_pos", "q_seg", "q_thr", "q_thr_pos")
KV_VECS = ("kv_pos", "kv_seg", "kv_bias")
HEAD_DIMS = (64, 128)
TILES = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
WG_ROWS = 64  # rows of one consumer warpgroup's wgmma tile
CTA_ROWS = 2 * WG_ROWS  # two consumer warpgroups per CTA
# A masked score: -inf, so its exp2 is exactly 0; the running max starts finite so that a row
# whose visited scores are all masked stays NaN-free (alpha = exp2(finite) and p = 0).
M_INIT = -1e30
# Registers per thread of (each consumer, the producer) warpgroup: setmaxnreg's split of the
# 65,536 a CTA of 3 x 128 threads may hold (2 c + p <= 512). backward(registers=) tries others.
REGISTERS = (232, 40)

_WGMMA = plgpu.Layout.WGMMA
_ROW = _WGMMA.reduce(1)  # one value per row of a [64, N] wgmma tile
_COL = _WGMMA.reduce(0)  # one value per column
# jax 0.10 takes load(ref, idx, ...); 0.11 deprecates idx (index the ref instead).
_LOAD_TAKES_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
  """A 1-D slice of a GMEM or SMEM ref as a register array in `layout`."""
  if _LOAD_TAKES_IDX:
    return plgpu.load(ref, (), layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)


def _smem(shape, dtype):
  """Shared memory laid out for wgmma and TMA: 128-byte swizzle, (8, 128-byte) tiles."""
  elems = 128 // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(128)))


def _params():
  return plgpu.CompilerParams(approx_math=True,
                              lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _launch(kernel, name: str, args: dict, *, out_type, scratch, grid, grid_names):
  """One CTA of two consumer warpgroups and a producer over `grid`; `args` in kernel order.

  An argument that is a mutable jax Ref (jax.new_ref) is read and written in place: plgpu.kernel
  cannot take one (its batching wrapper), so such a launch goes through pl.kernel on a
  plgpu.Mesh, with the scratch allocated the way plgpu.kernel does it."""
  kernel.__name__ = name
  if not any(isinstance(x, jax.Ref) for x in args.values()):
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=grid_names, num_threads=3, thread_name="wg",
                        compiler_params=_params())(*args.values())
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg")

  def body(*refs):
    pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg")

  body.__name__ = name
  return pl.kernel(body, out_type=tuple(out_type), mesh=mesh,
                   compiler_params=_params())(*args.values())


def check_operands(q, k, v, interpret: bool, *, op: str, head_dim_fix: str) -> None:
  """The one-line ValueErrors every Mosaic GPU kernel here shares (op names the caller): no
  interpreter, wgmma dtypes, one dtype for q, k, v, head dims 64 / 128."""
  if interpret:
    raise ValueError(f"{op}: interpret=True cannot run (Mosaic GPU has no CPU interpreter for "
                     "wgmma); use impl='pallas_gpu' with interpret=True")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in DTYPES:
      raise ValueError(f"{op}: {name}.dtype={x.dtype} is not bfloat16 or float16 (wgmma); "
                       "cast the inputs to bfloat16 or use impl='pallas_gpu'")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast "
                     "them to one of bfloat16, float16")
  if q.shape[-1] not in HEAD_DIMS:
    raise ValueError(f"{op}: head_dim={q.shape[-1]} is not one of {HEAD_DIMS}; {head_dim_fix}")


def _check(q, k, v, block_q: int, block_k: int, interpret: bool):
  """ValueError, one line naming the argument and the fix, for what these kernels cannot run
  (api.py's dispatcher checks the same limits first, so `auto` never gets here with them)."""
  check_operands(q, k, v, interpret, op="pallas_mosaic_gpu",
                 head_dim_fix="use impl='xla' (the Pallas kernels all take these head dims only)")
  for name, x in (("block_q", block_q), ("block_k", block_k)):
    if x not in TILES:
      raise ValueError(f"pallas_mosaic_gpu: {name}={x} is not one of {TILES}; set {name} to "
                       "one of them or use impl='pallas_gpu'")


def _pad_to(x, axis: int, size: int, value=0):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _cta_lists(indices, counts, num_cols: int, tile: int):
  """Lists per 128-row CTA: (indices [B', H', nR', K], counts [B', H', nR'], member or None).

  Lists at tile 128 pass through. Lists at tile 64 are merged in row pairs (2c, 2c+1); member
  [B', H', nR', 2, K] int32 says whether slot j is in the list of the pair's row w.
  """
  if tile == CTA_ROWS:
    return indices, counts, None
  dense = block_mask_from_lists(indices, counts, num_cols)  # [B', H', nR, nC]
  dense = _pad_to(dense, 2, 2 * -(-dense.shape[2] // 2), False)
  pairs = dense.reshape(*dense.shape[:2], dense.shape[2] // 2, 2, num_cols)
  idx, cnt = lists_from_block_mask(jnp.any(pairs, axis=3))
  slots = jnp.broadcast_to(idx[:, :, :, None, :], (*idx.shape[:3], 2, idx.shape[-1]))
  member = jnp.take_along_axis(pairs, slots, axis=-1).astype(jnp.int32)
  return idx, cnt, member


def _kv_row(x, b, hk):
  """Index of (batch b, key head hk) into a per-key [B', Hk, S] array (Hk in {1, H_kv})."""
  return (b if x.shape[0] > 1 else 0, hk if x.shape[1] > 1 else 0)


def _q_row(x, b, h, num_heads: int, group: int):
  """Index of (batch b, query head h) into a per-query [B', Hq, T] array (Hq in {1, H_kv, H})."""
  hq = x.shape[1]
  return (b if x.shape[0] > 1 else 0,
          0 if hq == 1 else (h if hq == num_heads else lax.div(h, group)))


def _bcast(x, shape, dim: int):
  return lax.broadcast_in_dim(x, shape, [dim])


def _same(x):
  return x


def _masked(s, *, causal: bool, window: int | None, qv: dict, kv: dict, q_dim: int, q0, k0,
            skip_below=True):
  """Scores of one register tile with masked elements at -inf: common.element_mask with the
  per-query vectors (already broadcast) along axis `q_dim` and the per-key ones along the
  other; default positions are the token indices q0 + i and k0 + j. When causality by token
  index is the only condition, tiles wholly below the diagonal skip the mask (a lax.cond;
  skip_below=False where a wgmma is in flight, so no branch sits inside its pipeline); with a
  window they do not, since a tile below the diagonal can reach past the window."""
  shape = s.shape

  def iota(dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_WGMMA)

  qv, kv = dict(qv), dict(kv)
  by_pos = causal or window is not None  # the conditions on positions
  only_causal = (causal and window is None and not ({"q_pos", "q_seg", "q_thr"} & qv.keys())
                 and "kv_pos" not in kv)
  if by_pos and "q_pos" not in qv:
    qv["q_pos"] = q0 + iota(q_dim)
  if (by_pos or "q_thr" in qv) and "kv_pos" not in kv:
    kv["kv_pos"] = k0 + iota(1 - q_dim)
  qv.setdefault("q_pos", None)
  kv.setdefault("kv_pos", None)
  mask = element_mask(causal=causal, window=window, **qv, **kv, rows=_same, cols=_same)
  if mask is None:
    return s
  if only_causal and skip_below:  # some key of the tile is after some query
    return lax.cond(k0 + shape[1 - q_dim] - 1 > q0, lambda: jnp.where(mask, s, -jnp.inf),
                    lambda: s)
  return jnp.where(mask, s, -jnp.inf)


def _used(aux: Aux, causal: bool, window: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The per-query and per-key vectors the mask reads (positions only for causality, the
  window and the threshold's tie-break)."""
  by_pos, thr = causal or window is not None, aux.q_thr is not None
  q_names = tuple(n for n in Q_VECS if getattr(aux, n) is not None and (n != "q_pos" or by_pos))
  kv_names = tuple(n for n in KV_VECS if getattr(aux, n) is not None
                   and (n != "kv_pos" or by_pos or thr))
  return q_names, kv_names


def _sched_sync(sched):
  plgpu.barrier_arrive(sched)
  plgpu.barrier_wait(sched)


def _stream_kv(r, n, row, bi, hk, smems, loaded, free, *, block_k: int, num_stages: int,
               registers: tuple[int, int] = REGISTERS):
  """Producer warpgroup of the forward and dQ kernels: the K and V tiles of list row `row`
  into the stage ring. loaded / free: (K, V) barriers; V's free barrier None when one barrier
  frees both (it must then be waited once per step)."""
  plgpu.set_max_registers(registers[1], action="decrease")

  @pl.loop(0, n)
  def _(j):
    slot = lax.rem(j, num_stages)
    ks = pl.ds(r["idx"][(*row, j)] * block_k, block_k)
    for name, smem, done, wait in zip("kv", smems, loaded, free):
      if wait is not None:
        pl.when(j >= num_stages)(lambda wait=wait: plgpu.barrier_wait(wait.at[slot]))
      plgpu.copy_gmem_to_smem(r[name].at[bi, ks, hk], smem.at[slot], done.at[slot])


# --------------------------------------------------------------------------------------------
# Forward


def _products_t(tile, *pairs):
  """[a b^T for (a, b) in pairs] (smem refs), issued on wgmma one after the other into float32
  accumulators of shape `tile` and read back: S and dP of the backward kernels together."""
  def products(*accs):
    for acc, (a, b) in zip(accs, pairs):
      plgpu.wgmma(acc, a, plgpu.transpose_ref(b, (1, 0)))
    return tuple(acc[...] for acc in accs)

  acc = plgpu.ACC(tile, jnp.float32)
  return pl.run_scoped(products, *[acc] * len(pairs))


def _own_query_vectors(r, q_names, rows, *, bi, hi, num_heads: int, group: int) -> dict:
  """Consumer prologue of the forward and dQ kernels: the per-query vectors of this
  warpgroup's 64 query rows of head hi (row layout)."""
  qv_rows = {}
  for name in q_names:
    x = r[name]
    qv_rows[name] = _load(x.at[(*_q_row(x, bi, hi, num_heads, group), rows)], _ROW)
  return qv_rows


def _biased_and_masked(s, r, kv_names, qv_rows, tile, *, bi, hk, q0, k0, causal: bool,
                       window: int | None):
  """Scores s [64 queries, tile[1] keys from k0] of the forward and dQ kernels, already scaled
  to log2 units: plus the key bias, then the element mask, with the keys' vectors loaded here
  (column layout) and the queries' given (qv_rows, row layout)."""
  kv = {}
  for name in kv_names:
    x = r[name]
    kv[name] = _bcast(_load(x.at[(*_kv_row(x, bi, hk), pl.ds(k0, tile[1]))], _COL), tile, 1)
  if "kv_bias" in kv:
    s = s + kv["kv_bias"] * LOG2E
  qv = {n_: _bcast(x, tile, 0) for n_, x in qv_rows.items()}
  return _masked(s, causal=causal, window=window, qv=qv, kv=kv, q_dim=0, q0=q0, k0=k0)


def _scores(qs, k_smem, slot, tile, k_bar, k_free, sched):
  """S = Q K^T [64, block_k] f32 of one streamed key tile on wgmma (Q from shared memory), the
  tile's stage released as soon as S is read; `sched` orders the two consumers' QK^T."""
  plgpu.barrier_wait(k_bar.at[slot])

  def qk(acc_ref):
    plgpu.wgmma(acc_ref, qs, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
    _sched_sync(sched)
    return acc_ref[...]

  s = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
  plgpu.barrier_arrive(k_free.at[slot])
  return s


def _accumulate_pv(acc, alpha, p, l, m_new, v_smem, slot, v_bar, v_free, sched):
  """The online softmax's accumulator update acc = alpha acc + P V on wgmma (P from registers
  in V's dtype), after handing the tensor core to the other consumer (ping-pong: this one's
  softmax is done); releases V's stage. Returns (acc, m_new, l)."""
  acc = acc * _bcast(alpha, acc.shape, 0)
  p16 = p.astype(v_smem.dtype)
  acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
  plgpu.barrier_arrive(sched)  # softmax done: let the other warpgroup's QK^T in
  plgpu.barrier_wait(v_bar.at[slot])
  plgpu.barrier_wait(sched)

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

  acc = pl.run_state(pv)(plgpu.ACC.init(acc))
  plgpu.barrier_arrive(v_free.at[slot])
  return acc, m_new, l


def _fwd_kernel(*refs, names, q_names, kv_names, n_out, causal, window, scale, block_k,
                num_heads, group, num_stages, lists_b, lists_h, has_member):
  r = dict(zip(names, refs))
  o_ref, lse_ref = refs[len(names):len(names) + n_out]
  (q_smem, k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar, k_free, v_free,
   sched) = refs[len(names) + n_out:]
  hi, ci, bi = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  hk = lax.div(hi, group)
  lb, lh = (bi if lists_b else 0), (hi if lists_h else 0)
  n = r["cnt"][lb, lh, ci]
  dtype = q_smem.dtype
  tile = (WG_ROWS, block_k)
  need_k0 = causal or window is not None or bool(kv_names) or "q_thr" in q_names

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(REGISTERS[0], action="increase")
    q0 = ci * CTA_ROWS + wg * WG_ROWS
    qs = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(r["q"].at[bi, pl.ds(q0, WG_ROWS), hi], qs, q_bar.at[wg])
    qv_rows = _own_query_vectors(r, q_names, pl.ds(q0, WG_ROWS), bi=bi, hi=hi,
                                 num_heads=num_heads, group=group)
    plgpu.barrier_wait(q_bar.at[wg])
    acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, q_smem.shape[-1]), jnp.float32), _WGMMA)
    m = plgpu.layout_cast(jnp.full((WG_ROWS,), M_INIT, jnp.float32), _ROW)
    l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), _ROW)
    pl.when(wg == 1)(lambda: _sched_sync(sched))

    def step(j, carry):
      acc, m, l = carry
      slot = lax.rem(j, num_stages)
      s = _scores(qs, k_smem, slot, tile, k_bar, k_free, sched)
      s = s * (scale * LOG2E)
      k0 = r["idx"][lb, lh, ci, j] * block_k if need_k0 else None
      s = _biased_and_masked(s, r, kv_names, qv_rows, tile, bi=bi, hk=hk, q0=q0, k0=k0,
                             causal=causal, window=window)
      if has_member:
        s = s + jnp.where(r["member"][lb, lh, ci, wg, j] != 0, 0.0, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - _bcast(m_new, tile, 0))
      l = l * alpha + p.sum(axis=1)
      return _accumulate_pv(acc, alpha, p, l, m_new, v_smem, slot, v_bar, v_free, sched)

    acc, m, l = lax.fori_loop(0, n, step, (acc, m, l))
    pl.when(wg == 0)(lambda: _sched_sync(sched))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    qs[...] = (acc * _bcast(1.0 / l_safe, acc.shape, 0)).astype(dtype)
    lse_smem.at[wg][...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, o_ref.at[bi, pl.ds(q0, WG_ROWS), hi])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(q0, WG_ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    _stream_kv(r, n, (lb, lh, ci), bi, hk, (k_smem, v_smem), (k_bar, v_bar), (k_free, v_free),
               block_k=block_k, num_stages=num_stages)


def fwd_scratch(q, k, v, block_k: int, num_stages: int) -> list:
  """Shared memory and barriers of a forward CTA (_fwd_kernel's, and grouped_softmax's): both
  consumers' Q tiles, the K / V ring of num_stages tiles, both consumers' lse rows; barriers
  for Q, K and V arrival, K and V release (both consumers arrive) and the ping-pong."""
  d = q.shape[-1]
  return [
      _smem((2, WG_ROWS, d), q.dtype),
      _smem((num_stages, block_k, d), k.dtype),
      _smem((num_stages, block_k, d), v.dtype),
      plgpu.SMEM((2, WG_ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=2),
  ]


def forward(q, k, v, kv_indices, kv_counts, aux: Aux, *, causal: bool, scale: float,
            block_q: int, block_k: int, interpret: bool = False, num_warps: int | None = None,
            num_stages: int = 2, window: int | None = None):
  """o [B, T, H, D], lse [B, H, T] float32 (natural log). num_warps is unused (the CTA is
  always three warpgroups); num_stages is the depth of the K/V pipeline; window:
  common.element_mask's (the lists should hold the band; the window masks elements)."""
  del num_warps
  _check(q, k, v, block_q, block_k, interpret)
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  group = h // h_kv
  t_cta = CTA_ROWS * -(-t // CTA_ROWS)
  idx, cnt, member = _cta_lists(kv_indices, kv_counts, k.shape[1] // block_k, block_q)
  q_names, kv_names = _used(aux, causal, window)
  args = {"q": _pad_to(q, 1, t_cta), "k": k, "v": v, "idx": idx, "cnt": cnt}
  if member is not None:
    args["member"] = member
  for name in q_names:
    args[name] = _pad_to(getattr(aux, name), 2, t_cta)
  for name in kv_names:
    args[name] = getattr(aux, name)
  names = tuple(args)
  kernel = functools.partial(
      _fwd_kernel, names=names, q_names=q_names, kv_names=kv_names, n_out=2, causal=causal,
      window=window, scale=scale, block_k=block_k, num_heads=h, group=group, num_stages=num_stages,
      lists_b=idx.shape[0] > 1, lists_h=idx.shape[1] > 1, has_member=member is not None)
  o, lse = _launch(
      kernel, "block_sparse_mgpu_fwd", args,
      out_type=[jax.ShapeDtypeStruct((b, t_cta, h, d), q.dtype),
                jax.ShapeDtypeStruct((b, h, t_cta), jnp.float32)],
      scratch=fwd_scratch(q, k, v, block_k, num_stages),
      grid=(h, t_cta // CTA_ROWS, b),
      grid_names=("h", "q", "b"),
  )
  return o[:, :t], lse[:, :, :t]


# --------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(*refs, names, q_names, kv_names, causal, window, scale, block_k, num_heads,
               group, num_stages, lists_b, lists_h, has_member, registers=REGISTERS):
  r = dict(zip(names, refs))
  (dq_ref,) = refs[len(names):len(names) + 1]
  q_smem, do_smem, k_smem, v_smem, q_bar, kv_bar, kv_free = refs[len(names) + 1:]
  hi, ci, bi = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  hk = lax.div(hi, group)
  lb, lh = (bi if lists_b else 0), (hi if lists_h else 0)
  n = r["cnt"][lb, lh, ci]
  dtype = q_smem.dtype
  tile = (WG_ROWS, WG_ROWS)  # a K/V tile is taken in 64-key pieces (fewer live registers)
  need_k0 = causal or window is not None or bool(kv_names) or "q_thr" in q_names

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(registers[0], action="increase")
    q0 = ci * CTA_ROWS + wg * WG_ROWS
    rows = pl.ds(q0, WG_ROWS)
    qs, dos = q_smem.at[wg], do_smem.at[wg]
    plgpu.copy_gmem_to_smem(r["q"].at[bi, rows, hi], qs, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(r["do"].at[bi, rows, hi], dos, q_bar.at[wg])
    # Per-row vectors stay [64] and are broadcast where used (no [64, 64] copies kept live).
    lse2 = _load(r["lse2"].at[bi, hi, rows], _ROW)
    delta = _load(r["delta"].at[bi, hi, rows], _ROW)
    qv_rows = _own_query_vectors(r, q_names, rows, bi=bi, hi=hi, num_heads=num_heads,
                                 group=group)
    plgpu.barrier_wait(q_bar.at[wg])
    dq = plgpu.layout_cast(jnp.zeros((WG_ROWS, q_smem.shape[-1]), jnp.float32), _WGMMA)

    def step(j, dq):
      slot = lax.rem(j, num_stages)
      plgpu.barrier_wait(kv_bar.at[slot])
      kb0 = r["idx"][lb, lh, ci, j] * block_k if need_k0 else None
      penalty = None
      if has_member:
        penalty = jnp.where(r["member"][lb, lh, ci, wg, j] != 0, 0.0, -jnp.inf)
      for piece in range(block_k // WG_ROWS):
        keys = pl.ds(piece * WG_ROWS, WG_ROWS)
        kp, vp = k_smem.at[slot, keys], v_smem.at[slot, keys]
        s, dp = _products_t(tile, (qs, kp), (dos, vp))  # S = Q K^T, dP = dO V^T
        k0 = None if kb0 is None else kb0 + piece * WG_ROWS
        s = s * (scale * LOG2E)
        s = _biased_and_masked(s, r, kv_names, qv_rows, tile, bi=bi, hk=hk, q0=q0, k0=k0,
                               causal=causal, window=window)
        if penalty is not None:
          s = s + penalty
        p = jnp.exp2(s - _bcast(lse2, tile, 0))
        ds = (p * (dp - _bcast(delta, tile, 0))).astype(dtype)

        def dq_acc(dq_ref, ds=ds, kp=kp):
          plgpu.wgmma(dq_ref, ds, kp)

        dq = pl.run_state(dq_acc)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(kv_free.at[slot])
      return dq

    dq = lax.fori_loop(0, n, step, dq)
    qs[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, rows, hi])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _producer():
    _stream_kv(r, n, (lb, lh, ci), bi, hk, (k_smem, v_smem), (kv_bar, kv_bar), (kv_free, None),
               block_k=block_k, num_stages=num_stages, registers=registers)


def _own_keys(r, kv_names, k_smem, v_smem, k_bar, *, bi, hk, ci, wg):
  """Consumer prologue of the dK/dV kernels: this warpgroup's 64 keys of K and V by TMA and
  their per-key vectors (row layout). Returns (k0, keys, K smem, V smem, vectors), K/V landed."""
  k0 = ci * CTA_ROWS + wg * WG_ROWS
  keys = pl.ds(k0, WG_ROWS)
  ks, vs = k_smem.at[wg], v_smem.at[wg]
  plgpu.copy_gmem_to_smem(r["k"].at[bi, keys, hk], ks, k_bar.at[wg])
  plgpu.copy_gmem_to_smem(r["v"].at[bi, keys, hk], vs, k_bar.at[wg])
  kv_rows = {}
  for name in kv_names:
    x = r[name]
    kv_rows[name] = _load(x.at[(*_kv_row(x, bi, hk), keys)], _ROW)
  plgpu.barrier_wait(k_bar.at[wg])
  return k0, keys, ks, vs, kv_rows


def _store_dkv(dk, dv, db, ks, vs, db_smem, out_refs, *, bi, hk, keys):
  """Consumer epilogue of the dK/dV kernels: dK, dV (into the K / V smem they no longer need)
  and d bias (None: none) out by TMA."""
  dk_ref, dv_ref, dbias_ref = out_refs
  ks[...] = dk.astype(ks.dtype)
  vs[...] = dv.astype(vs.dtype)
  if db is not None:
    db_smem[...] = db
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(ks, dk_ref.at[bi, keys, hk])
  plgpu.copy_smem_to_gmem(vs, dv_ref.at[bi, keys, hk])
  if db is not None:
    plgpu.copy_smem_to_gmem(db_smem, dbias_ref.at[bi, hk, keys])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, names, q_names, kv_names, causal, window, scale, block_q, num_heads,
                group, num_stages, lists_b, lists_h, has_member, has_bias, registers=REGISTERS):
  r = dict(zip(names, refs))
  n_out = 3 if has_bias else 2
  dk_ref, dv_ref = refs[len(names):len(names) + 2]
  dbias_ref = refs[len(names) + 2] if has_bias else None
  (k_smem, v_smem, q_smem, do_smem, db_smem, k_bar, qdo_bar,
   qdo_free) = refs[len(names) + n_out:]
  hk, ci, bi = lax.axis_index("h"), lax.axis_index("k"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  lb = bi if lists_b else 0
  dtype = k_smem.dtype
  tile = (WG_ROWS, WG_ROWS)  # [keys, queries]: a Q/dO tile is taken in 64-query pieces

  def heads():
    """(query head, list head row, count) of every query head sharing key head hk."""
    for g in range(group):
      h = hk * group + g
      lh = h if lists_h else 0
      yield g, h, lh, r["cnt"][lb, lh, ci]

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(registers[0], action="increase")
    k0, keys, ks, vs, kv_rows = _own_keys(r, kv_names, k_smem, v_smem, k_bar, bi=bi, hk=hk,
                                          ci=ci, wg=wg)
    zeros = jnp.zeros((WG_ROWS, k_smem.shape[-1]), jnp.float32)
    carry = (plgpu.layout_cast(zeros, _WGMMA), plgpu.layout_cast(zeros, _WGMMA),
             plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), _ROW))
    done = 0  # tiles streamed so far: the stage of tile j of head g is (done + j) % stages

    for g, h, lh, n in heads():
      def step(j, carry, h=h, lh=lh, done=done):
        dk, dv, db = carry
        slot = lax.rem(done + j, num_stages)
        plgpu.barrier_wait(qdo_bar.at[slot])
        qb0 = r["idx"][lb, lh, ci, j] * block_q
        penalty = None
        if has_member:
          penalty = jnp.where(r["member"][lb, lh, ci, wg, j] != 0, 0.0, -jnp.inf)
        for piece in range(block_q // WG_ROWS):
          q_rows = pl.ds(piece * WG_ROWS, WG_ROWS)
          qp, dop = q_smem.at[slot, q_rows], do_smem.at[slot, q_rows]
          q0 = qb0 + piece * WG_ROWS
          q_cols = pl.ds(q0, WG_ROWS)

          st, dpt = _products_t(tile, (ks, qp), (vs, dop))  # S^T = K Q^T, dP^T = V dO^T
          st = st * (scale * LOG2E)
          kv = {n_: _bcast(x, tile, 0) for n_, x in kv_rows.items()}
          if "kv_bias" in kv:
            st = st + kv["kv_bias"] * LOG2E
          qv = {}
          for name in q_names:
            x = r[name]
            qv[name] = _bcast(_load(x.at[(*_q_row(x, bi, h, num_heads, group), q_cols)], _COL),
                              tile, 1)
          st = _masked(st, causal=causal, window=window, qv=qv, kv=kv, q_dim=1, q0=q0, k0=k0)
          if penalty is not None:
            st = st + penalty
          lse2 = _bcast(_load(r["lse2"].at[bi, h, q_cols], _COL), tile, 1)
          delta = _bcast(_load(r["delta"].at[bi, h, q_cols], _COL), tile, 1)
          pt = jnp.exp2(st - lse2)
          dst = pt * (dpt - delta)
          if has_bias:
            db = db + dst.sum(axis=1)
          pt16, dst16 = pt.astype(dtype), dst.astype(dtype)

          def dkv_acc(refs, pt16=pt16, dst16=dst16, qp=qp, dop=dop):
            dk_ref_, dv_ref_ = refs
            plgpu.wgmma(dv_ref_, pt16, dop)
            plgpu.wgmma(dk_ref_, dst16, qp)

          dk, dv = pl.run_state(dkv_acc)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
        plgpu.barrier_arrive(qdo_free.at[slot])
        return dk, dv, db

      carry = lax.fori_loop(0, n, step, carry)
      done = done + n
    dk, dv, db = carry
    _store_dkv(dk * scale, dv, db if has_bias else None, ks, vs, db_smem.at[wg],
               (dk_ref, dv_ref, dbias_ref), bi=bi, hk=hk, keys=keys)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(registers[1], action="decrease")
    done = 0
    for _, h, lh, n in heads():
      def load(j, _, h=h, lh=lh, done=done):
        step = done + j
        slot = lax.rem(step, num_stages)
        rows = pl.ds(r["idx"][lb, lh, ci, j] * block_q, block_q)

        @pl.when(step >= num_stages)
        def _():
          plgpu.barrier_wait(qdo_free.at[slot])

        plgpu.copy_gmem_to_smem(r["q"].at[bi, rows, h], q_smem.at[slot], qdo_bar.at[slot])
        plgpu.copy_gmem_to_smem(r["do"].at[bi, rows, h], do_smem.at[slot], qdo_bar.at[slot])
        return _

      lax.fori_loop(0, n, load, None)
      done = done + n


def _dkv_staged_kernel(*refs, names, q_names, kv_names, causal, window, scale, block_q,
                       num_heads, group, num_stages, lists_b, lists_h, has_member, has_bias,
                       dq_mode, registers=REGISTERS):
  """dK/dV (and with dq_mode, dQ) over 64-query steps whose Q, dO, lse, delta and per-query
  mask vectors all arrive by TMA in one stage.

  Per step, a consumer (64 keys) issues S^T and dP^T together, computes P^T while dP^T runs,
  issues dV += P^T dO, computes dS^T while dV runs, issues dK += dS^T Q; dK and dV live in
  wgmma accumulators for the whole loop. dq_mode "cols": both consumers' dS^T go to shared
  memory and each computes dQ for 64 of the 128 head-dim columns over all 128 keys of the CTA
  (FlashAttention-3's split); "keys": each computes dQ over its own 64 keys, all columns. dQ
  pieces are added into a float32 [B, T, H, D] buffer by TMA reduce-add (one backward kernel
  instead of two: five matmuls per tile instead of seven)."""
  r = dict(zip(names, refs))
  n_out = 3 if has_bias else 2
  dk_ref, dv_ref = refs[len(names):len(names) + 2]
  dbias_ref = refs[len(names) + 2] if has_bias else None
  (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, qv_smems, ds_smem, dq_smem, db_smem,
   k_bar, qdo_bar, qdo_free, ds_bar) = refs[len(names) + n_out:]
  hk, ci, bi = lax.axis_index("h"), lax.axis_index("k"), lax.axis_index("b")
  wg = lax.axis_index("wg")
  lb = bi if lists_b else 0
  dtype = k_smem.dtype
  d = k_smem.shape[-1]
  tile = (WG_ROWS, WG_ROWS)  # [keys, queries]
  sub = block_q // WG_ROWS  # 64-query steps per listed query tile

  def heads():
    """(query head, list head row, steps) of every query head sharing key head hk."""
    for g in range(group):
      h = hk * group + g
      lh = h if lists_h else 0
      yield h, lh, r["cnt"][lb, lh, ci] * sub

  def query_tile(lh, s):
    """(list slot, first query row) of step s."""
    if sub == 1:
      return s, r["idx"][lb, lh, ci, s] * block_q
    j = lax.div(s, sub)
    return j, r["idx"][lb, lh, ci, j] * block_q + lax.rem(s, sub) * WG_ROWS

  def add_dq(val, smem, h, q0, col):
    """Adds a [64 queries, 64 columns] float32 piece of dQ into the global buffer."""
    smem[...] = val
    plgpu.commit_smem()
    dst = r["dq_acc"].at[bi, pl.ds(q0, WG_ROWS), h, pl.ds(col * WG_ROWS, WG_ROWS)]
    plgpu.copy_smem_to_gmem(smem, dst, reduction_op="add")

  def dq_piece(sources, col):
    """sum over (dS^T, K) sources of dS K[:, col-th 64 columns]: [64 queries, 64]."""
    def mm(acc):
      for ds_t, k_part in sources:
        plgpu.wgmma(acc, plgpu.transpose_ref(ds_t, (1, 0)),
                    k_part.at[:, pl.ds(col * WG_ROWS, WG_ROWS)])
      return plgpu.wgmma_accumulator_load(acc, wait_n=0)
    return pl.run_scoped(mm, plgpu.ACC(tile, jnp.float32))

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(registers[0], action="increase")
    k0, keys, ks, vs, kv_rows = _own_keys(r, kv_names, k_smem, v_smem, k_bar, bi=bi, hk=hk,
                                          ci=ci, wg=wg)
    if dq_mode == "cols":  # dQ reads the other consumer's K half too
      plgpu.barrier_wait(k_bar.at[1 - wg])

    def step(s, db, *, h, lh, done, dk_acc, dv_acc):
      slot = lax.rem(done + s, num_stages)
      plgpu.barrier_wait(qdo_bar.at[slot])
      j, q0 = query_tile(lh, s)
      qs, dos = q_smem.at[slot], do_smem.at[slot]

      def p_and_dp(st_acc, dpt_acc):
        plgpu.wgmma(st_acc, ks, plgpu.transpose_ref(qs, (1, 0)))
        plgpu.wgmma(dpt_acc, vs, plgpu.transpose_ref(dos, (1, 0)))
        st = plgpu.wgmma_accumulator_load(st_acc, wait_n=1)  # dP^T still running
        st = st * (scale * LOG2E)
        kv = {n_: _bcast(x, tile, 0) for n_, x in kv_rows.items()}
        if "kv_bias" in kv:
          st = st + kv["kv_bias"] * LOG2E
        qv = {n_: _bcast(_load(qv_smems[i].at[slot], _COL), tile, 1)
              for i, n_ in enumerate(q_names)}
        st = _masked(st, causal=causal, window=window, qv=qv, kv=kv, q_dim=1, q0=q0, k0=k0,
                     skip_below=False)
        if has_member:
          st = st + jnp.where(r["member"][lb, lh, ci, wg, j] != 0, 0.0, -jnp.inf)
        pt16 = jnp.exp2(st - _bcast(_load(lse_smem.at[slot], _COL), tile, 1)).astype(dtype)
        plgpu.wgmma(dv_acc, pt16, dos)
        return pt16, plgpu.wgmma_accumulator_load(dpt_acc, wait_n=1)  # dV still running

      acc = plgpu.ACC(tile, jnp.float32)
      pt16, dpt = pl.run_scoped(p_and_dp, acc, acc)
      # dS from the bf16 P that dV used (one rounding of P, as dS itself is rounded to bf16).
      dst = pt16.astype(jnp.float32) * (dpt - _bcast(_load(delta_smem.at[slot], _COL), tile, 1))
      if has_bias:
        db = db + dst.sum(axis=1)
      dst16 = dst.astype(dtype)
      plgpu.wgmma(dk_acc, dst16, qs)
      if dq_mode == "keys":
        ds_own = ds_smem.at[wg]
        ds_own[...] = dst16
        plgpu.commit_smem()
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's dQ pieces are out
        for col in range(d // WG_ROWS):
          add_dq(dq_piece([(ds_own, ks)], col), dq_smem.at[wg, col], h, q0, col)
      elif dq_mode == "cols":
        parity = lax.rem(done + s, 2)  # the other consumer may still read the last step's dS
        ds_smem.at[parity, wg][...] = dst16
        plgpu.commit_smem()
        _sched_sync(ds_bar)  # both halves of dS^T written
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        sources = [(ds_smem.at[parity, half], k_smem.at[half]) for half in range(2)]
        for col in range(2):
          pl.when(wg == col)(lambda col=col: add_dq(dq_piece(sources, col), dq_smem.at[col, 0],
                                                     h, q0, col))
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(qdo_free.at[slot])
      return db

    def accumulate(dk_acc, dv_acc):
      db = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), _ROW)
      done = 0  # steps so far: step s of a head runs in stage (done + s) % stages
      for h, lh, n in heads():
        body = functools.partial(step, h=h, lh=lh, done=done, dk_acc=dk_acc, dv_acc=dv_acc)
        db = lax.fori_loop(0, n, body, db)
        done = done + n
      return dk_acc[...], dv_acc[...], db

    acc = plgpu.ACC((WG_ROWS, d), jnp.float32)
    dk, dv, db = pl.run_scoped(accumulate, acc, acc)
    if dq_mode == "cols":  # the other consumer's last dQ may still read this K half
      _sched_sync(ds_bar)
    _store_dkv(dk * scale, dv, db if has_bias else None, ks, vs, db_smem.at[wg],
               (dk_ref, dv_ref, dbias_ref), bi=bi, hk=hk, keys=keys)

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(registers[1], action="decrease")
    done = 0
    for h, lh, n in heads():
      @pl.loop(0, n)
      def _(s, h=h, lh=lh, done=done):
        step = done + s
        slot = lax.rem(step, num_stages)
        rows = pl.ds(query_tile(lh, s)[1], WG_ROWS)
        pl.when(step >= num_stages)(lambda: plgpu.barrier_wait(qdo_free.at[slot]))
        done_bar = qdo_bar.at[slot]
        plgpu.copy_gmem_to_smem(r["q"].at[bi, rows, h], q_smem.at[slot], done_bar)
        plgpu.copy_gmem_to_smem(r["do"].at[bi, rows, h], do_smem.at[slot], done_bar)
        plgpu.copy_gmem_to_smem(r["lse2"].at[bi, h, rows], lse_smem.at[slot], done_bar)
        plgpu.copy_gmem_to_smem(r["delta"].at[bi, h, rows], delta_smem.at[slot], done_bar)
        for i, name in enumerate(q_names):
          x = r[name]
          plgpu.copy_gmem_to_smem(x.at[(*_q_row(x, bi, h, num_heads, group), rows)],
                                  qv_smems[i].at[slot], done_bar)

      done = done + n


BACKWARDS = ("split", "staged", "fused", "fused_keys")
SMEM_BYTES = 227 * 1024  # a Hopper CTA's shared memory


def backward(q, k, v, lse, do, delta, kv_indices, kv_counts, q_indices, q_counts, aux: Aux, *,
             causal: bool, scale: float, block_q: int, block_k: int, interpret: bool = False,
             num_warps: int | None = None, num_stages: int = 2, bwd: str = "split",
             window: int | None = None, registers: tuple[int, int] = REGISTERS):
  """dq [B, T, H, D], dk / dv [B, S, H_kv, D], dbias [B, H_kv, S] float32 or None.

  delta [B, H, T] = rowsum(o * do) - dlse; q_indices / q_counts are the transposed lists
  [B', H', nK, Q] / [B', H', nK]. Same contract as pallas_gpu.backward. `bwd` picks the
  kernels (all compute the same gradients):
    "split"       a dQ kernel (the forward's lists) and a dK/dV kernel (transposed lists),
                  128-query stages, lse / delta read from global memory per step (7 matmuls
                  per tile: S and dP are computed in both);
    "staged"      the same dQ kernel and _dkv_staged_kernel: 64-query stages carrying lse,
                  delta and mask vectors by TMA, overlapped wgmma order;
    "fused"       _dkv_staged_kernel alone, adding dQ into a float32 buffer by TMA reduce-add
                  (5 matmuls per tile), dQ columns split between the consumers (head dim 128;
                  at 64 it is "fused_keys");
    "fused_keys"  the same, each consumer adding dQ over its own 64 keys (twice the adds).
  num_stages is the dQ kernel's K/V depth and the most 64-query stages the dK/dV kernel gets
  (as many as fit in shared memory, at least 2). registers: (consumer, producer) registers per
  thread of both backward kernels (REGISTERS by default; e.g. (240, 24), FlashAttention-3's).
  """
  del num_warps
  _check(q, k, v, block_q, block_k, interpret)
  if bwd not in BACKWARDS:
    raise ValueError(f"pallas_mosaic_gpu.backward: bwd={bwd!r} not in {BACKWARDS}")
  _check_registers(registers)
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  group = h // h_kv
  t_cta = CTA_ROWS * -(-t // CTA_ROWS)
  s_cta = CTA_ROWS * -(-s_len // CTA_ROWS)
  q_names, kv_names = _used(aux, causal, window)
  has_bias = aux.kv_bias is not None
  # Rows that see nothing have lse = -inf; every score of theirs is masked, so any finite value
  # gives p = exp2(-inf) = 0.
  lse2 = _pad_to(jnp.where(jnp.isfinite(lse), lse * LOG2E, 0.0), 2, t_cta)
  delta = _pad_to(delta.astype(jnp.float32), 2, t_cta)
  qp, dop = _pad_to(q, 1, t_cta), _pad_to(do.astype(q.dtype), 1, t_cta)
  common_args = {"q": qp, "do": dop, "lse2": lse2, "delta": delta}
  q_vecs = {n_: _pad_to(getattr(aux, n_), 2, t_cta) for n_ in q_names}
  if bwd in ("split", "staged"):
    dq = _dq(common_args, q_vecs, k, v, kv_indices, kv_counts, aux, q_names=q_names,
             kv_names=kv_names, causal=causal, window=window, scale=scale, block_q=block_q,
             block_k=block_k, num_stages=num_stages, registers=registers)
  dq_mode = {"split": None, "staged": None, "fused": "cols" if d == 2 * WG_ROWS else "keys",
             "fused_keys": "keys"}[bwd]

  # dK/dV: 128 keys per CTA over the transposed lists of every query head of the group.
  idx, cnt, member = _cta_lists(q_indices, q_counts, t // block_q, block_k)
  kv_vecs = {n_: _pad_to(getattr(aux, n_), 2, s_cta) for n_ in kv_names}
  args = {**common_args, "k": _pad_to(k, 1, s_cta), "v": _pad_to(v, 1, s_cta), "idx": idx,
          "cnt": cnt}
  if member is not None:
    args["member"] = member
  args.update(q_vecs)
  args.update(kv_vecs)
  if dq_mode is not None:
    args["dq_acc"] = jax.new_ref(jnp.zeros((b, t_cta, h, d), jnp.float32))
  names = tuple(args)
  static = dict(names=names, q_names=q_names, kv_names=kv_names, causal=causal, window=window,
                scale=scale, block_q=block_q, num_heads=h, group=group,
                lists_b=idx.shape[0] > 1, lists_h=idx.shape[1] > 1, has_member=member is not None,
                has_bias=has_bias, registers=registers)
  out_type = [jax.ShapeDtypeStruct((b, s_cta, h_kv, d), k.dtype),
              jax.ShapeDtypeStruct((b, s_cta, h_kv, d), v.dtype)]
  if has_bias:
    out_type.append(jax.ShapeDtypeStruct((b, h_kv, s_cta), jnp.float32))
  kv_smem = [_smem((2, WG_ROWS, d), k.dtype), _smem((2, WG_ROWS, d), v.dtype)]
  db_smem = plgpu.SMEM((2, WG_ROWS), jnp.float32)
  if bwd == "split":
    kernel = functools.partial(_dkv_kernel, **static, num_stages=num_stages)
    scratch = [
        *kv_smem,
        _smem((num_stages, block_q, d), q.dtype),
        _smem((num_stages, block_q, d), q.dtype),
        db_smem,
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
    ]
  else:
    q_vec_dtypes = [q_vecs[n_].dtype for n_ in q_names]
    stages = _staged_stages(num_stages, d, q.dtype, q_vec_dtypes, dq_mode)
    kernel = functools.partial(_dkv_staged_kernel, **static, num_stages=stages, dq_mode=dq_mode)
    ds_smem, dq_smem, ds_bar = (), (), ()
    if dq_mode == "cols":
      ds_smem = _smem((2, 2, WG_ROWS, WG_ROWS), q.dtype)
      dq_smem = _smem((2, 1, WG_ROWS, WG_ROWS), jnp.float32)
      ds_bar = plgpu.Barrier(num_arrivals=2)
    elif dq_mode == "keys":
      ds_smem = _smem((2, WG_ROWS, WG_ROWS), q.dtype)
      dq_smem = _smem((2, d // WG_ROWS, WG_ROWS, WG_ROWS), jnp.float32)
    scratch = [
        *kv_smem,
        _smem((stages, WG_ROWS, d), q.dtype),
        _smem((stages, WG_ROWS, d), q.dtype),
        plgpu.SMEM((stages, WG_ROWS), jnp.float32),
        plgpu.SMEM((stages, WG_ROWS), jnp.float32),
        tuple(plgpu.SMEM((stages, WG_ROWS), dt) for dt in q_vec_dtypes),
        ds_smem,
        dq_smem,
        db_smem,
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_arrivals=4 + len(q_names), num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ds_bar,
    ]
  outs = _launch(kernel, "block_sparse_mgpu_dkv" if dq_mode is None else "block_sparse_mgpu_dkvq",
                 args, out_type=out_type, scratch=scratch, grid=(h_kv, s_cta // CTA_ROWS, b),
                 grid_names=("h", "k", "b"))
  if dq_mode is not None:
    dq = (args["dq_acc"][...] * scale).astype(q.dtype)
  dbias = outs[2][:, :, :s_len] if has_bias else None
  return dq[:, :t], outs[0][:, :s_len], outs[1][:, :s_len], dbias


def _staged_stages(most: int, d: int, dtype, q_vec_dtypes, dq_mode) -> int:
  """As many 64-query stages (at least 2, at most max(most, 3)) as fit in shared memory."""
  item = jnp.dtype(dtype).itemsize
  fixed = 2 * 2 * WG_ROWS * d * item + 2 * WG_ROWS * 4  # K, V halves, d bias
  if dq_mode == "cols":
    fixed += 4 * WG_ROWS * WG_ROWS * item + 2 * WG_ROWS * WG_ROWS * 4
  elif dq_mode == "keys":
    fixed += 2 * WG_ROWS * WG_ROWS * item + 2 * WG_ROWS * d * 4
  stage = 2 * WG_ROWS * d * item + WG_ROWS * (8 + sum(jnp.dtype(x).itemsize
                                                      for x in q_vec_dtypes))
  fit = (SMEM_BYTES - 4096 - fixed) // stage  # 4 KiB for barriers and alignment
  return max(2, min(fit, max(most, 3)))


def _check_registers(registers) -> None:
  """setmaxnreg's rules: multiples of 8 in [24, 256], 2 consumers + 1 producer <= 512."""
  c, p = registers
  if not all(isinstance(x, int) and 24 <= x <= 256 and x % 8 == 0 for x in (c, p)) or (
      2 * c + p > 512):
    raise ValueError(f"pallas_mosaic_gpu.backward: registers={registers!r} must be (consumer, "
                     "producer) multiples of 8 in [24, 256] with 2 * consumer + producer <= 512 "
                     f"(default {REGISTERS})")


def _dq(common_args, q_vecs, k, v, kv_indices, kv_counts, aux, *, q_names, kv_names, causal,
        window, scale, block_q, block_k, num_stages, registers=REGISTERS):
  """The dQ kernel over the forward's tiling and lists: dq [B, T_cta, H, D]."""
  qp = common_args["q"]
  b, t_cta, h, d = qp.shape
  group = h // k.shape[2]
  idx, cnt, member = _cta_lists(kv_indices, kv_counts, k.shape[1] // block_k, block_q)
  args = {**common_args, "k": k, "v": v, "idx": idx, "cnt": cnt}
  if member is not None:
    args["member"] = member
  args.update(q_vecs)
  args.update({n_: getattr(aux, n_) for n_ in kv_names})
  names = tuple(args)
  kernel = functools.partial(
      _dq_kernel, names=names, q_names=q_names, kv_names=kv_names, causal=causal, window=window,
      scale=scale, block_k=block_k, num_heads=h, group=group, num_stages=num_stages,
      lists_b=idx.shape[0] > 1, lists_h=idx.shape[1] > 1, has_member=member is not None,
      registers=registers)
  return _launch(
      kernel, "block_sparse_mgpu_dq", args,
      out_type=jax.ShapeDtypeStruct((b, t_cta, h, d), qp.dtype),
      scratch=[
          _smem((2, WG_ROWS, d), qp.dtype),
          _smem((2, WG_ROWS, d), qp.dtype),
          _smem((num_stages, block_k, d), k.dtype),
          _smem((num_stages, block_k, d), v.dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),
          plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
      ],
      grid=(h, t_cta // CTA_ROWS, b),
      grid_names=("h", "q", "b"),
  )
