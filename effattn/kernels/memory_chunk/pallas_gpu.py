"""Pallas (Triton lowering) kernels of the chunk-parallel memory update, forward and backward.

One program per (batch row, head) walks the chunks in order and keeps the memory W and the
momentum S [Dk, Dv] in registers, so each chunk reads q, k, v and its gates once and writes y
once; the per-chunk math is xla.chunk_forward verbatim. With `save_states` the forward also
writes (W, S) at the start of every chunk, the residual of the backward kernel, which walks the
chunks in reverse carrying (dW, dS) and calls xla.chunk_backward.

Layout [B, T, H, D] as given (no transposes); gates [B, T, H] and token masks [B, T] are read
with strides. The caller pads T to a multiple of the chunk (api.memory_update).

`BlockSizes.block_v` splits the value columns over programs, grid (B, H, Dv / block_v): the
memory is separable in them (column j of W and S sees only column j of v and of the
gradient), so each program runs the same chunk math on its columns and the forward is exact.
The backward's dq, dk and gate gradients are sums over the columns: each program writes its
block's share, [Dv / block_v, ...], and they are summed after the call. At small B x H (16
programs at B 2, H 8 on 132 SMs) this multiplies the programs at no extra state work (q, k and
the chunk's [C, C] products are recomputed per block).

The chunk loops come in three forms, `BlockSizes.forward` / `.backward` (LOOPS), same math:
- "fused": one loop computes everything, y (forward) or every gradient (backward), per chunk.
- "split": the forward's loop makes the states alone (`_states_kernel`, 3 of the forward's 7
  matmuls a chunk), then y of every chunk comes at once (xla.forward_given_states); the
  backward's loop carries only the state cotangents (`_dstate_kernel`, 8 of its 20 matmuls a
  chunk, saving the pair each chunk sees), then the per-token gradients of every chunk come at
  once (xla.backward_given_cotangents), which has no sequential dependency left.
- "hoisted": "split" with what its loop steps compute without the carry moved before the loop,
  vectorized over all chunks in XLA (xla.hoisted_inputs): the gate algebra (two C x C exps and
  the C x C x C product Db @ De a chunk) as per-token coefficients, and for the backward
  P = -((q k^T) * A)^T dy [B, Tp, H, Dv] f32, sliced by value block like dy. The loops then
  read those instead of the raw gates, and skip what the carry does not need (forward: q and
  the gates; backward: v and the saved states), which shortens each of the N sequential steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.memory_chunk import xla


# block_v=0 halves the value block until the grid has this many programs. H200, B 2, H 8,
# D 128, chunk 16, T 16k, fwd+bwd: 16 programs 76.8 ms, 32: 43.2, 64: 24.9, 128: 32.5
# (docs/benchmarks.md): half the 132 SMs beats all of them, whose blocks of 16 columns make
# the matmuls too thin.
TARGET_PROGRAMS = 64
LOOPS = ("fused", "split", "hoisted")  # BlockSizes.forward / .backward


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Triton launch parameters (the chunk is part of the math, not a tile: api's chunk_size).

  num_warps: None picks 8 for chunks >= 64 and 4 below (H100, D=64: C=64 runs 1.6x faster
  forward and 1.3x faster backward with 8 warps than with 4; docs/benchmarks.md).
  block_v: value columns per program (a power of two >= 16 dividing Dv); 0: halved from Dv
  while the grid has fewer than TARGET_PROGRAMS programs; None: all of Dv, one program per
  (row, head).
  forward: "fused" computes y inside the chunk loop; "split" runs the loop for the states
  alone (3 of the forward's 7 matmuls a chunk), then y of all chunks at once
  (xla.forward_given_states). "split" applies to the forward that saves the states for a
  backward; a forward without a backward (inference, decoding's prefill) runs fused, its
  faster form alone (H200, B 2, H 8, D 128, chunk 16, T 16k, block_v 32: 3.26 ms against
  4.90; docs/benchmarks.md).
  backward: "fused" walks the chunks in reverse computing every gradient in the loop;
  "split" walks them carrying only the state cotangents (saving the pair each chunk sees,
  like the forward's states), then computes the per-token gradients of all chunks at once
  (xla.backward_given_cotangents): the loop keeps 8 of the backward's 20 matmuls a chunk.
  "hoisted" (forward and backward; like "split", for the training forward only) is "split"
  whose loop reads the state-independent terms precomputed for all chunks (xla.hoisted_inputs)
  instead of recomputing them at every step: the forward's loop keeps its 3 matmuls a chunk
  but none of the gate algebra (two C x C exps and the C x C x C Db @ De), the backward's 5 of
  "split"'s 8 (not yet measured on a GPU).
  """

  num_warps: int | None = None
  # 2 stages pipeline the chunk loop's loads: H200, B 2, H 8, D 128, chunk 16, T 16k, split
  # loops, block_v 32, 4 warps: fwd+bwd 10.96 ms against 13.11 with 1 stage (3: 11.10;
  # docs/benchmarks.md).
  num_stages: int = 2
  block_v: int | None = None
  forward: str = "fused"
  backward: str = "fused"

  def warps(self, chunk: int) -> int:
    return self.num_warps or (8 if chunk >= 64 else 4)

  def value_blocks(self, dv: int, programs: int = 1) -> int:
    """Programs per (row, head), Dv / block_v, for a grid of `programs` (row, head) pairs."""
    if self.block_v is None:
      return 1
    block = self.block_v
    if block == 0:
      block = dv
      while block > 16 and block % 2 == 0 and programs * dv // block < TARGET_PROGRAMS:
        block //= 2
    if dv % block:
      raise ValueError(f"BlockSizes.block_v={self.block_v} must divide Dv={dv}")
    return dv // block

  def __post_init__(self):
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"BlockSizes.num_warps={self.num_warps} must be a power of two <= 16")
    for field in ("forward", "backward"):
      if getattr(self, field) not in LOOPS:
        raise ValueError(f"BlockSizes.{field}={getattr(self, field)!r} must be one of {LOOPS}")
    if self.block_v and (self.block_v < 16 or self.block_v & (self.block_v - 1)):
      raise ValueError(f"BlockSizes.block_v={self.block_v} must be a power of two >= 16 "
                       "(Triton's dots), 0 (chosen from the grid) or None (all of Dv)")


