"""Public op: the chunk-parallel update of the linear (depth-1) Titans memory.

    y, (w_T, s_T) = memory_update(q, k, v, theta, alpha, eta, initial_memory=None,
                                  initial_momentum=None, segment_ids=None, chunk_size=64,
                                  impl="auto")

Per token (reference.py has the exact definition): S_t = eta_t S_{t-1} - theta_t grad_t,
W_t = (1 - alpha_t) W_{t-1} + S_t, y_t = q_t W_t, with grad_t = 2 k_t^T (k_t W_ref - v_t) taken
at the chunk's starting weights W_ref (mini-batch gradient descent inside each chunk of
`chunk_size` tokens; chunk_size=1 is the paper's token recurrence).

Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
"pallas_gpu" (Triton; on the GPU, Dk, Dv and chunk_size powers of two in [16, 128]),
"pallas_tpu" (Mosaic; on the TPU, chunk_size a multiple of 8), "xla" (chunked closed form in jnp,
xla.py), "reference" (reference.chunk_loop, autodiff); "pallas" = the kernel of the current
backend. Logged once per choice. The deep (MLP) memory, `deep_memory_update`, has no kernel:
the dispatcher sends it to deep.py's chunk-parallel jnp form (xla and reference alike).
The xla and Pallas paths share one custom VJP whose backward walks the chunks in reverse
(xla.chunk_backward); the chunk-start states saved by the forward are its only residual besides
the inputs. Gradients flow to q, k, v, all three gates and both initial states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import checks, context_parallel, dispatch, mesh, paths
from effattn.kernels.memory_chunk import common, deep, pallas_gpu, pallas_tpu, reference, xla
from effattn.kernels.memory_chunk import context_parallel as chunk_maps

_LINEAR = dispatch.Limit(("depth",), lambda depth: "" if depth == 1 else
                         f"depth={depth}: the kernels hold the linear (depth-1) memory only")
_REGISTERS = "larger head dims do not fit the kernel's registers"
FAMILY = dispatch.Family("memory_chunk", (
    dispatch.Path("pallas_gpu", platform="gpu", limits=(_LINEAR,), device_limits=(
        dispatch.power_of_two("Dk", 16), dispatch.power_of_two("Dv", 16),
        dispatch.power_of_two("chunk_size", 16), dispatch.at_most("Dk", 128, _REGISTERS),
        dispatch.at_most("Dv", 128, _REGISTERS))),
    dispatch.Path("pallas_tpu", platform="tpu", limits=(_LINEAR,),
                  device_limits=(dispatch.multiple_of("chunk_size", 8),)),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static settings of one call (hashable: a nondiff argument of the custom VJP)."""

  path: str
  chunk: int
  dtype: Any          # matmul operand dtype (f32 -> full precision)
  block_sizes: Any
  interpret: bool


def _module(plan):
  return {"xla": xla, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}[plan.path]


def _kernel_kwargs(plan):
  kw = dict(chunk=plan.chunk, dtype=plan.dtype)
  if plan.path != "xla":
    kw.update(block_sizes=plan.block_sizes, interpret=plan.interpret)
  return kw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _update(plan, q, k, v, theta, lb, le, seg, carry, end, w0, s0):
  y, w, s, _ = _module(plan).forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0,
                                     save_states=False, **_kernel_kwargs(plan))
  return y, w, s


def _update_fwd(plan, q, k, v, theta, lb, le, seg, carry, end, w0, s0):
  y, w, s, states = _module(plan).forward(q, k, v, theta, lb, le, seg, carry, end, w0, s0,
                                          save_states=True, **_kernel_kwargs(plan))
  return (y, w, s), (q, k, v, theta, lb, le, seg, carry, end, states)


def _update_bwd(plan, residuals, cotangents):
  q, k, v, theta, lb, le, seg, carry, end, states = residuals
  dy, dw, ds = cotangents
  dq, dk, dv, dth, dlb, dle, dw0, ds0 = _module(plan).backward(
      q, k, v, theta, lb, le, seg, carry, end, states, dy, dw, ds, **_kernel_kwargs(plan))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dth, dlb, dle,
          None, None, None, dw0, ds0)


_update.defvjp(_update_fwd, _update_bwd)
# Jitted so eager calls (tests, decoding) compile the chunk loop once per shape, not per call.
_update_jit = jax.jit(_update, static_argnums=0)
_chunk_loop_jit = jax.jit(reference.chunk_loop, static_argnames="chunk_size")
# q, k, v, theta, lb, le, seg, carry, end, w0, s0 -> y, w, s.
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "BTH", "BTH", "BTH", "BT", "BT", "BT", "BHKV", "BHKV"),
            ("BTHD", "BHKV", "BHKV"))



