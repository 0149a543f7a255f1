"""Public gated-delta-rule op: argument checks, path choice, custom VJP, and the decode step.

    o, final_state = delta_rule(q, k, v, log_gate, beta, initial_state=None, segment_ids=None,
                                scale=None, impl="auto", chunk_size=64)

computes S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale q_t S_t with
a_t = exp(log_gate_t) (reference.py has the exact definition; the state is [Dk, Dv]).

Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
"pallas_gpu" (Triton; chunk_size a multiple of 16, and on the GPU Dk, Dv powers of two >= 16,
Dk <= 128, chunk_size <= 64, and every array its kernels index at most 2**31 elements: the
per-chunk states [B, H, N*Dk, Dv] first: at B 8, H 16, D 128, T <= 64k), "pallas_tpu" (Mosaic;
on the TPU chunk_size a multiple of 8), "xla" (the chunked form in jnp, xla.py), "reference"
(the token recurrence, autodiff); "pallas" = the kernel of the current backend. Logged once
per choice.

The xla and Pallas paths share one custom VJP and one structure (xla.py): per-chunk work in
parallel, then a walk over the chunks that carries only the state, then per-chunk work again;
the backward mirrors it with a reverse walk for the state's cotangent. The forward saves
T = (I + A)^{-1} of every chunk and the state entering every chunk (derivation in
docs/mechanisms_linear.md). Gradients reach q, k, v, log_gate, beta and the initial state.

`delta_rule_step` is the one-token update for decoding (O(1) state, no kernel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels import checks, dispatch, mesh
from effattn.kernels.delta_rule import common, pallas_gpu, pallas_tpu, reference, xla

DEFAULT_CHUNK = 64
_GPU_DTYPES = tuple(np.dtype(t) for t in (jnp.bfloat16, jnp.float16, jnp.float32))
_REGISTERS = "larger tiles do not fit the kernels' registers"
FAMILY = dispatch.Family("delta_rule", (
    # The inverse works on 16-row blocks (Triton's smallest dot), in the interpreter too.
    dispatch.Path("pallas_gpu", platform="gpu", limits=(dispatch.multiple_of("chunk_size", 16),),
                  device_limits=(
                      dispatch.power_of_two("Dk", 16), dispatch.power_of_two("Dv", 16),
                      dispatch.at_most("Dk", 128, _REGISTERS),
                      dispatch.power_of_two("chunk_size", 16),
                      dispatch.at_most("chunk_size", 64, _REGISTERS),
                      dispatch.one_of("dtype", _GPU_DTYPES),
                      # int32 offsets: no array the kernels index may pass 2**31 elements.
                      dispatch.Limit(("B", "T", "H", "Dk", "Dv", "chunk_size"),
                                     pallas_gpu.int32_offsets))),
    dispatch.Path("pallas_tpu", platform="tpu",
                  device_limits=(dispatch.multiple_of("chunk_size", 8),)),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))
_MODULES = {"xla": xla, "pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static settings of one call (hashable: a nondiff argument of the custom VJP)."""

  path: str
  chunk: int
  scale: float
  dtype: Any          # matmul operand dtype (f32 -> full precision)
  out_dtype: Any
  block_sizes: Any
  interpret: bool

  def kwargs(self):
    kw = dict(chunk=self.chunk, scale=self.scale, dtype=self.dtype)
    if self.path != "xla":
      kw.update(block_sizes=self.block_sizes, interpret=self.interpret)
    return kw


def _forward(plan: _Plan, x: common.Chunked, s0):
  extra = {} if plan.path == "xla" else {"out_dtype": plan.out_dtype}
  o, final, residuals = _MODULES[plan.path].forward(x, s0, **plan.kwargs(), **extra)
  return o.astype(plan.out_dtype), final, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(plan, q, k, v, beta, gcum, runs, carry, tail, s0):
  o, final, _ = _forward(plan, common.Chunked(q, k, v, beta, gcum, runs, carry, tail), s0)
  return o, final


def _delta_fwd(plan, q, k, v, beta, gcum, runs, carry, tail, s0):
  x = common.Chunked(q, k, v, beta, gcum, runs, carry, tail)
  o, final, residuals = _forward(plan, x, s0)
  return (o, final), (x, residuals)


def _delta_bwd(plan, saved, cotangents):
  x, residuals = saved
  do, dfinal = cotangents
  dq, dk, dv, dbeta, dgcum, ds0 = _MODULES[plan.path].backward(x, residuals, do, dfinal,
                                                               **plan.kwargs())
  return (dq.astype(x.q.dtype), dk.astype(x.k.dtype), dv.astype(x.v.dtype), dbeta, dgcum,
          None, None, None, ds0)


