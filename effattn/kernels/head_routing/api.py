"""Public head-routed attention: validation, padding, compaction and dispatch.

    o = head_routed_attention(q, k, v, gates, causal=True, segment_ids=None, impl="auto")

Each (token, head) pair with a non-zero gate gets gate * softmax attention of that head over the
keys it may see; pairs with gate 0 are skipped and output 0 (mixture-of-head attention's routed
heads). Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
  "pallas_gpu"  Triton kernels (GPU; head_dim 16, 32, 64 or 128; interpret=True off-device);
  "pallas_tpu"  Mosaic kernels (TPU; same limits);
  "xla"         every head densely through effattn.kernels.softmax (cuDNN on GPU), then gated:
                no FLOPs saved, what the official MoH code does;
  "reference"   dense plain jnp, the oracle;
  "block_sparse" the compacted queries through effattn.kernels.block_sparse (block_sparse.py),
                whose own "auto" runs its Mosaic GPU kernels on Hopper. Forced only, until a GPU
                run times it against "pallas_gpu".
"pallas" is the Pallas kernel of the current backend (the Triton one off-device, interpreted).
The Pallas paths compact each head's routed tokens (common.py) so the kernels compute
ceil(count / block_q) query tiles per head, and differentiate with their own backward kernels
(custom_vjp). A batch whose rows are each one segment (segment ids of ones, as unpacked
pipeline batches have) runs the kernels without segment ids (lax.cond), so tiles below the
causal diagonal skip the element mask. The gradient with respect to a zero gate is 0: skipped
pairs are absent, not zero-weighted (MoH's top-k mask has no gradient either).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from effattn.kernels import dispatch, mesh
from effattn.kernels.head_routing import block_sparse, pallas_gpu, pallas_tpu, reference, xla
from effattn.kernels.head_routing.common import (BlockSizes, compact, gather_tokens,
                                                 key_block_bounds)

PALLAS_HEAD_DIMS = (16, 32, 64, 128)
_HEAD_DIM = dispatch.one_of("head_dim", PALLAS_HEAD_DIMS)
FAMILY = dispatch.Family("head_routing", (
    dispatch.Path("pallas_gpu", platform="gpu", limits=(_HEAD_DIM,)),
    dispatch.Path("pallas_tpu", platform="tpu", limits=(_HEAD_DIM,)),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
    dispatch.Path("block_sparse"),  # last: "auto" keeps the paths above until it is timed
))


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  block_q: int
  block_k: int
  kv_len: int
  interpret: bool
  platform: str  # "gpu" | "tpu"


def _kernels(platform: str):
  return pallas_tpu if platform == "tpu" else pallas_gpu


def _per_head_segments(segment_ids, perm):
  """segment_ids [B, T] -> compacted [B, H, T] per head (None stays None)."""
  if segment_ids is None:
    return None
  seg = jnp.broadcast_to(segment_ids[:, :, None], perm.shape)
  return jnp.swapaxes(jnp.take_along_axis(seg, perm, axis=1), 1, 2)


def _with_segments(run, segment_ids, q_seg, one_run):
  """run(segment_ids, q_seg) with the segments, or without them where every row is one run
  (one_run: then the segment mask keeps every pair, and the kernels skip it on the tiles
  below the causal diagonal). A lax.cond, so both forms are exact for any batch."""
  if segment_ids is None:
    return run(None, None)
  return jax.lax.cond(one_run, lambda: run(None, None), lambda: run(segment_ids, q_seg))


def _forward(q, k, v, gates, segment_ids, one_run, st: _Static):
  active = gates != 0
  c = compact(active)
  q_seg = _per_head_segments(segment_ids, c.perm)
  q_c = gather_tokens(q, c.perm)
  o_c, lse = _with_segments(lambda seg, qs: _kernels(st.platform).forward(
      q_c, k, v, c.pos, qs, seg, causal=st.causal, scale=st.scale, block_q=st.block_q,
      block_k=st.block_k, kv_len=st.kv_len, interpret=st.interpret), segment_ids, q_seg, one_run)
  o_u = gather_tokens(o_c, c.slot)  # back to token order, unweighted
  g = gates[..., None]
  o = jnp.where(active[..., None], g * o_u.astype(jnp.float32), 0.0).astype(q.dtype)
  return o, (c, q_seg, o_c, lse, o_u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas(q, k, v, gates, segment_ids, one_run, st: _Static):
  return _forward(q, k, v, gates, segment_ids, one_run, st)[0]


def _pallas_fwd(q, k, v, gates, segment_ids, one_run, st):
  o, (c, q_seg, o_c, lse, o_u) = _forward(q, k, v, gates, segment_ids, one_run, st)
  return o, (q, k, v, gates, segment_ids, one_run, c, q_seg, o_c, lse, o_u)


def _pallas_bwd(st, res, do):
  q, k, v, gates, segment_ids, one_run, c, q_seg, o_c, lse, o_u = res
  active = (gates != 0)[..., None]
  do = do.astype(jnp.float32)
  d_gates = jnp.where(active, do * o_u.astype(jnp.float32), 0.0).sum(-1).astype(gates.dtype)
  do_u = jnp.where(active, gates[..., None] * do, 0.0).astype(q.dtype)
  do_c = gather_tokens(do_u, c.perm)  # unused slots hold unrouted tokens: do_u = 0 there
  delta = jnp.swapaxes(jnp.sum(o_c.astype(jnp.float32) * do_c.astype(jnp.float32), -1), 1, 2)
  q_c = gather_tokens(q, c.perm)

  def run(seg, qs):
    bounds = key_block_bounds(c, causal=st.causal, segments=seg is not None,
                              num_k_blocks=k.shape[1] // st.block_k, block_k=st.block_k)
    return _kernels(st.platform).backward(
        q_c, k, v, c.pos, qs, seg, lse, do_c, delta, bounds, causal=st.causal, scale=st.scale,
        block_q=st.block_q, block_k=st.block_k, kv_len=st.kv_len, interpret=st.interpret)
  dq_c, dk, dv = _with_segments(run, segment_ids, q_seg, one_run)
  dq = jnp.where(active, gather_tokens(dq_c, c.slot), 0).astype(q.dtype)
  return dq, dk, dv, d_gates, None, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def head_routed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    impl: str = "auto",
    interpret: bool = False,
    return_fallback_frac: bool = False,
):
  """Gated attention computed only for the (token, head) pairs with a non-zero gate.

  Args:
    q: [B, T, H, D] queries; k, v: [B, T, H_kv, D] (self-attention; H_kv divides H, GQA
      without repeated K/V).
    gates: [B, T, H] float weights; 0 marks a skipped pair.
    causal: keys j <= i only; otherwise all keys.
    segment_ids: [B, T] int; tokens attend only inside their own segment (packing, padding).
    scale: score scale, default D ** -0.5.
    block_q, block_k: Pallas tile sizes (powers of two >= 16).
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    return_fallback_frac: also return the fraction of batch rows that took a runtime fallback
      (only the xla path has one: softmax's packed cuDNN call), or None.

  Returns:
    o [B, T, H, D] in q's dtype: gates * attention where gates != 0, else 0; with
    return_fallback_frac, (o, fraction or None).
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must be [B, T, H, D] with k and v "
                     "of one shape")
  b, t, h, d = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"k {k.shape} must be [B={b}, T={t}, H_kv, D={d}] with H_kv dividing H={h} "
                     "(self-attention)")
  if gates.shape != (b, t, h):
    raise ValueError(f"gates has shape {gates.shape}; expected [B, T, H] = {(b, t, h)}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [B, T] = {(b, t)}")
  sizes = BlockSizes(block_q, block_k)
  scale = d ** -0.5 if scale is None else float(scale)
  path, interpret = FAMILY.choose(impl, interpret=interpret, head_dim=d)
  frac = None
  if path == "reference":
    o = reference.head_routed_attention(q, k, v, gates, causal=causal, segment_ids=segment_ids,
                                        scale=scale)
  elif path == "xla":
    o, frac = xla.head_routed_attention(q, k, v, gates, causal=causal, segment_ids=segment_ids,
                                        scale=scale)
  elif path == "block_sparse":
    o = block_sparse.head_routed_attention(q, k, v, gates, causal=causal,
                                           segment_ids=segment_ids, scale=scale,
                                           block_q=block_q, block_k=block_k,
                                           interpret=interpret)
  else:
    o = _pallas_path(q, k, v, gates, segment_ids, causal=causal, scale=scale, sizes=sizes,
                     interpret=interpret, platform=path.removeprefix("pallas_"))
  return (o, frac) if return_fallback_frac else o


def _pallas_path(q, k, v, gates, segment_ids, *, causal, scale, sizes, interpret, platform):
  t = q.shape[1]
  # Every row one run of one id (unpacked batches): the kernels may drop the segment mask.
  one_run = (jnp.ones((), bool) if segment_ids is None
             else jnp.all(segment_ids == segment_ids[:, :1]))
  # Pad to whole tiles: padded tokens are never routed, and as keys they are masked by
  # causality or by kv_len.
  tile = max(sizes.block_q, sizes.block_k)
  t_pad = -(-t // tile) * tile
  if t_pad != t:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, k, v, gates = pad(q), pad(k), pad(v), pad(gates)
    segment_ids = None if segment_ids is None else pad(segment_ids)
  st = _Static(causal=causal, scale=scale, block_q=sizes.block_q, block_k=sizes.block_k,
               kv_len=t, interpret=interpret, platform=platform)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  # one_run is the whole batch's: true on every shard when true.
  kernel = mesh.on_mesh("head_routing", f"pallas_{platform}", lambda *a: _pallas(*a, st),
                        ("BTHD", "BTHD", "BTHD", "BTH", "BT", ""), "BTHD")
  return kernel(q, k, v, gates, seg, one_run)[:, :t]

