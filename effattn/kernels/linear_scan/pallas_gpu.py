"""Pallas (Triton lowering) kernel of the chunked linear scan, one direction per call.

One program per (batch row, head, block of Dv columns, part of T) walks the chunks of its part
in order (reversed for the anti-causal direction) and keeps its [Dk, block_v] slice of the state
in registers, so no per-chunk states ever reach HBM: each chunk reads q, k, v once and writes o
once. Per chunk:

  P = (q k^T) * decay            [C, C]   intra-chunk attention with the decay matrix
  o = P v + (w_q * q) S          [C, bv]  plus what the carried state holds
  S = keep * S + (w_k * k)^T v   [Dk, bv]

(the coefficients are xla.chunk_coefficients). The backward pass is three calls of this same
kernel on transposed problems (api.py), so forward and backward share one tuned kernel.

With one part (BlockSizes.splits=1) that is the whole scan: B * H * Dv / block_v programs, each
walking every chunk, which leaves most of a GPU idle at small batch x heads and long T. With P
parts the state is linear in what enters a part, S_out = K_p S_in + L_p (K_p the product of the
part's chunk keeps, a scalar per row and head), so the scan runs in three steps:

  1. states: each part from a zero state, the state updates only (no q k^T, no o) -> L_p;
  2. combine: S_in of every part by the P-step recurrence above (jnp, [B, H, Dk, Dv] per step);
  3. outputs: each part again from its S_in, writing o (the one-part kernel on a part).

That is P times the programs for about 1.3 times the matmul work (step 1 is one of the three
per-chunk products). splits=0 (default) picks P so the grid has about TARGET_PROGRAMS programs
with at least MIN_PART_CHUNKS chunks per part (P = 1, the one-pass kernel, at large B x H).

Layout [B, T, H, D] as given (no transposes). T is padded up to a multiple of the chunk by the
caller of `scan`; padded tokens are zero, and exponents are clamped so they never overflow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.linear_scan import xla
from effattn.kernels.matmul import dot


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU kernel.

  chunk: tokens per chunk C (the intra-chunk attention is C x C).
  block_v: Dv columns per program (Dv / block_v programs per head share the q k^T work).
  num_warps, num_stages: Triton launch parameters (stages pipeline the chunk loads).
  splits: parts of T scanned by separate programs (module docstring): 1 is the one-pass kernel,
    0 picks the number from the grid (`parts_for`).
  """

  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2
  splits: int = 0

  def __post_init__(self):
    for field in ("chunk", "block_v"):
      value = getattr(self, field)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{field}={value} must be a power of two >= 16 (Triton tiles)")
    if self.splits < 0:
      raise ValueError(f"BlockSizes.splits={self.splits} must be >= 0 (0: chosen from the grid, "
                       "1: one pass)")


# splits=0: parts enough for about this many programs (a few per SM of a large GPU), each part
# at least this many chunks (below that the extra states pass and combine cost more than the
# parallelism saves).
TARGET_PROGRAMS = 256
MIN_PART_CHUNKS = 4


