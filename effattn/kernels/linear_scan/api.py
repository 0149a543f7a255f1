"""Public linear-scan op: argument checks, path choice, bidirectional composition, custom VJP.

    o, final_state = linear_scan(q, k, v, log_decay, causal=True, initial_state=None,
                                 segment_ids=None, scale=1.0, impl="auto")

computes o_t = scale * sum_{s <= t} exp(g_h (t - s)) (q_t . k_s) v_s (+ the initial-state term;
bidirectional: sum over all s with exp(g_h |t - s|)); reference.py has the exact definition.

Paths (FAMILY, in the order "auto" tries them; the rules are kernels/dispatch.py's):
"pallas_gpu" (Triton; on the GPU, Dk and Dv powers of two >= 16), "pallas_tpu" (Mosaic),
"xla" (chunked jnp), "reference" (O(T^2) jnp, autodiff); "pallas" = the kernel of the current
backend. The choice is logged once per distinct reason.

Gradients (all paths but reference) come from one custom VJP. The causal scan and the reverse
scan are each other's transpose, so the backward of one direction is three calls of the same
kernel in the other direction (derivation in docs/mechanisms_linear.md):

  dq          = scan_same(q=do, k=v,  v=k,  S0=S0^T)
  dk          = scan_flip(q=v,  k=do, v=q,  S0=dS_T^T)
  dv, dS0     = scan_flip(q=k,  k=q,  v=do, S0=dS_T)

log_decay gets its gradient from the ones above (as fla's simple_gla does): with G_t the
cumulative log gate of token t (q_t enters as q_t e^{G_t}, k_s as k_s e^{-G_s}) and G_F the one
of the final state,

  dg = sum_t (dG_t/dg) (q_t . dq_t - k_t . dk_t) + (dG_F/dg) <dS_T, S_T>

(`_decay_grad`; derivation and the counts dG/dg per direction and segment in
docs/mechanisms_linear.md). A mechanism with fixed decays stops the gradient itself (lightning).
The bidirectional form is causal + reverse - diagonal (two scans).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_derivatives

from effattn.kernels import checks, dispatch, mesh
from effattn.kernels.linear_scan import pallas_gpu, pallas_tpu, reference, xla

_GPU_DTYPES = tuple(np.dtype(t) for t in (jnp.bfloat16, jnp.float16, jnp.float32))
FAMILY = dispatch.Family("linear_scan", (
    # Triton's dots need tiles of >= 16 (the interpreter has no such limit).
    dispatch.Path("pallas_gpu", platform="gpu", device_limits=(
        dispatch.power_of_two("Dk", 16), dispatch.power_of_two("Dv", 16),
        dispatch.one_of("dtype", _GPU_DTYPES))),
    dispatch.Path("pallas_tpu", platform="tpu"),
    dispatch.Path("xla"),
    dispatch.Path("reference"),
))


def _choose(impl: str, q, v, interpret: bool) -> dispatch.Choice:
  return FAMILY.choose(impl, interpret=interpret, Dk=q.shape[-1], Dv=v.shape[-1],
                       dtype=np.dtype(q.dtype))


def decode_impl(impl: str, length: int) -> str:
  """The impl for `length` new tokens of a decode step: one token needs no kernel (a chunk of
  one is the recurrence), so it takes xla; prompts keep `impl`."""
  if impl == "reference" or length > 1:
    return impl
  return "xla"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static settings of one scan (hashable: a nondiff argument of the custom VJP)."""

  path: str
  scale: float
  out_dtype: Any
  chunk_size: int | None
  block_sizes: Any
  interpret: bool