def _load_chunk(refs, start, chunk):
  """Slices chunk [start, start + C) out of the 9 per-token refs."""
  return [r[pl.ds(start, chunk)] if r.ndim == 1 else r[pl.ds(start, chunk), :] for r in refs]


def _walk(tokens, init_refs, final_refs, chunk: int, step, reverse: bool = False):
  """The chunk loop every kernel runs: carries a pair of [Dk, Dv] f32 matrices from
  init_refs over the chunks (in reverse for the backward) and writes the last pair to
  final_refs. step(start, rows, a, b) -> (a, b) gets the chunk's first token and its rows
  of the [N*Dk, Dv] per-chunk outputs."""
  dk = init_refs[0].shape[0]
  num_chunks = tokens[0].shape[0] // chunk

  def body(i, pair):
    c = num_chunks - 1 - i if reverse else i
    return step(pl.multiple_of(c * chunk, chunk), pl.ds(c * dk, dk), *pair)

  pair = jax.lax.fori_loop(0, num_chunks, body,
                           tuple(r[...].astype(jnp.float32) for r in init_refs))
  for ref, x in zip(final_refs, pair):
    ref[...] = x


def _forward_kernel(*refs, chunk: int, dtype, save_states: bool):
  """9 token refs (q, k [Tp, Dk]; v [Tp, Dv]; theta, lb, le, seg, carry, end [Tp]); w0, s0
  [Dk, Dv]; outputs y [Tp, Dv], w_T, s_T [Dk, Dv] and, with save_states, [N*Dk, Dv] each."""
  tokens, init, outs = refs[:9], refs[9:11], refs[11:]
  y_ref = outs[0]

  def step(start, rows, w, s):
    if save_states:
      outs[3][rows, :] = w
      outs[4][rows, :] = s
    y, w, s = xla.chunk_forward(*_load_chunk(tokens, start, chunk), w, s, dtype=dtype)
    y_ref[pl.ds(start, chunk), :] = y.astype(y_ref.dtype)
    return w, s

  _walk(tokens, init, outs[1:3], chunk, step)


