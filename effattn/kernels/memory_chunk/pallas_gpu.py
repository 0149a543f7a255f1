"""Pallas (Triton lowering) kernels of the chunk-parallel memory update, forward and backward.

One program per (batch row, head) walks the chunks in order and keeps the memory W and the
momentum S [Dk, Dv] in registers, so each chunk reads q, k, v and its gates once and writes y
once; the per-chunk math is xla.chunk_forward verbatim. With `save_states` the forward also
writes (W, S) at the start of every chunk, the residual of the backward kernel, which walks the
chunks in reverse carrying (dW, dS) and calls xla.chunk_backward.

Layout [B, T, H, D] as given (no transposes); gates [B, T, H] and token masks [B, T] are read
with strides. The caller pads T to a multiple of the chunk (api.memory_update).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.memory_chunk import xla


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Triton launch parameters (the chunk is part of the math, not a tile: api's chunk_size).

  num_warps: None picks 8 for chunks >= 64 and 4 below (H100, D=64: C=64 runs 1.6x faster
  forward and 1.3x faster backward with 8 warps than with 4; docs/benchmarks.md).
  """

  num_warps: int | None = None
  num_stages: int = 1

  def warps(self, chunk: int) -> int:
    return self.num_warps or (8 if chunk >= 64 else 4)

  def __post_init__(self):
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"BlockSizes.num_warps={self.num_warps} must be a power of two <= 16")


def _load_chunk(refs, start, chunk):
  """Slices chunk [start, start + C) out of the 9 per-token refs."""
  return [r[pl.ds(start, chunk)] if r.ndim == 1 else r[pl.ds(start, chunk), :] for r in refs]


def _forward_kernel(*refs, chunk: int, dtype, save_states: bool):
  """9 token refs (q, k [Tp, Dk]; v [Tp, Dv]; theta, lb, le, seg, carry, end [Tp]); w0, s0
  [Dk, Dv]; outputs y [Tp, Dv], w_T, s_T [Dk, Dv] and, with save_states, [N*Dk, Dv] each."""
  tokens, (w0_ref, s0_ref), outs = refs[:9], refs[9:11], refs[11:]
  y_ref, w_out, s_out = outs[:3]
  dk = w0_ref.shape[0]
  num_chunks = tokens[0].shape[0] // chunk

  def body(c, state):
    w, s = state
    start = pl.multiple_of(c * chunk, chunk)
    if save_states:
      outs[3][pl.ds(c * dk, dk), :] = w
      outs[4][pl.ds(c * dk, dk), :] = s
    y, w, s = xla.chunk_forward(*_load_chunk(tokens, start, chunk), w, s, dtype=dtype)
    y_ref[pl.ds(start, chunk), :] = y.astype(y_ref.dtype)
    return w, s

  w, s = jax.lax.fori_loop(0, num_chunks, body,
                           (w0_ref[...].astype(jnp.float32), s0_ref[...].astype(jnp.float32)))
  w_out[...] = w
  s_out[...] = s


def _backward_kernel(*refs, chunk: int, dtype):
  """9 token refs; saved states w, s [N*Dk, Dv]; dy [Tp, Dv]; dw_T, ds_T [Dk, Dv]; outputs dq,
  dk [Tp, Dk], dv [Tp, Dv], dtheta, dlb, dle [Tp], dw0, ds0 [Dk, Dv]."""
  tokens = refs[:9]
  w_states, s_states, dy_ref, dwT_ref, dsT_ref = refs[9:14]
  dq_ref, dk_ref, dv_ref, dth_ref, dlb_ref, dle_ref, dw0_ref, ds0_ref = refs[14:]
  dk_dim = dwT_ref.shape[0]
  num_chunks = tokens[0].shape[0] // chunk

  def body(step, cts):
    dw, ds = cts
    c = num_chunks - 1 - step
    start = pl.multiple_of(c * chunk, chunk)
    w = w_states[pl.ds(c * dk_dim, dk_dim), :]
    s = s_states[pl.ds(c * dk_dim, dk_dim), :]
    dy = dy_ref[pl.ds(start, chunk), :]
    dq, dk, dv, dth, dlb, dle, dw, ds = xla.chunk_backward(
        *_load_chunk(tokens, start, chunk), w, s, dy, dw, ds, dtype=dtype)
    for ref, val in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
      ref[pl.ds(start, chunk), :] = val.astype(ref.dtype)
    for ref, val in ((dth_ref, dth), (dlb_ref, dlb), (dle_ref, dle)):
      ref[pl.ds(start, chunk)] = val
    return dw, ds

  dw, ds = jax.lax.fori_loop(0, num_chunks, body,
                             (dwT_ref[...].astype(jnp.float32), dsT_ref[...].astype(jnp.float32)))
  dw0_ref[...] = dw
  ds0_ref[...] = ds