def _run(plan: _Plan, reverse: bool, q, k, v, g, s0, runs):
  """One direction on the planned path, no custom VJP: (o, final_state)."""
  kw = dict(reverse=reverse, scale=plan.scale, out_dtype=plan.out_dtype)
  if plan.path == "xla":
    return xla.scan_chunked(q, k, v, g, s0, runs, chunk_size=plan.chunk_size or 64, **kw)
  module = pallas_gpu if plan.path == "pallas_gpu" else pallas_tpu
  sizes = plan.block_sizes or module.BlockSizes()
  if plan.chunk_size is not None:
    sizes = dataclasses.replace(sizes, chunk=plan.chunk_size)
  return module.scan(q, k, v, g, s0, runs, block_sizes=sizes, interpret=plan.interpret, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(plan: _Plan, reverse: bool, q, k, v, g, s0, runs):
  return _run(plan, reverse, q, k, v, g, s0, runs)


def _scan_fwd(plan, reverse, q, k, v, g, s0, runs):
  # symbolic_zeros: the arguments come as CustomVJPPrimal (value, perturbed). The backward
  # takes the decay's gradient only where g is differentiated (a learned decay): the final
  # state is kept for it, and dq, dk are produced in f32 (bf16 rounding of them spoils dg,
  # which cancels across tokens).
  learned = g.perturbed
  q, k, v, g, s0, runs = custom_derivatives.custom_vjp_primal_tree_values((q, k, v, g, s0, runs))
  o, final = _run(plan, reverse, q, k, v, g, s0, runs)
  return (o, final), (q, k, v, g, s0, runs, final if learned else None)


def _gate_steps(runs, length: int, reverse: bool):
  """How many decay steps each cumulative log gate holds: (dG_t/dg [B or 1, T], dG_F/dg
  [B or 1]) float32, for the tokens and the final state of one scan direction.

  causal: G_t = g (t - start of t's run + 1) and G_F = G_{T-1}; reverse: G_t = g (end of t's
  run - t) and G_F = g (end of the first run + 1). runs: [B, T] run ids or None (one run).
  """
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  if runs is None:
    steps = length - 1 - idx if reverse else idx + 1
  elif reverse:
    last = jnp.concatenate([runs[:, 1:] != runs[:, :-1], jnp.ones_like(runs[:, :1], bool)], 1)
    steps = jax.lax.cummin(jnp.where(last, idx, length - 1), axis=1, reverse=True) - idx
  else:
    first = jnp.concatenate([jnp.ones_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], 1)
    steps = idx - jax.lax.cummax(jnp.where(first, idx, 0), axis=1) + 1
  final_steps = steps[:, 0] + 1 if reverse else steps[:, -1]
  return steps.astype(jnp.float32), final_steps.astype(jnp.float32)


def _decay_grad(reverse, q, k, dq, dk, final, d_final, runs):
  """dL/dg [H] from dq, dk and the final state (module docstring): q_t enters every term as
  q_t e^{G_t} and k_s as k_s e^{-G_s}, the final state as e^{G_F} times a sum of those."""
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  per_token = jnp.sum(f32(q) * f32(dq), -1) - jnp.sum(f32(k) * f32(dk), -1)  # [B, T, H]
  steps, final_steps = _gate_steps(runs, q.shape[1], reverse)
  per_final = jnp.sum(f32(d_final) * final, (-2, -1))                        # [B, H]
  return (jnp.sum(steps[..., None] * per_token, (0, 1))
          + jnp.sum(final_steps[:, None] * per_final, 0))


def _dense(cotangent):
  """A cotangent as an array (symbolic_zeros passes an unused output's as a SymbolicZero)."""
  if isinstance(cotangent, custom_derivatives.SymbolicZero):
    return jnp.zeros(cotangent.shape, cotangent.dtype)
  return cotangent


def _scan_bwd(plan, reverse, residuals, cotangents):
  q, k, v, g, s0, runs, final = residuals
  do, d_final = map(_dense, cotangents)
  learned = final is not None
  # The output scale moves onto do; the final state never saw it.
  do = (do.astype(jnp.float32) * plan.scale).astype(q.dtype)
  plan = dataclasses.replace(plan, scale=1.0, out_dtype=None)
  qk_plan = dataclasses.replace(plan, out_dtype=np.dtype(np.float32)) if learned else plan
  swap = lambda s: jnp.swapaxes(s, -1, -2)
  dq, _ = _run(qk_plan, reverse, do, v, k, g, swap(s0), runs)
  dk, _ = _run(qk_plan, not reverse, v, do, q, g, swap(d_final), runs)
  dv, ds0 = _run(plan, not reverse, k, q, do, g, d_final, runs)
  dg = (_decay_grad(reverse, q, k, dq, dk, final, d_final, runs) if learned
        else jnp.zeros_like(g))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0, None


_scan.defvjp(_scan_fwd, _scan_bwd, symbolic_zeros=True)
# q, k, v, g, s0, runs -> o, final state.
_LAYOUTS = (("BTHD", "BTHD", "BTHD", "H", "BHKV", "BT"), ("BTHD", "BHKV"))


def _scan_on_mesh(plan: _Plan, reverse: bool, *args):
  """_scan per shard of the ambient mesh (kernels/mesh.py)."""
  kernel = functools.partial(_scan, plan, reverse)
  return mesh.on_mesh("linear_scan", plan.path, kernel, *_LAYOUTS)(*args)


def _check(q, k, v, log_decay, initial_state, segment_ids, causal):
  checks.qkv(q, k, v)
  h = q.shape[2]
  if log_decay is not None and log_decay.shape != (h,):
    raise ValueError(f"log_decay must be [H]={h,}; got {log_decay.shape}")
  if initial_state is not None and not causal:
    raise ValueError("initial_state needs causal=True (the bidirectional form carries no state)")
  checks.state("initial_state", initial_state, q, v)
  checks.segments(segment_ids, q)


def linear_scan(q, k, v, log_decay=None, *, causal: bool = True, initial_state=None,
                segment_ids=None, scale: float = 1.0, impl: str = "auto",
                chunk_size: int | None = None, block_sizes=None, out_dtype=None,
                interpret: bool = False):
  """Decayed linear attention, causal or bidirectional, with state in and out.

  Args:
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; one dtype (bf16/f16/f32). Accumulation is f32.
    log_decay: [H] per-head log-decay g_h <= 0 (None: no decay). Differentiable (a learned
      decay trains); pass it through jax.lax.stop_gradient to keep it fixed.
    causal: True for o_t over s <= t; False for all s with exp(g |t - s|).
    initial_state: [B, H, Dk, Dv] state S0 carried in (causal only), e.g. from a prompt.
    segment_ids: [B, T] packed sequences: tokens see only their own run of equal ids; the state
      restarts at each new run.
    scale: multiplies the output (e.g. Dk ** -0.5).
    impl: "auto" | "pallas" | a path of FAMILY (kernels/dispatch.py has the rules).
    chunk_size: tokens per chunk (default 64 on GPU and xla, 128 on TPU).
    block_sizes: pallas_gpu.BlockSizes / pallas_tpu.BlockSizes for the kernel paths.
    out_dtype: dtype of o (default q.dtype).
    interpret: run Pallas kernels in the interpreter (CPU tests).

  Returns:
    (o [B, T, H, Dv], final_state [B, H, Dk, Dv] float32). Bidirectional: the causal final state.
  """
  _check(q, k, v, log_decay, initial_state, segment_ids, causal)
  return _linear_scan(_choose(impl, q, v, interpret), q, k, v, log_decay, causal=causal,
                      initial_state=initial_state, segment_ids=segment_ids, scale=scale,
                      chunk_size=chunk_size, block_sizes=block_sizes, out_dtype=out_dtype)


def _linear_scan(choice: dispatch.Choice, q, k, v, log_decay, *, causal, initial_state,
                 segment_ids, scale, chunk_size, block_sizes, out_dtype):
  """linear_scan on a chosen path (arguments already checked)."""
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  path = choice.path
  out_dtype = np.dtype(out_dtype or q.dtype)
  g = jnp.zeros((h,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  if path == "reference":
    f32 = lambda x: x.astype(jnp.float32)  # so out_dtype=f32 keeps full precision
    o, final = reference.scan_quadratic(f32(q), f32(k), f32(v), g, causal=causal,
                                        initial_state=initial_state, segment_ids=segment_ids,
                                        scale=scale)
    return o.astype(out_dtype), final
  runs = None if segment_ids is None else reference.segment_runs(segment_ids)
  zeros = jnp.zeros((b, h, dk, dv), jnp.float32)
  s0 = zeros if initial_state is None else initial_state.astype(jnp.float32)
  plan = _Plan(path, float(scale), out_dtype, chunk_size, block_sizes, choice.interpret)
  if causal:
    return _scan_on_mesh(plan, False, q, k, v, g, s0, runs)
  # Bidirectional = causal + reverse - the diagonal both of them counted; summed in f32.
  plan32 = dataclasses.replace(plan, out_dtype=np.dtype(np.float32))
  forward, final = _scan_on_mesh(plan32, False, q, k, v, g, zeros, runs)
  backward, _ = _scan_on_mesh(plan32, True, q, k, v, g, zeros, runs)

  diagonal = scale * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), -1, keepdims=True)
  o = forward + backward - diagonal * v.astype(jnp.float32)
  return o.astype(out_dtype), final


def linear_scan_normalizer(q, k, log_decay=None, *, causal: bool = True, initial_state=None,
                           segment_ids=None, scale: float = 1.0, impl: str = "auto",
                           chunk_size: int | None = None, interpret: bool = False):
  """The linear-attention denominator n_t = scale * sum_s decay(t, s) (q_t . k_s), same kernel.

  It is linear_scan with an all-ones value column (16 wide on the kernel paths, whose tiles need
  it; 1 wide elsewhere), so decays, segments, state and gradients all come for free.

  Args:
    q, k: [B, T, H, Dk]. initial_state: [B, H, Dk] decayed key sum carried in (causal only).
    Other arguments as in linear_scan.

  Returns:
    (n [B, T, H] float32, final key sum [B, H, Dk] float32).
  """
  choice = _choose(impl, q, q, interpret)
  width = 16 if choice.path.startswith("pallas") else 1
  ones = jnp.ones(q.shape[:3] + (width,), q.dtype)
  s0 = None
  if initial_state is not None:
    s0 = jnp.broadcast_to(initial_state.astype(jnp.float32)[..., None],
                          initial_state.shape + (width,))
  _check(q, k, ones, log_decay, s0, segment_ids, causal)
  n, final = _linear_scan(choice, q, k, ones, log_decay, causal=causal, initial_state=s0,
                          segment_ids=segment_ids, scale=scale, chunk_size=chunk_size,
                          block_sizes=None, out_dtype=jnp.float32)
  return n[..., 0], final[..., 0]