def parts_for(splits: int, programs: int, num_chunks: int) -> tuple[int, int]:
  """(parts, chunks per part) for `programs` programs per part and `num_chunks` chunks."""
  if splits == 0:
    splits = min(-(-TARGET_PROGRAMS // programs), num_chunks // MIN_PART_CHUNKS)
  splits = max(1, min(splits, num_chunks))
  per_part = -(-num_chunks // splits)
  return -(-num_chunks // per_part), per_part


_dot = dot  # IEEE precision for f32 operands (no silent TF32)


def _scan_kernel(q_ref, k_ref, v_ref, g_ref, *refs, length: int, chunk: int, reverse: bool,
                 scale: float, has_runs: bool, part_chunks: int, outputs: str):
  """q_ref, k_ref [Tp, Dk]; v_ref [Tp, bv]; g_ref []; s0_ref [Dk, bv] (absent for "state": the
  part starts from zero); runs_ref [Tp] (with has_runs); then the outputs: "both" o_ref
  [Tp, bv] and sT_ref [Dk, bv], "o" o_ref only, "state" sT_ref only (no q k^T, no o). This
  program walks chunks [p * part_chunks, (p + 1) * part_chunks), p = program_id(3)."""
  refs = list(refs)
  s0_ref = None if outputs == "state" else refs.pop(0)
  runs_ref = refs.pop(0) if has_runs else None
  o_ref = refs[0] if outputs in ("both", "o") else None
  sT_ref = refs[-1] if outputs in ("both", "state") else None
  padded = q_ref.shape[0]
  num_chunks = padded // chunk
  first_chunk = pl.program_id(3) * part_chunks
  dt = q_ref.dtype
  g = g_ref[...].astype(jnp.float32)
  i = jnp.arange(chunk)
  dist = i[None, :] - i[:, None] if reverse else i[:, None] - i[None, :]
  # Full-chunk coefficients, hoisted out of the loop; padded keys are zero so the intra decay
  # needs no validity mask (xla.chunk_coefficients masks explicitly; the products agree).
  decay = jnp.where(dist >= 0, jnp.exp(g * jnp.maximum(dist, 0).astype(jnp.float32)), 0.)
  w_in = jnp.exp(g * (i + 1).astype(jnp.float32))

  def body(step, state):
    c = first_chunk + (part_chunks - 1 - step if reverse else step)
    start = pl.multiple_of(c * chunk, chunk)
    real = jnp.clip(length - start, 0, chunk)  # 0: a chunk of padding (a part's tail)
    w_out = jnp.exp(g * jnp.maximum(real - 1 - i, 0).astype(jnp.float32))
    w_q, w_k = (w_out, w_in) if reverse else (w_in, w_out)
    keep = jnp.exp(g * real.astype(jnp.float32))
    k = k_ref[pl.ds(start, chunk), :]
    v = v_ref[pl.ds(start, chunk), :]
    if has_runs:
      r = runs_ref[pl.ds(start, chunk)]
      if reverse:
        after = runs_ref[pl.ds(jnp.minimum(start + chunk, padded - chunk), chunk)]
        edge = jnp.where(c == num_chunks - 1, jnp.max(r), jnp.min(after))
        far = jnp.min(r)
      else:
        before = runs_ref[pl.ds(jnp.maximum(start - chunk, 0), chunk)]
        edge = jnp.where(c == 0, jnp.min(r), jnp.max(before))
        far = jnp.max(r)
      w_k = jnp.where(r == far, w_k, 0.)
      keep = jnp.where(far == edge, keep, 0.)
    if o_ref is not None:
      q = q_ref[pl.ds(start, chunk), :]
      p = _dot(q, k, trans_b=True) * decay
      if has_runs:
        p = jnp.where(r[:, None] == r[None, :], p, 0.)
        w_q = jnp.where(r == edge, w_q, 0.)
      o = _dot(p.astype(dt), v) + _dot((q * w_q[:, None]).astype(dt), state.astype(dt))
      o_ref[pl.ds(start, chunk), :] = (o * scale).astype(o_ref.dtype)
    return keep * state + _dot((k * w_k[:, None]).astype(dt), v, trans_a=True)

  init = (jnp.zeros(sT_ref.shape, jnp.float32) if s0_ref is None
          else s0_ref[...].astype(jnp.float32))
  state = jax.lax.fori_loop(0, part_chunks, body, init)
  if sT_ref is not None:
    sT_ref[...] = state


def _call(q, k, v, g, s0, runs, *, length, reverse, scale, sizes, block_v, parts, part_chunks,
          outputs, out_dtype, interpret):
  """One pallas_call over the grid (Dv / block_v, B, H, parts). q, k, v, runs padded to
  parts * part_chunks chunks. s0: [B, H, Dk, Dv], or per part [B, H, parts, Dk, Dv] ("o"),
  or None ("state"). Returns the requested outputs: o [B, Tp, H, Dv] and/or states
  ([B, H, Dk, Dv] for "both", [B, H, parts, Dk, Dv] for "state")."""
  b, padded, h, dk = q.shape
  dv = v.shape[-1]
  kernel = functools.partial(_scan_kernel, length=length, chunk=sizes.chunk, reverse=reverse,
                             scale=float(scale), has_runs=runs is not None,
                             part_chunks=part_chunks, outputs=outputs)
  sq = pl.squeezed
  # The Dv-block axis comes first (fastest-launched) so programs sharing q and k run together.
  qk_spec = pl.BlockSpec((sq, padded, sq, dk), lambda vi, bi, hi, pi: (bi, 0, hi, 0))
  v_spec = pl.BlockSpec((sq, padded, sq, block_v), lambda vi, bi, hi, pi: (bi, 0, hi, vi))
  state_spec = pl.BlockSpec((sq, sq, dk, block_v), lambda vi, bi, hi, pi: (bi, hi, 0, vi))
  part_spec = pl.BlockSpec((sq, sq, sq, dk, block_v), lambda vi, bi, hi, pi: (bi, hi, pi, 0, vi))
  in_specs = [qk_spec, qk_spec, v_spec, pl.BlockSpec((sq,), lambda vi, bi, hi, pi: (hi,))]
  args = [q, k, v, g]
  if outputs != "state":
    in_specs.append(part_spec if outputs == "o" else state_spec)
    args.append(s0)
  if runs is not None:
    in_specs.append(pl.BlockSpec((sq, padded), lambda vi, bi, hi, pi: (bi, 0)))
    args.append(runs)
  out_specs, out_shape = [], []
  if outputs in ("both", "o"):
    out_specs.append(v_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, padded, h, dv), out_dtype))
  if outputs == "both":
    out_specs.append(state_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32))
  if outputs == "state":
    out_specs.append(part_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, h, parts, dk, dv), jnp.float32))
  name = "linear_scan_reverse" if reverse else "linear_scan"
  return pl.pallas_call(
      kernel,
      grid=(dv // block_v, b, h, parts),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps,
                                           num_stages=sizes.num_stages),
      interpret=interpret,
      name=name if outputs != "state" else f"{name}_states",
  )(*args)