def _specs(b, padded, h, dk, dv):
  """BlockSpecs over grid (B, H): per-token tensors, gates, token masks, states."""
  sq = pl.squeezed
  tok = lambda d: pl.BlockSpec((sq, padded, sq, d), lambda bi, hi: (bi, 0, hi, 0))
  gate = pl.BlockSpec((sq, padded, sq), lambda bi, hi: (bi, 0, hi))
  mask = pl.BlockSpec((sq, padded), lambda bi, hi: (bi, 0))
  state = lambda rows: pl.BlockSpec((sq, sq, rows, dv), lambda bi, hi: (bi, hi, 0, 0))
  return tok, gate, mask, state


def forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0, *, chunk: int, dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            save_states: bool = True):
  """Same contract as xla.forward (states come back as [B, H, N*Dk, Dv] pairs)."""
  b, padded, h, dk = q.shape
  dv = v.shape[-1]
  n = padded // chunk
  tok, gate, mask, state = _specs(b, padded, h, dk, dv)
  f32 = jnp.float32
  out_specs = [tok(dv), state(dk), state(dk)]
  out_shape = [jax.ShapeDtypeStruct((b, padded, h, dv), f32),
               jax.ShapeDtypeStruct((b, h, dk, dv), f32), jax.ShapeDtypeStruct((b, h, dk, dv), f32)]
  if save_states:
    out_specs += [state(n * dk)] * 2
    out_shape += [jax.ShapeDtypeStruct((b, h, n * dk, dv), f32)] * 2
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, chunk=chunk, dtype=dtype, save_states=save_states),
      grid=(b, h),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, gate, mask, mask, mask, state(dk),
                state(dk)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.warps(chunk),
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="memory_chunk_fwd",
  )(q, k, v, theta, lb, le, seg.astype(jnp.int32), carry, end, w0, s0)
  y, w, s = outs[:3]
  return y, w, s, (tuple(outs[3:]) if save_states else None)


def backward(q, k, v, theta, lb, le, seg, carry, end, states, dy, dw_t, ds_t, *, chunk: int,
             dtype, block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward."""
  b, padded, h, dk = q.shape
  dv = v.shape[-1]
  n = padded // chunk
  tok, gate, mask, state = _specs(b, padded, h, dk, dv)
  f32 = jnp.float32
  shape = lambda *s: jax.ShapeDtypeStruct(s, f32)
  return pl.pallas_call(
      functools.partial(_backward_kernel, chunk=chunk, dtype=dtype),
      grid=(b, h),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, gate, mask, mask, mask,
                state(n * dk), state(n * dk), tok(dv), state(dk), state(dk)],
      out_specs=[tok(dk), tok(dk), tok(dv), gate, gate, gate, state(dk), state(dk)],
      out_shape=[shape(b, padded, h, dk), shape(b, padded, h, dk), shape(b, padded, h, dv),
                 shape(b, padded, h), shape(b, padded, h), shape(b, padded, h),
                 shape(b, h, dk, dv), shape(b, h, dk, dv)],
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.warps(chunk),
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="memory_chunk_bwd",
  )(q, k, v, theta, lb, le, seg.astype(jnp.int32), carry, end, *states, dy.astype(f32),
    dw_t.astype(f32), ds_t.astype(f32))
