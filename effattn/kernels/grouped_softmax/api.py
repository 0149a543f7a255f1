"""Landmark grouped softmax: relayout, custom_vjp and dispatch.

    o = grouped_softmax(q, k, v, k_land, gid, seg, block_len=50)   # o [B, T, H, D]

Computes reference.grouped_softmax_attention's output (the spec's grouped
softmax: own-group tokens j <= i and the landmarks of earlier groups of the segment share one
softmax; an earlier group's tokens get their within-group softmax times their landmark's
weight). Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
  "pallas_mosaic_gpu"  the Mosaic GPU kernels of pallas_mosaic_gpu.py (Hopper, compute
                capability 9.x: warpgroups, wgmma, TMA; bfloat16, head_dim 64 or 128, tile 64,
                block_len < tile; no interpreter): its forward, dQ and dK/dV kernels, or with
                bwd="triton" its forward differentiated by the Triton backward kernels of
                pallas_gpu.py on its residuals (o, and lse in log2 units: the same contract).
                Checked on an H200 (scripts/bench_landmark.py --paths pallas_mosaic_gpu_bwd,
                bf16, D 64 and 128, packed and single segments: max rel. err. 4.9e-3) and 1.31x
                faster fwd+bwd than the Triton kernels there (2026-12-04, docs/benchmarks.md);
  "pallas_gpu"  the Triton kernels of pallas_gpu.py (GPU; head_dim in KERNEL_HEAD_DIMS and
                block_len < tile; interpret=True off-device);
  "pallas_tpu"  the Mosaic kernels of pallas_tpu.py (TPU; same contract and limits);
  "xla"         xla.chunked_grouped_softmax_attention: dense [B, H, chunk, T] scores,
                `chunk` queries at a time (the oracle's arithmetic, O(T^2) FLOPs);
  "reference"   reference.grouped_softmax_attention, all queries at once.
"pallas" is the Pallas kernel of the current backend (the Triton one off-device, interpreted).

The kernel path re-lays tokens out so each group fills one tile of `tile` slots (slot (g, r)
holds token start[g] + r for r < len[g] <= tile - 1; the last slot of the key tile holds the
group's landmark key), which makes every earlier group a single key tile: work is
O(T^2 / block_len * tile) and nothing [T, T] is built. The number of groups is data
dependent (each packed segment adds a partial group), so the layout has a static `max_groups`
tiles and `lax.cond` takes the xla path whenever a row has more groups, a group is longer than
a tile, or a segment id recurs after another one: the result is always exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from effattn.kernels import dispatch, mesh, permute
from effattn.kernels.block_sparse.api import _hopper  # "" on compute capability 9.x, else why
from effattn.kernels.grouped_softmax import pallas_gpu, pallas_tpu, reference, xla

KERNEL_HEAD_DIMS = (16, 32, 64, 128)
MOSAIC_HEAD_DIMS = (64, 128)
MOSAIC_TILE = 64  # one group per consumer warpgroup of 64 query rows
# Backward kernels of impl="pallas_mosaic_gpu" (grouped_softmax(bwd=...)): its own by default
# (checked on an H200, 1.31x the Triton backward's speed there); "triton" stays as a forced path.
MOSAIC_BACKWARDS = ("mosaic", "triton")
# Largest query rows (q_groups * tile) x head_dim of a float32 GPU kernel that fits in shared
# memory (64 x 128 ran on an H200, 128 x 128 did not).
_F32_ROWS_X_D = 64 * 128
_HOLDS_BLOCK = dispatch.Limit(("block_len", "tile"), lambda block_len, tile: "" if (
    block_len is None or block_len < tile) else (
        f"block_len={block_len} >= tile={tile} (a tile holds its block and the block's "
        "landmark key)"))
_LIMITS = (dispatch.one_of("head_dim", KERNEL_HEAD_DIMS), _HOLDS_BLOCK)
FAMILY = dispatch.Family("grouped_softmax", (
    dispatch.Path("pallas_mosaic_gpu", platform="gpu", interpretable=False,
                  device=lambda: _hopper(),  # looked up on use (tests stand in a device)
                  limits=(dispatch.one_of("head_dim", MOSAIC_HEAD_DIMS),
                          dispatch.one_of("dtype", ("bfloat16",)),
                          dispatch.one_of("tile", (MOSAIC_TILE,)), _HOLDS_BLOCK)),
    dispatch.Path("pallas_gpu", platform="gpu", limits=_LIMITS),
    dispatch.Path("pallas_tpu", platform="tpu", limits=_LIMITS),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))


@dataclasses.dataclass(frozen=True)
class _Static:
  tile: int
  scale: float
  interpret: bool
  tuning: tuple = ()  # Triton (num_warps, num_stages) overrides as key-value pairs
  # whose kernels: "gpu" (pallas_gpu.py) | "mosaic_gpu" (pallas_mosaic_gpu.py: its forward and
  # backward, or with ("bwd", "triton") in tuning the Triton backward) | "tpu" (pallas_tpu.py)
  platform: str = "gpu"

  @property
  def kernels(self):
    if self.platform == "mosaic_gpu":  # imported on use: a jax without Mosaic GPU has the rest
      from effattn.kernels.grouped_softmax import pallas_mosaic_gpu
      return pallas_mosaic_gpu
    return pallas_tpu if self.platform == "tpu" else pallas_gpu


Layout = dict  # relayout's output: a dict of arrays (a pytree)


def relayout(gid, seg, *, max_groups: int, tile: int):
  """Maps tokens to group tiles.

  gid, seg: [B, T] int32 (landmark.block_groups's groups: non-decreasing, contiguous runs).
  Returns a dict with
    slot_tok [B, G * tile] token of each slot (0 on invalid slots), valid [B, G * tile] bool,
    tok_slot [B, T] slot of each token, glen / gfirst / glast [B, Gp] int32 (tokens, first and
    last group of the segment; Gp = G rounded up to a power of two; absent groups have len 0
    and first = last = own index), ok [] bool: the layout holds every row exactly (at most
    max_groups groups, each of at most tile - 1 tokens: the last slot is the landmark's).
  """
  b, t = gid.shape
  gp = 1 << max(0, (max_groups - 1).bit_length())
  groups = jnp.arange(gp, dtype=jnp.int32)
  search = jax.vmap(lambda g, side: jnp.searchsorted(g, groups, side=side), in_axes=(0, None))
  start = search(gid, "left").astype(jnp.int32)
  glen = search(gid, "right").astype(jnp.int32) - start
  glen = jnp.where(groups < max_groups, glen, 0)
  # First / last group of each token's segment run.
  change = seg[:, 1:] != seg[:, :-1]
  seg_start = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
  seg_end = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
  first_tok = lax.cummax(jnp.where(seg_start, gid, 0), axis=1)
  last_tok = lax.cummin(jnp.where(seg_end, gid, jnp.iinfo(jnp.int32).max), axis=1, reverse=True)
  at_start = jnp.clip(start, 0, t - 1)
  present = glen > 0
  gfirst = jnp.where(present, jnp.take_along_axis(first_tok, at_start, axis=1), groups)
  glast = jnp.where(present, jnp.take_along_axis(last_tok, at_start, axis=1), groups)
  r = jnp.arange(tile, dtype=jnp.int32)
  valid = (r[None, None, :] < glen[:, :max_groups, None]).reshape(b, max_groups * tile)
  slot_tok = (start[:, :max_groups, None] + r).reshape(b, max_groups * tile)
  slot_tok = jnp.where(valid, slot_tok, 0)
  g_tok = jnp.clip(gid, 0, max_groups - 1)
  tok_slot = g_tok * tile + (jnp.arange(t, dtype=jnp.int32) - jnp.take_along_axis(start, g_tok,
                                                                                   axis=1))
  # Exactness conditions (data dependent, checked on device).
  n_groups = gid[:, -1] + 1
  sorted_seg = jnp.sort(seg, axis=1)
  runs = jnp.sum(change, axis=1)
  distinct = jnp.sum(sorted_seg[:, 1:] != sorted_seg[:, :-1], axis=1)
  gid_change = gid[:, 1:] != gid[:, :-1]
  ok = (jnp.all(n_groups <= max_groups) & jnp.all(gid[:, 0] == 0)
        & jnp.all(jnp.diff(gid, axis=1) >= 0) & jnp.all(glen < tile)
        & jnp.all(runs == distinct) & jnp.all(gid_change | ~change))
  return dict(slot_tok=slot_tok, valid=valid, tok_slot=tok_slot, glen=glen, gfirst=gfirst,
              glast=glast, ok=ok)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kernel(qg, kg, vg, glen, gfirst, glast, st: _Static):
  o, _ = st.kernels.forward(qg, kg, vg, glen, gfirst, lt=st.tile, scale=st.scale,
                            interpret=st.interpret, **dict(st.tuning))
  return o


def _kernel_fwd(qg, kg, vg, glen, gfirst, glast, st):
  o, lse = st.kernels.forward(qg, kg, vg, glen, gfirst, lt=st.tile, scale=st.scale,
                              interpret=st.interpret, **dict(st.tuning))
  return o, (qg, kg, vg, glen, gfirst, glast, o, lse)


def _kernel_bwd(st, res, do):
  qg, kg, vg, glen, gfirst, glast, o, lse = res
  # An elementwise product and sum, not an einsum: a dot may run in TF32 on GPU.
  delta = jnp.moveaxis(jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
  dq, dk, dv = st.kernels.backward(
      qg, kg, vg, lse, do.astype(qg.dtype), delta, glen, gfirst, glast, lt=st.tile,
      scale=st.scale, interpret=st.interpret, **dict(st.tuning))
  return dq, dk, dv, None, None, None


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def group_tiles(q, k, v, k_land, lay: Layout, tile: int):
  """q, k, v [B, T, H, D] -> qg, kg, vg [B, G * tile, H, D] in the kernels' group-tiled layout
  (invalid slots zero, each key tile's last slot its group's landmark key).

  On a layout whose `ok` holds, slot_tok and tok_slot are inverse maps between the tokens and
  the valid slots (token i sits in slot tok_slot[i] = (gid, i - start) with i - start < glen
  < tile, and only there), so the gradient of each tiling is a gather by tok_slot."""
  b, slots = lay["valid"].shape
  n_groups = slots // tile
  qg, kg, vg = (permute.permute(x, lay["slot_tok"], lay["tok_slot"], keep=lay["valid"])
                for x in (q, k, v))
  if k_land.shape[1] >= n_groups:
    klg = k_land[:, :n_groups]
  else:
    klg = jnp.pad(k_land, ((0, 0), (0, n_groups - k_land.shape[1]), (0, 0), (0, 0)))
  # Each group's landmark key goes into the last slot of its key tile (common.py): its score
  # and gradient come out of the tile's own dots. That slot is never a valid one (glen < tile):
  # the concatenation drops only zeros of kg, and its transpose hands the slot's gradient to
  # k_land alone.
  h, d = k.shape[2:]
  kg = jnp.concatenate([kg.reshape(b, n_groups, tile, h, d)[:, :, :-1],
                        klg.reshape(b, n_groups, 1, h, d).astype(kg.dtype)], axis=2)
  return qg, kg.reshape(b, slots, h, d), vg


def kernel_attention(q, k, v, k_land, lay: Layout, st: _Static):
  """The kernel path on a layout whose `ok` holds: o [B, T, H, D]."""
  qg, kg, vg = group_tiles(q, k, v, k_land, lay, st.tile)
  # qg, kg, vg [B, slots, H, D], glen, gfirst, glast [B, Gp] -> og.
  kernel = mesh.on_mesh("grouped_softmax", f"pallas_{st.platform}", lambda *a: _kernel(*a, st),
                        ("BTHD", "BTHD", "BTHD", "BG", "BG", "BG"), "BTHD")
  og = kernel(qg, kg, vg, lay["glen"], lay["gfirst"], lay["glast"])

  # Each token's row of og; the transpose gives each valid slot its token's gradient and the
  # invalid slots zero (the kernels' backward needs do = 0 there).
  return permute.permute(og, lay["tok_slot"], lay["slot_tok"], inverse_keep=lay["valid"])


def default_max_groups(t: int, block_len: int) -> int:
  """Group tiles for T tokens: full blocks plus slack for the partial group each packed
  segment (and padding run) adds."""
  return -(-t // block_len) + max(8, t // 64)


def grouped_softmax(q, k, v, k_land, gid, seg, *, scale: float | None = None,
                    block_len: int | None = None, impl: str = "auto", chunk: int = 256,
                    tile: int = 64, max_groups: int | None = None, interpret: bool = False,
                    num_warps: int | None = None, num_stages: int | None = None,
                    q_groups: int | None = None, kv_splits: int | None = None,
                    bwd: str | None = None, return_fallback_frac: bool = False):
  """The landmark grouped softmax.

  Args:
    q, k, v: [B, T, H, D].
    k_land: [B, G, H, D] landmark key of group g (rows past the last group are never read).
    gid, seg: [B, T] int32 group (landmark.block_groups) and segment of each token.
    scale: score scale, default D ** -0.5.
    block_len: the largest group length, if known (lets "auto" skip a kernel that could not
      hold a group, and sizes the default max_groups).
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    chunk: queries per step of the xla path (0: all at once); also the kernel's fallback.
    tile: slots per group tile of the kernel (a power of two >= 16, > block_len: a tile holds
      a block's tokens and its landmark key).
    max_groups: group tiles of the kernel layout (default default_max_groups(T, block_len or
      tile)); rows with more groups run the xla path instead (lax.cond).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    num_warps, num_stages: Triton tuning overrides (the GPU kernels only); on
      impl="pallas_mosaic_gpu" num_stages is also the Mosaic forward's K/V pipeline depth and
      num_warps reaches only the Triton backward.
    q_groups: groups per query tile of the Triton kernels (default 1; max_groups is rounded up
      to a multiple of it). The Mosaic GPU forward always takes two (one per consumer
      warpgroup) and ignores it; the Triton backward behind it takes it.
    kv_splits: programs per key tile in the GPU kernel's dK/dV backward (default 1: one
      program walks the key group's whole query range; S > 1: S programs take equal shares of
      it and write float32 partials that an XLA sum adds, the same sums regrouped; 0: chosen
      from the grid, pallas_gpu.auto_kv_splits). The TPU kernels ignore it.
    bwd: the backward kernels of impl="pallas_mosaic_gpu": "mosaic" (default:
      pallas_mosaic_gpu.py's dQ and dK/dV kernels) or "triton" (pallas_gpu.py's). The other
      paths ignore it.
    return_fallback_frac: also return the fraction of batch rows that took the kernel path's
      runtime fallback (1.0 or 0.0: the lax.cond sends the whole batch), or None on a path that
      has none.

  Returns:
    o [B, T, H, D] in q's dtype; with return_fallback_frac, (o, fraction or None).
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must all be [B, T, H, D]")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be equal")
  b, t, h, d = q.shape
  if k_land.ndim != 4 or k_land.shape[0] != b or k_land.shape[2:] != (h, d):
    raise ValueError(f"k_land has shape {k_land.shape}; expected [B={b}, G, H={h}, D={d}]")
  if gid.shape != (b, t) or seg.shape != (b, t):
    raise ValueError(f"gid {gid.shape} and seg {seg.shape} must be [B={b}, T={t}]")
  if tile < 16 or tile & (tile - 1):
    raise ValueError(f"tile={tile} must be a power of two >= 16 (Triton); try 64")
  if chunk < 0:
    raise ValueError(f"chunk={chunk} must be >= 0 (0: all queries at once)")
  if block_len is not None and block_len < 1:
    raise ValueError(f"block_len={block_len} must be >= 1")
  if max_groups is not None and max_groups < 1:
    raise ValueError(f"max_groups={max_groups} must be >= 1")
  if q_groups is not None and q_groups < 1:
    raise ValueError(f"q_groups={q_groups} must be >= 1 (groups per query tile; try 1 or 2)")
  if kv_splits is not None:
    pallas_gpu.check_kv_splits(kv_splits)
  if bwd is not None and bwd not in MOSAIC_BACKWARDS:
    raise ValueError(f"bwd={bwd!r} is not one of {MOSAIC_BACKWARDS} (the backward kernels of "
                     "impl='pallas_mosaic_gpu')")
  scale = d ** -0.5 if scale is None else float(scale)
  gid, seg = gid.astype(jnp.int32), seg.astype(jnp.int32)

  def xla_path(q, k, v, k_land):
    if 0 < chunk < t:
      return xla.chunked_grouped_softmax_attention(q, k, v, k_land, gid, seg, scale=scale,
                                                   chunk=chunk)
    return reference.grouped_softmax_attention(q, k, v, k_land, gid, seg, scale=scale)[0]

  path, interpret = FAMILY.choose(impl, interpret=interpret, head_dim=d, block_len=block_len,
                                  tile=tile, dtype=q.dtype.name)
  static = {"reference": lambda *a: reference.grouped_softmax_attention(*a, gid, seg,
                                                                       scale=scale)[0],
            "xla": xla_path}
  if path in static:
    o = static[path](q, k, v, k_land)
    return (o, None) if return_fallback_frac else o
  if path == "pallas_gpu" and q.dtype.itemsize > 2 and (q_groups or 1) * tile * d > _F32_ROWS_X_D:
    # H200, float32, tile 64, D 128, q_groups 2: Triton asked 256 KiB of shared memory (227 KiB
    # there) and the launch failed at run time; refuse it here in one line instead.
    raise ValueError(f"q_groups={q_groups} with float32 at tile={tile}, head_dim={d} needs more "
                     "shared memory than a GPU has (q_groups * tile * head_dim must be <= "
                     f"{_F32_ROWS_X_D} in float32); use q_groups=1 or bfloat16")
  max_groups = max_groups or default_max_groups(t, block_len or tile - 1)
  # A multiple of the query tile's groups; the Mosaic forward's CTA holds two (an even count
  # spares it a padded group).
  per_tile = math.lcm(q_groups or 1, 2 if path == "pallas_mosaic_gpu" else 1)
  max_groups = -(-max_groups // per_tile) * per_tile
  lay = relayout(gid, seg, max_groups=max_groups, tile=tile)
  mosaic_bwd = (bwd or MOSAIC_BACKWARDS[0]) if path == "pallas_mosaic_gpu" else None
  tuning = tuple((n, x) for n, x in (("num_warps", num_warps), ("num_stages", num_stages),
                                     ("q_groups", q_groups), ("kv_splits", kv_splits),
                                     ("bwd", mosaic_bwd))
                 if x is not None)
  st = _Static(tile=tile, scale=scale, interpret=interpret, tuning=tuning,
               platform=path.removeprefix("pallas_"))
  o = lax.cond(lay["ok"], lambda *a: kernel_attention(*a, lay, st).astype(q.dtype),
               xla_path, q, k, v, k_land)
  return (o, 1.0 - lay["ok"].astype(jnp.float32)) if return_fallback_frac else o