def _check(q, k, v, theta, alpha, eta, w0, s0, segment_ids, chunk_size):
  checks.qkv(q, k, v, one_dtype=False)
  for name, gate in (("theta", theta), ("alpha", alpha), ("eta", eta)):
    checks.per_token(name, gate, q)
  checks.state("initial_memory", w0, q, v)
  checks.state("initial_momentum", s0, q, v)
  checks.segments(segment_ids, q)
  checks.chunk_size(chunk_size)


def memory_update(q, k, v, theta, alpha, eta, *, initial_memory=None, initial_momentum=None,
                  segment_ids=None, chunk_size: int = 64, impl: str = "auto", block_sizes=None,
                  block_v: int | None = None, forward: str | None = None,
                  backward: str | None = None, remat_chunks: int | None = None,
                  compute_dtype=None, out_dtype=None, interpret: bool = False):
  """Chunk-parallel test-time training of a linear memory, with retrieval at every token.

  Args:
    q, k: [B, T, H, Dk] queries and keys (the paper L2-normalizes them); v: [B, T, H, Dv].
    theta, alpha, eta: [B, T, H] learning rate, forgetting and momentum gates in (0, 1).
    initial_memory, initial_momentum: [B, H, Dk, Dv] W_0 and S_0 (None: zeros).
    segment_ids: [B, T] packed sequences; a new id restarts the memory at zero.
    chunk_size: tokens per mini-batch C (the GPU kernel needs a power of two >= 16).
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    block_sizes: pallas_gpu.BlockSizes / pallas_tpu.BlockSizes for the kernel paths.
    block_v: the Triton kernel's value columns per program (pallas_gpu.BlockSizes.block_v;
      0: chosen from the grid) when block_sizes is None. A launch setting, not math: the
      other paths have no such split and run as they are.
    forward, backward: the Triton kernel's chunk loops (pallas_gpu.BlockSizes.forward and
      .backward: "fused", the default, "split" or "hoisted") when block_sizes is None; launch
      settings like block_v.
    remat_chunks: chunks per rematerialized piece (None: one piece). The backward of the xla
      and Pallas paths keeps the memory at the start of every chunk, 2 Dk Dv f32 per chunk,
      row and head (8.6 GB for 4 layers at B 2, T 16k, H 8, D 128, chunk 16). With
      remat_chunks the op runs as consecutive calls of that many chunks, each under
      jax.checkpoint: the backward keeps the states at the pieces' starts and recomputes one
      piece's chunk states at a time (one more forward pass). Exact: pieces cut at chunk
      boundaries chain through (W, S) as one call does.
    compute_dtype: matmul operand dtype (default q.dtype; float32 runs at full precision).
    out_dtype: dtype of y (default q.dtype). interpret: Pallas interpreter (CPU tests).

  Returns:
    (y [B, T, H, Dv], (W_T, S_T) [B, H, Dk, Dv] float32).
  """
  _check(q, k, v, theta, alpha, eta, initial_memory, initial_momentum, segment_ids, chunk_size)
  if remat_chunks is not None and (not isinstance(remat_chunks, int) or remat_chunks < 1):
    raise ValueError(f"memory_update: {remat_chunks=} must be a whole number >= 1, or None")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  out_dtype = np.dtype(out_dtype or q.dtype)
  n = context_parallel.sequence_size()
  if n > 1:  # T split over mesh.sequence: a cross-device scan of the chunks' affine maps
    paths.log_path_once("memory_chunk", "chunk maps", f"mesh.sequence={n}, {impl} per device")

    def update(q, k, v, theta, alpha, eta, w0, s0, seg):
      return memory_update(q, k, v, theta, alpha, eta, initial_memory=w0, initial_momentum=s0,
                           segment_ids=seg, chunk_size=chunk_size, impl=impl,
                           block_sizes=block_sizes, block_v=block_v, forward=forward,
                           backward=backward, remat_chunks=remat_chunks,
                           compute_dtype=compute_dtype, out_dtype=out_dtype,
                           interpret=interpret)
    return chunk_maps.memory_update(update, q, k, v, theta, alpha, eta,
                                    initial_memory=initial_memory,
                                    initial_momentum=initial_momentum, segment_ids=segment_ids,
                                    chunk_size=chunk_size, out_dtype=out_dtype)
  path, interpret = FAMILY.choose(impl, interpret=interpret, Dk=dk, Dv=dv,
                                  chunk_size=chunk_size, depth=1)
  if path == "reference":
    y, state = _chunk_loop_jit(q, k, v, theta, alpha, eta, initial_memory, initial_momentum,
                               segment_ids, chunk_size=chunk_size)
    return y.astype(out_dtype), state
  c = chunk_size
  lb, le = common.log_gates(alpha, eta)
  theta, lb, le = (common.pad_time(x.astype(jnp.float32), c) for x in (theta, lb, le))
  n = lb.shape[1] // c
  # Chunk-local cumulative log-gates: the scan of the gate products inside each chunk.
  lb, le = (jnp.cumsum(x.reshape(b, n, c, h), axis=2).reshape(b, n * c, h) for x in (lb, le))
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  seg, carry, end = common.chunk_masks(seg, t, c)
  zeros = jnp.zeros((b, h, dk, dv), jnp.float32)
  w0 = zeros if initial_memory is None else initial_memory.astype(jnp.float32)
  s0 = zeros if initial_momentum is None else initial_momentum.astype(jnp.float32)
  q, k, v = (common.pad_time(x, c) for x in (q, k, v))
  launch = dict(block_v=block_v, forward=forward, backward=backward)
  if block_sizes is not None and any(x is not None for x in launch.values()):
    raise ValueError(f"memory_update: give block_sizes or {launch}, not both")
  if block_sizes is None and path == "pallas_gpu":
    block_sizes = pallas_gpu.BlockSizes(block_v=block_v, forward=forward or "fused",
                                        backward=backward or "fused")
  elif block_sizes is None and path != "xla":
    block_sizes = _module(_Plan(path, c, None, None, False)).BlockSizes()
  plan = _Plan(path, c, np.dtype(compute_dtype or q.dtype), block_sizes, interpret)
  kernel = mesh.on_mesh("memory_chunk", path, functools.partial(_update_jit, plan), *_LAYOUTS)
  tokens = (q, k, v, theta, lb, le, seg, carry, end)
  if remat_chunks is None or remat_chunks >= n:
    y, w, s = kernel(*tokens, w0, s0)
  else:
    y, w, s = _in_pieces(kernel, tokens, w0, s0, remat_chunks * c)
  return y[:, :t].astype(out_dtype), (w, s)