def _states_kernel(*refs, chunk: int, dtype, hoisted: bool):
  """The split forward's chunk loop: 9 token refs or, hoisted, 8 (k [Tp, Dk], v [Tp, Dv], carry
  and xla.FORWARD_COEFFICIENTS [Tp]); w0, s0 [Dk, Dv]; outputs w_T, s_T [Dk, Dv] and the states
  at every chunk start [N*Dk, Dv] each (no y)."""
  n = 8 if hoisted else 9
  tokens, init, (w_out, s_out, w_states, s_states) = refs[:n], refs[n:n + 2], refs[n + 2:]

  def step(start, rows, w, s):
    w_states[rows, :] = w
    s_states[rows, :] = s
    x = _load_chunk(tokens, start, chunk)
    if hoisted:
      return xla.chunk_state_forward_hoisted(*x[:3], x[3:], w, s, dtype=dtype)
    return xla.chunk_state_forward(*x, w, s, dtype=dtype)

  _walk(tokens, init, (w_out, s_out), chunk, step)


def _backward_kernel(*refs, chunk: int, dtype):
  """9 token refs; saved states w, s [N*Dk, Dv]; dy [Tp, Dv]; dw_T, ds_T [Dk, Dv]; outputs dq,
  dk [Tp, Dk], dv [Tp, Dv], dtheta, dlb, dle [Tp], dw0, ds0 [Dk, Dv]."""
  tokens = refs[:9]
  w_states, s_states, dy_ref = refs[9:12]
  dq_ref, dk_ref, dv_ref, dth_ref, dlb_ref, dle_ref = refs[14:20]

  def step(start, rows, dw, ds):
    dq, dk, dv, dth, dlb, dle, dw, ds = xla.chunk_backward(
        *_load_chunk(tokens, start, chunk), w_states[rows, :], s_states[rows, :],
        dy_ref[pl.ds(start, chunk), :], dw, ds, dtype=dtype)
    for ref, val in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
      ref[pl.ds(start, chunk), :] = val.astype(ref.dtype)
    for ref, val in ((dth_ref, dth), (dlb_ref, dlb), (dle_ref, dle)):
      ref[pl.ds(start, chunk)] = val
    return dw, ds

  _walk(tokens, refs[12:14], refs[20:22], chunk, step, reverse=True)


def _dstate_kernel(*refs, chunk: int, dtype, hoisted: bool):
  """The split backward's chunk loop: 9 token refs, the saved states w, s [N*Dk, Dv] and dy
  [Tp, Dv] or, hoisted, q, k [Tp, Dk], carry [Tp], dy, P [Tp, Dv] and xla.STATE_COEFFICIENTS
  [Tp] (12 refs either way); dw_T, ds_T [Dk, Dv]; outputs the cotangents (dw', ds') entering
  each chunk [N*Dk, Dv] and dw0, ds0 [Dk, Dv]."""
  ins, init, (dw_seen, ds_seen), final = refs[:12], refs[12:14], refs[14:16], refs[16:18]

  def step(start, rows, dw, ds):
    dw_seen[rows, :] = dw
    ds_seen[rows, :] = ds
    if hoisted:
      q, k, carry, dy, p, *co = _load_chunk(ins, start, chunk)
      return xla.chunk_state_backward_hoisted(q, k, carry, p, co, dy, dw, ds, dtype=dtype)
    w_states, s_states, dy_ref = ins[9:]
    return xla.chunk_state_backward(*_load_chunk(ins[:9], start, chunk), w_states[rows, :],
                                    s_states[rows, :], dy_ref[pl.ds(start, chunk), :], dw, ds,
                                    dtype=dtype)

  _walk(ins, init, final, chunk, step, reverse=True)


class _Specs:
  """BlockSpecs over grid (B, H) or, with nv = Dv / block_v > 1 value blocks, (B, H, nv)."""

  def __init__(self, padded: int, dv: int, nv: int):
    self.padded, self.bv, self.split = padded, dv // nv, nv > 1
    self.grid_tail = (nv,) if self.split else ()

  def _spec(self, shape, index):
    # index(bi, hi, vi) -> block indices; vi is 0 on the (B, H) grid.
    if self.split:
      return pl.BlockSpec(shape, lambda bi, hi, vi: index(bi, hi, vi))
    return pl.BlockSpec(shape, lambda bi, hi: index(bi, hi, 0))

  def tok(self, d):  # q, k [B, Tp, H, Dk], whole in every value block
    return self._spec((pl.squeezed, self.padded, pl.squeezed, d), lambda b, h, v: (b, 0, h, 0))

  def col(self):  # v, y, dy, dv [B, Tp, H, Dv]: the block's columns
    return self._spec((pl.squeezed, self.padded, pl.squeezed, self.bv),
                      lambda b, h, v: (b, 0, h, v))

  def gate(self):  # [B, Tp, H]
    return self._spec((pl.squeezed, self.padded, pl.squeezed), lambda b, h, v: (b, 0, h))

  def mask(self):  # [B, Tp]
    return self._spec((pl.squeezed, self.padded), lambda b, h, v: (b, 0))

  def state(self, rows):  # [B, H, rows, Dv]: the block's columns
    return self._spec((pl.squeezed, pl.squeezed, rows, self.bv), lambda b, h, v: (b, h, 0, v))

  def share(self, spec):  # a sum over the columns: one [nv, ...] slot per value block
    if not self.split:
      return spec
    shape = (pl.squeezed,) + tuple(spec.block_shape)
    return pl.BlockSpec(shape, lambda bi, hi, vi: (vi,) + spec.index_map(bi, hi, vi))


def forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0, *, chunk: int, dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            save_states: bool = True):
  """Same contract as xla.forward (states come back as [B, H, N*Dk, Dv] pairs)."""
  run = _Launch(q, v, chunk, dtype, block_sizes, interpret)
  dk, n = run.dk, run.n
  tokens = (q, k, v, theta, lb, le, seg.astype(jnp.int32), carry, end)
  loops = block_sizes.forward
  if loops in ("split", "hoisted") and save_states:  # the states in the loop, then y
    if loops == "hoisted":  # the gate algebra of every chunk first (XLA), then a lighter loop
      co = xla.hoisted_inputs(*tokens, chunk=chunk)[:len(xla.FORWARD_COEFFICIENTS)]
      in_specs, args = run.hoisted_forward_inputs(), (k, v, carry, *co, w0, s0)
    else:
      in_specs, args = run.forward_inputs(), (*tokens, w0, s0)
    w, s, w_states, s_states = run(
        functools.partial(_states_kernel, hoisted=loops == "hoisted"),
        "memory_chunk_states" + ("_hoisted" if loops == "hoisted" else ""), in_specs,
        [(dk, "state"), (dk, "state"), (n * dk, "state"), (n * dk, "state")], *args)
    y = xla.forward_given_states(*tokens, (run.per_chunk(w_states), run.per_chunk(s_states)),
                                 chunk=chunk, dtype=dtype)
    return y, w, s, (w_states, s_states)
  outs = [(None, "col"), (dk, "state"), (dk, "state")]
  if save_states:
    outs += [(n * dk, "state")] * 2
  outs = run(functools.partial(_forward_kernel, save_states=save_states), "memory_chunk_fwd",
             run.forward_inputs(), outs, *tokens, w0, s0)
  y, w, s = outs[:3]
  return y, w, s, (tuple(outs[3:]) if save_states else None)