_delta.defvjp(_delta_fwd, _delta_bwd)


# Jitted so that eager calls (tests, decoding a prompt) compile once: the op per padded shape
# (every T up to a chunk shares one program), the padding per T.
_prepare = jax.jit(common.prepare, static_argnames="chunk")
_delta_jit = jax.jit(_delta, static_argnums=0)
_recurrent = jax.jit(reference.recurrent, static_argnames="scale")
_step = jax.jit(reference.step, static_argnames="scale")
# q, k, v, beta, gcum, runs, carry, tail (None without segments), s0 -> o, final state.
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "BTH", "BTH", "BT", "BT", "BT", "BHKV"), ("BTHD", "BHKV"))



def _check(q, k, v, log_gate, beta, initial_state, segment_ids, chunk_size):
  checks.qkv(q, k, v)
  checks.per_token("log_gate", log_gate, q)
  checks.per_token("beta", beta, q)
  checks.state("initial_state", initial_state, q, v)
  checks.segments(segment_ids, q)
  checks.chunk_size(chunk_size)


def delta_rule(q, k, v, log_gate, beta, *, initial_state=None, segment_ids=None,
               scale: float | None = None, impl: str = "auto", chunk_size: int | None = None,
               block_sizes=None, out_dtype=None, interpret: bool = False):
  """The gated delta rule over a whole sequence, with state in and out.

  Args:
    q, k: [B, T, H, Dk] queries and keys (Gated DeltaNet L2-normalizes them); v: [B, T, H, Dv];
      one dtype (bf16/f16/f32); matmuls run in it with f32 accumulation.
    log_gate: [B, T, H] log of the decay a_t, <= 0 (0: no decay).
    beta: [B, T, H] write strength b_t in (0, 1).
    initial_state: [B, H, Dk, Dv] state S0 carried in (e.g. from a prompt); None: zeros.
    segment_ids: [B, T] packed sequences: the state restarts at zero at each new run of equal
      ids (the initial state belongs to the first run, the final state is the last run's).
    scale: multiplies q (default Dk ** -0.5).
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    chunk_size: tokens per chunk C (default 64).
    block_sizes: pallas_gpu.BlockSizes / pallas_tpu.BlockSizes for the kernel paths.
    out_dtype: dtype of o (default q.dtype).
    interpret: run Pallas kernels in the interpreter (CPU tests).

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32).
  """
  chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
  _check(q, k, v, log_gate, beta, initial_state, segment_ids, chunk)
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else float(scale)
  out_dtype = np.dtype(out_dtype or q.dtype)
  path, interpret = FAMILY.choose(impl, interpret=interpret, Dk=dk, Dv=dv, chunk_size=chunk,
                                  dtype=np.dtype(q.dtype), B=b, T=q.shape[1], H=h)
  if path == "reference":
    o, final = _recurrent(q, k, v, log_gate, beta, initial_state=initial_state,
                          segment_ids=segment_ids, scale=scale)
    return o.astype(out_dtype), final
  s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  if block_sizes is None and path != "xla":
    block_sizes = _MODULES[path].BlockSizes()
  plan = _Plan(path, chunk, scale, np.dtype(q.dtype), out_dtype, block_sizes, interpret)
  kernel = mesh.on_mesh("delta_rule", path, functools.partial(_delta_jit, plan), *_LAYOUTS)
  o, final = kernel(*_prepare(q, k, v, log_gate, beta, segment_ids, chunk=chunk), s0)
  return o[:, :q.shape[1]], final


def delta_rule_step(q, k, v, log_gate, beta, state, *, scale: float | None = None):
  """One decoding step of the gated delta rule (O(1) state, plain jnp).

  Args:
    q, k: [B, H, Dk]; v: [B, H, Dv]; log_gate, beta: [B, H]; state: [B, H, Dk, Dv].
    scale: multiplies q (default Dk ** -0.5).

  Returns:
    (o [B, H, Dv] in q.dtype, new state [B, H, Dk, Dv] float32).
  """
  if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
    raise ValueError(f"q, k must be [B, H, Dk] and v [B, H, Dv]; got {q.shape=} {k.shape=} "
                     f"{v.shape=}")
  for name, x in (("log_gate", log_gate), ("beta", beta)):
    if x.shape != q.shape[:2]:
      raise ValueError(f"{name} must be [B, H]={q.shape[:2]}; got {x.shape}")
  want = q.shape + (v.shape[-1],)
  if state.shape != want:
    raise ValueError(f"state must be [B, H, Dk, Dv]={want}; got {state.shape}")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  o, state = _step(state.astype(jnp.float32), q, k, v, log_gate, beta, scale=scale)
  return o.astype(q.dtype), state
