"""Public block-sparse flash attention: validation, padding and dispatch.

    o, lse = block_sparse_attention(q, k, v, kv_indices, kv_counts, block_q=64, block_k=64,
                                    causal=True, ...)

Each (batch, head, query block i) visits the key blocks kv_indices[b, h, i, :kv_counts[b, h, i]]
(build them from a dense block mask with `lists_from_block_mask`); inside visited tiles the
element conditions of common.py apply (a sliding `window` among them). Paths (FAMILY, in the
order "auto" tries them; the rules are kernels/dispatch.py's):
  "pallas_mosaic_gpu"  warp-specialized Mosaic GPU kernels (Hopper, compute capability 9.x;
                bfloat16, head_dim 64 or 128, tiles 64 or 128; no interpreter):
                checked on an H200 against reference.py and 2.3x the Triton kernels' fwd+bwd
                speed (docs/mosaic_gpu.md), with the sliding window too (checked there on
                2026-12-03; "auto" gives it windowed calls at block_q 128 only: at 64 a band
                ran slower than on Triton, _WINDOW_AT_64); float16 stays on Triton until it is
                checked there;
  "pallas_gpu"  Triton kernels (GPU; head_dim 64 or 128; interpret=True off-device);
  "pallas_tpu"  Mosaic kernels (TPU; same limits);
  "xla"         blocked jnp, work proportional to the lists;
  "reference"   dense masked attention, the oracle.
"pallas" is the Pallas kernel of the current backend (the Triton one off-device, interpreted).
Pallas paths differentiate with their own backward kernels (custom_vjp). With T split over
mesh.sequence the op runs as ring attention (context_parallel.py), which takes no window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import context_parallel, dispatch, mesh, paths
from effattn.kernels.block_sparse import context_parallel as ring
from effattn.kernels.block_sparse import pallas_gpu, pallas_tpu, reference, xla
from effattn.kernels.block_sparse.common import Aux, BlockSizes, transpose_lists

PALLAS_HEAD_DIMS = (64, 128)
_HEAD_DIM = dispatch.one_of("head_dim", PALLAS_HEAD_DIMS)
MOSAIC_TILES = (64, 128)
# A CTA covers 128 query rows: lists made at block_q 64 are merged in row pairs and the union
# streamed, so a band of 64-tiles (each row's list one tile past its pair's) costs more tiles
# than it lists. Measured (H200, persistent band B 2 T 16k H 8 D 128, window 512): 1.97 ms
# fwd+bwd on these kernels against 1.74 on Triton's (a day apart; same-run timing: scripts/
# bench_persistent.py --paths auto,pallas_gpu,pallas_mosaic_gpu,pallas_mosaic_gpu_t128).
_WINDOW_AT_64 = dispatch.Limit(("window", "block_q"), lambda window, block_q: "" if (
    window is None or block_q >= 128) else (
        f"window={window} at block_q={block_q}: a band of 64-row tiles ran slower here than on "
        "Triton (row pairs streamed as their union); impl='pallas_mosaic_gpu' forces it"))


def _hopper() -> str:
  """"" on a compute capability 9.x GPU (wgmma, TMA), else why not."""
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  return "" if cc.startswith("9") else f"compute capability {cc or 'unknown'} is not 9.x"


FAMILY = dispatch.Family("block_sparse", (
    dispatch.Path("pallas_mosaic_gpu", platform="gpu", interpretable=False,
                  device=lambda: _hopper(),  # looked up on use (tests stand in a device)
                  limits=(_HEAD_DIM, dispatch.one_of("dtype", ("bfloat16",)),
                          dispatch.one_of("block_q", MOSAIC_TILES),
                          dispatch.one_of("block_k", MOSAIC_TILES)),
                  auto_limits=(_WINDOW_AT_64,)),
    dispatch.Path("pallas_gpu", platform="gpu", limits=(_HEAD_DIM,)),
    dispatch.Path("pallas_tpu", platform="tpu", limits=(_HEAD_DIM,)),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))
# Segment ids given to padded rows: padded keys match no query, padded queries see nothing.
_PAD_Q_SEG = -(2 ** 31)
_PAD_KV_SEG = -(2 ** 31) + 1


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  block_q: int
  block_k: int
  interpret: bool
  platform: str  # "gpu" (Triton) | "mosaic_gpu" | "tpu"
  tuning: tuple = ()  # Triton (num_warps, num_stages) overrides as key-value pairs
  window: int | None = None  # common.element_mask's sliding window


def _options(st: _Static) -> dict:
  """Keyword arguments of the backend's forward / backward besides the shared ones."""
  return dict(st.tuning, window=st.window)


