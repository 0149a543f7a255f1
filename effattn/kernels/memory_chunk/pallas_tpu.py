"""Pallas (Mosaic TPU) kernels of the chunk-parallel memory update, forward and backward.

Grid (B, H, chunks) with the chunk axis sequential ("arbitrary"): each step receives one chunk
through BlockSpecs (Pallas double-buffers the HBM->VMEM copies) and carries (W, S) — or, in the
backward, (dW, dS) — in VMEM scratch. The per-chunk math is xla.chunk_forward / chunk_backward,
as in the GPU kernels. TPU tiles want the last two block dims to be (8k, 128k) or full, so the
wrapper works on [B, H, Tp, D] and gives per-token scalars as [.., N, 1, C] rows. Verified
against reference.py in interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effattn.kernels.memory_chunk import xla


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """No tunables beyond the chunk (api's chunk_size, a multiple of 8 on TPU)."""


def _chunk_values(refs):
  """Loads one chunk: q, k [C, Dk], v [C, Dv] and six [1, C] rows read as [C] vectors."""
  return [r[...] for r in refs[:3]] + [r[...][0] for r in refs[3:9]]


def _forward_kernel(*refs, dtype):
  tokens, (w0_ref, s0_ref) = refs[:9], refs[9:11]
  y_ref, w_out, s_out, w_saved, s_saved, w_acc, s_acc = refs[11:]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    w_acc[...] = w0_ref[...]
    s_acc[...] = s0_ref[...]

  w, s = w_acc[...], s_acc[...]
  w_saved[...] = w
  s_saved[...] = s
  y, w, s = xla.chunk_forward(*_chunk_values(tokens), w, s, dtype=dtype)
  y_ref[...] = y
  w_acc[...] = w
  s_acc[...] = s

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    w_out[...] = w
    s_out[...] = s


def _backward_kernel(*refs, dtype):
  tokens = refs[:9]
  w_ref, s_ref, dy_ref, dwT_ref, dsT_ref = refs[9:14]
  dq_ref, dk_ref, dv_ref, dth_ref, dlb_ref, dle_ref, dw0_ref, ds0_ref, dw_acc, ds_acc = refs[14:]
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    dw_acc[...] = dwT_ref[...]
    ds_acc[...] = dsT_ref[...]

  dq, dk, dv, dth, dlb, dle, dw, ds = xla.chunk_backward(
      *_chunk_values(tokens), w_ref[...], s_ref[...], dy_ref[...], dw_acc[...], ds_acc[...],
      dtype=dtype)
  dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
  dth_ref[...], dlb_ref[...], dle_ref[...] = dth[None], dlb[None], dle[None]
  dw_acc[...] = dw
  ds_acc[...] = ds

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dw0_ref[...] = dw
    ds0_ref[...] = ds


def _layout(q, k, v, theta, lb, le, seg, carry, end, chunk):
  """[B, Tp, H, D] -> [B, H, Tp, D]; gates [B, Tp, H] -> [B, H, N, 1, C]; masks -> [B, N, 1, C]."""
  b, padded, h, _ = q.shape
  n = padded // chunk
  heads = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
  gates = [jnp.swapaxes(x, 1, 2).reshape(b, h, n, 1, chunk) for x in (theta, lb, le)]
  masks = [x.reshape(b, n, 1, chunk) for x in (seg.astype(jnp.int32), carry, end)]
  return heads + gates + masks


def _specs(chunk, dk, dv, reverse):
  sq = pl.squeezed
  at = (lambda s: pl.num_programs(2) - 1 - s) if reverse else (lambda s: s)
  tok = lambda d: pl.BlockSpec((sq, sq, chunk, d), lambda bi, hi, s: (bi, hi, at(s), 0))
  gate = pl.BlockSpec((sq, sq, sq, 1, chunk), lambda bi, hi, s: (bi, hi, at(s), 0, 0))
  mask = pl.BlockSpec((sq, sq, 1, chunk), lambda bi, hi, s: (bi, at(s), 0, 0))
  state = pl.BlockSpec((sq, sq, dk, dv), lambda bi, hi, s: (bi, hi, 0, 0))
  saved = pl.BlockSpec((sq, sq, sq, dk, dv), lambda bi, hi, s: (bi, hi, at(s), 0, 0))
  return [tok(dk), tok(dk), tok(dv)] + [gate] * 3 + [mask] * 3, tok, gate, state, saved


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0, *, chunk: int, dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            save_states: bool = True):
  """Same contract as xla.forward (states come back as [B, H, N, Dk, Dv] pairs; always saved,
  since every grid step writes its own block anyway)."""
  del block_sizes, save_states
  b, padded, h, dk = q.shape
  dv = v.shape[-1]
  n = padded // chunk
  token_specs, tok, _, state, saved = _specs(chunk, dk, dv, reverse=False)
  f32 = jnp.float32
  y, w, s, w_saved, s_saved = pl.pallas_call(
      functools.partial(_forward_kernel, dtype=dtype),
      grid=(b, h, n),
      in_specs=token_specs + [state, state],
      out_specs=[tok(dv), state, state, saved, saved],
      out_shape=[jax.ShapeDtypeStruct((b, h, padded, dv), f32),
                 jax.ShapeDtypeStruct((b, h, dk, dv), f32), jax.ShapeDtypeStruct((b, h, dk, dv), f32),
                 jax.ShapeDtypeStruct((b, h, n, dk, dv), f32),
                 jax.ShapeDtypeStruct((b, h, n, dk, dv), f32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), f32), pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params(),
      interpret=interpret,
      name="memory_chunk_tpu_fwd",
  )(*_layout(q, k, v, theta, lb, le, seg, carry, end, chunk), w0, s0)
  return jnp.swapaxes(y, 1, 2), w, s, (w_saved, s_saved)


def backward(q, k, v, theta, lb, le, seg, carry, end, states, dy, dw_t, ds_t, *, chunk: int,
             dtype, block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward."""
  del block_sizes
  b, padded, h, dk = q.shape
  dv = v.shape[-1]
  n = padded // chunk
  token_specs, tok, gate, state, saved = _specs(chunk, dk, dv, reverse=True)
  f32 = jnp.float32
  shape = lambda *s: jax.ShapeDtypeStruct(s, f32)
  dq, dk_, dv_, dth, dlb, dle, dw0, ds0 = pl.pallas_call(
      functools.partial(_backward_kernel, dtype=dtype),
      grid=(b, h, n),
      in_specs=token_specs + [saved, saved, tok(dv), state, state],
      out_specs=[tok(dk), tok(dk), tok(dv), gate, gate, gate, state, state],
      out_shape=[shape(b, h, padded, dk), shape(b, h, padded, dk), shape(b, h, padded, dv),
                 shape(b, h, n, 1, chunk), shape(b, h, n, 1, chunk), shape(b, h, n, 1, chunk),
                 shape(b, h, dk, dv), shape(b, h, dk, dv)],
      scratch_shapes=[pltpu.VMEM((dk, dv), f32), pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params(),
      interpret=interpret,
      name="memory_chunk_tpu_bwd",
  )(*_layout(q, k, v, theta, lb, le, seg, carry, end, chunk), *states,
    jnp.swapaxes(dy.astype(f32), 1, 2), dw_t.astype(f32), ds_t.astype(f32))
  heads = [jnp.swapaxes(x, 1, 2) for x in (dq, dk_, dv_)]
  gates = [jnp.swapaxes(x.reshape(b, h, padded), 1, 2) for x in (dth, dlb, dle)]
  return (*heads, *gates, dw0, ds0)