def _in_pieces(kernel, tokens, w, s, length: int):
  """kernel over consecutive pieces of `length` tokens (whole chunks), each rematerialized,
  chained through (W, S): a lax.scan over the whole pieces, whose backward loop recomputes one
  piece's chunk states at a time (a Python loop would let XLA schedule every recomputation
  first), then the shorter rest. The per-token masks were made for the whole sequence and a
  piece starts on a chunk boundary, so each chunk sees what it would in one call."""
  piece = jax.checkpoint(kernel)
  total = tokens[0].shape[1]
  whole = total // length
  ys = []
  if whole:
    def stack(x):  # [B, whole * length, ...] -> [whole, B, length, ...]
      x = x[:, :whole * length]
      return jnp.moveaxis(x.reshape(x.shape[0], whole, length, *x.shape[2:]), 1, 0)

    def body(state, xs):
      y, w_, s_ = piece(*xs, *state)
      return (w_, s_), y

    (w, s), y = jax.lax.scan(body, (w, s), tuple(stack(x) for x in tokens))
    ys.append(jnp.moveaxis(y, 0, 1).reshape(y.shape[1], whole * length, *y.shape[3:]))
  if total > whole * length:
    y, w, s = piece(*(x[:, whole * length:] for x in tokens), w, s)
    ys.append(y)
  return (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)), w, s


# Jitted so eager calls compile the chunk loop once per shape (inlined under an outer jit).
_deep_chunked = jax.jit(deep.chunked, static_argnames="chunk_size")


def deep_memory_update(params0, mom0, q, k, v, theta, alpha, eta, segment_ids=None,
                       reset_to=None, *, chunk_size: int, impl: str = "auto"):
  """The deep (MLP) memory's chunk-parallel update (deep.chunked): same gates and layout as
  memory_update, weights and momentum as tuples of [B, H, d_in, d_out] leaves.

  No kernel holds an MLP memory, so the dispatcher sends every impl to deep.py's jnp form:
  logged once under "auto", a one-line error for a forced Pallas path.

  Returns:
    (y [B, T, H, Dv] float32, (weights, momentum) after the last token).
  """
  checks.chunk_size(chunk_size)
  if context_parallel.sequence_size() > 1:
    raise ValueError(f"deep_memory_update context-parallel (mesh.sequence="
                     f"{context_parallel.sequence_size()}): the deep memory is not affine in its "
                     "weights, so its state cannot be passed across devices; set mesh.sequence=1")
  FAMILY.choose(impl, Dk=q.shape[-1], Dv=v.shape[-1], chunk_size=chunk_size, depth=len(params0))
  return _deep_chunked(params0, mom0, q, k, v, theta, alpha, eta, segment_ids, reset_to,
                       chunk_size=chunk_size)