def _vec(x, name: str, b: int, n: int, heads: tuple[int, ...], dtype):
  """[B, N] or [B', Hx, N] -> [B', Hx, N] in dtype, checked."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim == 2:
    x = x[:, None, :]
  if x.ndim != 3 or x.shape[0] not in (1, b) or x.shape[1] not in heads or x.shape[2] != n:
    raise ValueError(f"{name} has shape {x.shape}; expected [B, {n}] or [B or 1, H in {heads}, "
                     f"{n}]")
  return x.astype(dtype)


def _pad_axis(x, axis: int, size: int, value):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _kernel_module(platform: str):
  if platform == "mosaic_gpu":  # imported on use: a jax without Mosaic GPU still has the rest
    from effattn.kernels.block_sparse import pallas_mosaic_gpu
    return pallas_mosaic_gpu
  return pallas_tpu if platform == "tpu" else pallas_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas(q, k, v, kv_indices, kv_counts, aux, st: _Static):
  return _kernel_module(st.platform).forward(
      q, k, v, kv_indices, kv_counts, aux, causal=st.causal, scale=st.scale,
      block_q=st.block_q, block_k=st.block_k, interpret=st.interpret, **_options(st))


def _pallas_fwd(q, k, v, kv_indices, kv_counts, aux, st):
  o, lse = _pallas(q, k, v, kv_indices, kv_counts, aux, st)
  return (o, lse), (q, k, v, kv_indices, kv_counts, aux, o, lse)


def _pallas_bwd(st, res, cotangents):
  q, k, v, kv_indices, kv_counts, aux, o, lse = res
  do, dlse = cotangents
  # A query that sees nothing has lse = -inf and no gradient; keep its delta finite.
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
  q_indices, q_counts = transpose_lists(kv_indices, kv_counts, k.shape[1] // st.block_k)
  dq, dk, dv, dbias = _kernel_module(st.platform).backward(
      q, k, v, lse, do.astype(q.dtype), delta, kv_indices, kv_counts, q_indices, q_counts, aux,
      causal=st.causal, scale=st.scale, block_q=st.block_q, block_k=st.block_k,
      interpret=st.interpret, **_options(st))
  d_aux = Aux(*(None for _ in Aux._fields))
  if aux.kv_bias is not None:
    want = aux.kv_bias.shape
    axes = tuple(a for a in (0, 1) if want[a] == 1 and dbias.shape[a] != 1)
    d_aux = d_aux._replace(kv_bias=jnp.sum(dbias, axis=axes, keepdims=True).reshape(want))
  return dq, dk, dv, None, None, d_aux


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
# q, k, v, kv_indices, kv_counts, aux (every field [B', Hx, N]) -> o, lse.
_LAYOUTS = (("BTHD", "BSHD", "BSHD", "BHQK", "BHQ", "BHN"), ("BTHD", "BHT"))



def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    *,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_bias: jax.Array | None = None,
    q_threshold: jax.Array | None = None,
    q_threshold_pos: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Softmax attention restricted to listed key blocks and an element mask.

  Args:
    q: [B, T, H, D]; k, v: [B, S, H_kv, D] with H_kv dividing H (GQA, no repeats made).
    kv_indices: [B', H', nQ, K] int32 key-block ids per query block, ascending, nQ = ceil(T /
      block_q); B' in {1, B}, H' in {1, H}. kv_counts: [B', H', nQ] valid slots per row.
    block_q, block_k: tile sizes and the granularity of the lists (powers of two).
    causal: keep key j for query i only when kv_positions[j] <= q_positions[i].
    q_positions / kv_positions: [B, T] / [B, S] or per head [B', Hx, N]; default token index.
    q_segment_ids / kv_segment_ids: keep only equal ids (packed sequences, padding).
    kv_bias: additive score bias per key [B, S] or [B', 1 or H_kv, S]; gets a gradient.
    q_threshold / q_threshold_pos: per query [B', 1 | H_kv | H, T]; keep key j only when
      (kv_bias[j], -kv_pos[j]) >= (q_threshold[i], -q_threshold_pos[i]) (top-w by bias).
    window: static sliding window: keep key j only when q_pos[i] - kv_pos[j] < window (by
      positions; one-sided, so with causal=False later keys stay). The lists should hold the
      band (common.causal_block_mask(..., window=)): the window masks elements, it does not
      skip tiles. None: no condition and no extra work.
    scale: score scale, default D ** -0.5.
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    interpret: run Pallas kernels in interpret mode (CPU tests).
    num_warps, num_stages: GPU tuning overrides (Triton warps and stages; Mosaic GPU: stages
      only), default heuristic.

  Returns:
    o [B, T, H, D] in q's dtype, lse [B, H, T] float32 log-sum-exp of the kept scores (natural
    log; -inf and o = 0 where a query keeps no key).
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must be [B, T, H, D] with k and v "
                     "of one shape")
  b, t, h, d = q.shape
  s_len, h_kv = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d or h % h_kv:
    raise ValueError(f"k {k.shape} must be [B={b}, S, H_kv, D={d}] with H_kv dividing H={h}")
  sizes = BlockSizes(block_q, block_k)
  n_q, n_k = -(-t // block_q), -(-s_len // block_k)
  if (kv_indices.ndim != 4 or kv_indices.shape[0] not in (1, b)
      or kv_indices.shape[1] not in (1, h) or kv_indices.shape[2] != n_q):
    raise ValueError(f"kv_indices has shape {kv_indices.shape}; expected [B or 1, H or 1, "
                     f"nQ={n_q}, K] for T={t}, {block_q=}")
  if kv_counts.shape != kv_indices.shape[:3]:
    raise ValueError(f"kv_counts has shape {kv_counts.shape}; expected {kv_indices.shape[:3]}")
  if (q_threshold is None) != (q_threshold_pos is None) or (
      q_threshold is not None and kv_bias is None):
    raise ValueError("q_threshold and q_threshold_pos go together and need kv_bias")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
      raise ValueError(f"window={window!r} must be a positive int (keys with q_pos - kv_pos < "
                       "window) or None")
    window = int(window)
  q_heads, kv_heads = (1, h_kv, h), (1, h_kv)
  aux = Aux(
      q_pos=_vec(q_positions, "q_positions", b, t, q_heads, jnp.int32),
      kv_pos=_vec(kv_positions, "kv_positions", b, s_len, kv_heads, jnp.int32),
      q_seg=_vec(q_segment_ids, "q_segment_ids", b, t, q_heads, jnp.int32),
      kv_seg=_vec(kv_segment_ids, "kv_segment_ids", b, s_len, kv_heads, jnp.int32),
      kv_bias=_vec(kv_bias, "kv_bias", b, s_len, kv_heads, jnp.float32),
      q_thr=_vec(q_threshold, "q_threshold", b, t, q_heads, jnp.float32),
      q_thr_pos=_vec(q_threshold_pos, "q_threshold_pos", b, t, q_heads, jnp.int32),
  )
  if (aux.q_seg is None) != (aux.kv_seg is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  scale = d ** -0.5 if scale is None else float(scale)
  kv_indices, kv_counts = kv_indices.astype(jnp.int32), kv_counts.astype(jnp.int32)
  n = context_parallel.sequence_size()
  if n > 1:  # T split over mesh.sequence: ring attention, this op per device and ring step
    if window is not None:
      raise ValueError(f"block_sparse context-parallel (mesh.sequence={n}): window={window} has "
                       "no ring path; set mesh.sequence=1 or window=None")
    paths.log_path_once("block_sparse", "ring", f"mesh.sequence={n}, {impl} per ring step")
    attend = functools.partial(block_sparse_attention, num_warps=num_warps,
                               num_stages=num_stages)
    return ring.ring_attention(attend, q, k, v, aux, (kv_indices, kv_counts), causal=causal,
                               scale=scale, block_q=block_q, block_k=block_k, impl=impl,
                               interpret=interpret)
  path, interpret = FAMILY.choose(impl, interpret=interpret, head_dim=d, dtype=q.dtype.name,
                                  block_q=block_q, block_k=block_k, window=window)
  if path == "reference":
    return reference.block_sparse_attention(q, k, v, kv_indices, kv_counts, aux, causal=causal,
                                            scale=scale, block_q=block_q, block_k=block_k,
                                            window=window)

  # Pad ragged lengths to whole tiles; padded rows get segment ids that match nothing.
  t_pad, s_pad = n_q * block_q, n_k * block_k
  if t_pad != t or s_pad != s_len:
    if aux.q_seg is None:
      aux = aux._replace(q_seg=jnp.zeros((1, 1, t), jnp.int32),
                         kv_seg=jnp.zeros((1, 1, s_len), jnp.int32))
    aux = Aux(
        q_pos=_pad_axis(aux.q_pos, 2, t_pad, 0),
        kv_pos=_pad_axis(aux.kv_pos, 2, s_pad, 0),
        q_seg=_pad_axis(aux.q_seg, 2, t_pad, _PAD_Q_SEG),
        kv_seg=_pad_axis(aux.kv_seg, 2, s_pad, _PAD_KV_SEG),
        kv_bias=_pad_axis(aux.kv_bias, 2, s_pad, 0.0),
        q_thr=_pad_axis(aux.q_thr, 2, t_pad, 0.0),
        q_thr_pos=_pad_axis(aux.q_thr_pos, 2, t_pad, 0),
    )
    q = _pad_axis(q, 1, t_pad, 0)
    k = _pad_axis(k, 1, s_pad, 0)
    v = _pad_axis(v, 1, s_pad, 0)
  if path == "xla":
    o, lse = xla.block_sparse_attention(q, k, v, kv_indices, kv_counts, aux, causal=causal,
                                        scale=scale, block_q=block_q, block_k=block_k,
                                        window=window)
  else:
    platform = path.removeprefix("pallas_")
    tuning = tuple((n, x) for n, x in (("num_warps", num_warps), ("num_stages", num_stages))
                   if x is not None and platform in ("gpu", "mosaic_gpu"))
    st = _Static(causal=causal, scale=scale, block_q=sizes.block_q, block_k=sizes.block_k,
                 interpret=interpret, platform=platform, tuning=tuning, window=window)
    kernel = mesh.on_mesh("block_sparse", path, lambda *a: _pallas(*a, st), *_LAYOUTS)
    o, lse = kernel(q, k, v, kv_indices, kv_counts, aux)

  return o[:, :t], lse[:, :, :t]