def _part_keeps(g, runs, *, length, chunk, parts, part_chunks, reverse):
  """K_p [B or 1, H, parts]: what the state entering part p keeps at its other end (the
  product of the part's chunk keeps: the decay over its real tokens, 0 if a run ends in it)."""
  starts = jnp.arange(parts) * part_chunks * chunk
  tokens = jnp.clip(length - starts, 0, part_chunks * chunk)
  keep = jnp.exp(g[None, :, None] * tokens[None, None, :].astype(jnp.float32))  # [1, H, P]
  if runs is None:
    return keep
  runs_c = runs.reshape(runs.shape[0], parts * part_chunks, chunk)
  edge = xla.chunk_edges(runs_c, reverse)
  far = runs_c[:, :, 0] if reverse else runs_c[:, :, -1]
  alive = jnp.all((far == edge).reshape(runs.shape[0], parts, part_chunks), axis=2)
  return keep * alive[:, None, :].astype(jnp.float32)


def _part_states(s0, local, keeps, reverse):
  """States entering each part [B, H, P, Dk, Dv] and the final state, from the one entering
  the scan s0 [B, H, Dk, Dv], each part's own contribution `local` [B, H, P, Dk, Dv] and its
  keep K_p [B', H, P]: S_{next} = K_p S + L_p, part after part."""
  keeps = jnp.broadcast_to(keeps, local.shape[:3])
  xs = (jnp.moveaxis(keeps, 2, 0), jnp.moveaxis(local, 2, 0))

  def step(state, x):
    keep, contribution = x
    return keep[..., None, None] * state + contribution, state

  final, entering = jax.lax.scan(step, s0, xs, reverse=reverse)
  return jnp.moveaxis(entering, 0, 2), final


def scan(q, k, v, log_decay, initial_state, runs=None, *, reverse: bool = False,
         scale: float = 1.0, block_sizes: BlockSizes = BlockSizes(), out_dtype=None,
         interpret: bool = False):
  """One direction of the linear scan (math: reference.py; chunk formulas: xla.py).

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv], one dtype (bf16 or f32); Dk, Dv powers of two >= 16.
    log_decay: [H] float32 <= 0. initial_state: [B, H, Dk, Dv] float32.
    runs: [B, T] int32 non-decreasing run ids (packed sequences) or None.
    reverse: anti-causal direction. scale: multiplies o.
    block_sizes: tiles; block_v is clipped to Dv.
    out_dtype: dtype of o (default q.dtype). interpret: run the kernel in the Pallas interpreter.

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = block_sizes.chunk
  block_v = min(block_sizes.block_v, dv)
  for name, dim in (("Dk", dk), ("Dv", dv)):
    if dim < 16 or dim & (dim - 1):
      raise ValueError(f"{name}={dim} must be a power of two >= 16 for the Pallas GPU kernel; "
                       "use impl='xla'")
  out_dtype = out_dtype or q.dtype
  num_chunks = -(-t // chunk)
  parts, part_chunks = parts_for(block_sizes.splits, (dv // block_v) * b * h, num_chunks)
  span = part_chunks * chunk
  q, k, v = (xla.pad_to_chunks(x, span) for x in (q, k, v))
  g = log_decay.astype(jnp.float32)
  runs = None if runs is None else xla.pad_runs(runs.astype(jnp.int32), span)
  kw = dict(length=t, reverse=reverse, scale=scale, sizes=block_sizes, block_v=block_v,
            parts=parts, part_chunks=part_chunks, out_dtype=out_dtype, interpret=interpret)
  s0 = initial_state.astype(jnp.float32)
  if parts == 1:
    o, final = _call(q, k, v, g, s0, runs, outputs="both", **kw)
    return o[:, :t], final
  (local,) = _call(q, k, v, g, None, runs, outputs="state", **kw)
  keeps = _part_keeps(g, runs, length=t, chunk=chunk, parts=parts, part_chunks=part_chunks,
                      reverse=reverse)
  entering, final = _part_states(s0, local, keeps, reverse)
  (o,) = _call(q, k, v, g, entering, runs, outputs="o", **kw)
  return o[:, :t], final