def backward(q, k, v, theta, lb, le, seg, carry, end, states, dy, dw_t, ds_t, *, chunk: int,
             dtype, block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward."""
  run = _Launch(q, v, chunk, dtype, block_sizes, interpret)
  dk, n, f32 = run.dk, run.n, jnp.float32
  tokens = (q, k, v, theta, lb, le, seg.astype(jnp.int32), carry, end)
  dy = dy.astype(f32)
  inputs = (*tokens, *states, dy, dw_t.astype(f32), ds_t.astype(f32))
  loops = block_sizes.backward
  if loops in ("split", "hoisted"):
    # The state cotangents in a chunk loop (separable in the value columns like the forward,
    # so the same value blocks, and no shares: it writes only states), then every chunk's
    # per-token gradients at once (xla).
    if loops == "hoisted":  # the loop's state-independent terms of every chunk first (XLA)
      *co, p = xla.hoisted_inputs(*tokens, dy, chunk=chunk, dtype=dtype)
      in_specs, args = run.hoisted_backward_inputs(), (q, k, carry, dy, p, *co, *inputs[-2:])
    else:
      in_specs, args = run.backward_inputs(), inputs
    dw_seen, ds_seen, dw0, ds0 = run(
        functools.partial(_dstate_kernel, hoisted=loops == "hoisted"),
        "memory_chunk_dstate" + ("_hoisted" if loops == "hoisted" else ""), in_specs,
        [(n * dk, "state"), (n * dk, "state"), (dk, "state"), (dk, "state")], *args)
    grads = xla.backward_given_cotangents(
        *tokens, tuple(run.per_chunk(x) for x in states),
        (run.per_chunk(dw_seen), run.per_chunk(ds_seen)), dy, chunk=chunk, dtype=dtype)
    return (*grads, dw0, ds0)
  dq, dk_, dv_, dth, dlb, dle, dw0, ds0 = run(
      _backward_kernel, "memory_chunk_bwd", run.backward_inputs(),
      [(dk, "share tok"), (dk, "share tok"), (None, "col"), (None, "share gate"),
       (None, "share gate"), (None, "share gate"), (dk, "state"), (dk, "state")], *inputs)
  if run.nv > 1:  # each value block's share of the sums over the columns
    dq, dk_, dth, dlb, dle = (jnp.sum(x, axis=0) for x in (dq, dk_, dth, dlb, dle))
  return dq, dk_, dv_, dth, dlb, dle, dw0, ds0


class _Launch:
  """One call's grid (B, H[, Dv / block_v]), its BlockSpecs and the pallas_call of a kernel."""

  def __init__(self, q, v, chunk, dtype, block_sizes, interpret):
    self.b, self.padded, self.h, self.dk = q.shape
    self.dv = v.shape[-1]
    self.n = self.padded // chunk
    self.nv = block_sizes.value_blocks(self.dv, self.b * self.h)
    self.sp = _Specs(self.padded, self.dv, self.nv)
    self.chunk, self.dtype, self.block_sizes, self.interpret = chunk, dtype, block_sizes, interpret

  def per_chunk(self, x):  # [B, H, N*Dk, Dv] -> [B, H, N, Dk, Dv]
    return x.reshape(self.b, self.h, self.n, self.dk, self.dv)

  def forward_inputs(self):
    """9 token refs and the initial states."""
    sp = self.sp
    gate, mask = sp.gate(), sp.mask()
    return [sp.tok(self.dk), sp.tok(self.dk), sp.col(), gate, gate, gate, mask, mask, mask,
            sp.state(self.dk), sp.state(self.dk)]

  def hoisted_forward_inputs(self):
    """k, v, carry, the xla.FORWARD_COEFFICIENTS and the initial states."""
    sp = self.sp
    return ([sp.tok(self.dk), sp.col(), sp.mask()] + [sp.gate()] * len(xla.FORWARD_COEFFICIENTS)
            + [sp.state(self.dk)] * 2)

  def hoisted_backward_inputs(self):
    """q, k, carry, dy, P (the block's columns of both), the xla.STATE_COEFFICIENTS and the
    final states' cotangents."""
    sp = self.sp
    return ([sp.tok(self.dk)] * 2 + [sp.mask(), sp.col(), sp.col()]
            + [sp.gate()] * len(xla.STATE_COEFFICIENTS) + [sp.state(self.dk)] * 2)

  def backward_inputs(self):
    """9 token refs, the saved states, dy and the final states' cotangents."""
    sp, dk, n = self.sp, self.dk, self.n
    return self.forward_inputs()[:9] + [sp.state(n * dk), sp.state(n * dk), sp.col(),
                                        sp.state(dk), sp.state(dk)]

  def _out(self, rows, kind):
    """(spec, f32 shape) of an output: "col" [B, Tp, H, Dv], "state" [B, H, rows, Dv],
    "share tok" [nv?, B, Tp, H, Dk] and "share gate" [nv?, B, Tp, H] (one slot per value
    block of a sum over the columns)."""
    sp, b, h, tp = self.sp, self.b, self.h, self.padded
    lead = (self.nv,) if self.nv > 1 else ()
    spec, shape = {
        "col": (sp.col(), (b, tp, h, self.dv)),
        "state": (sp.state(rows), (b, h, rows, self.dv)),
        "share tok": (sp.share(sp.tok(rows)), lead + (b, tp, h, rows)),
        "share gate": (sp.share(sp.gate()), lead + (b, tp, h)),
    }[kind]
    return spec, jax.ShapeDtypeStruct(shape, jnp.float32)

  def __call__(self, kernel, name, in_specs, outs, *args):
    specs, shapes = zip(*(self._out(rows, kind) for rows, kind in outs))
    return pl.pallas_call(
        functools.partial(kernel, chunk=self.chunk, dtype=self.dtype),
        grid=(self.b, self.h) + self.sp.grid_tail,
        in_specs=in_specs,
        out_specs=list(specs),
        out_shape=list(shapes),
        compiler_params=plgpu.CompilerParams(num_warps=self.block_sizes.warps(self.chunk),
                                             num_stages=self.block_sizes.num_stages),
        interpret=self.interpret,
        name=name,
    )(*args)
