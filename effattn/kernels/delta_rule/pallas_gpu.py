"""Pallas (Triton lowering) kernels of the chunked gated delta rule, forward and backward.

Six kernels: four parallel over every chunk, two that walk the chunks of one (row, head,
block of bv value columns) with the [Dk, bv] state in registers, doing only what must be
sequential (xla.py's three passes):

  delta_rule_wy        grid (N, B, H)       T = (I + A)^{-1}, W, U of each chunk
  delta_rule_fwd       grid (Dv/bv, B, H)   chunks in order: Delta, each chunk's entering state
                                            and the final state
  delta_rule_out       grid (N, B, H)       o of each chunk
  delta_rule_bwd_prep  grid (N, B, H)       the within-chunk cotangent P^T dO (and W again,
                                            with keep_w=False)
  delta_rule_dstate    grid (Dv/bv, B, H)   chunks in reverse: dDelta and the cotangent of each
                                            chunk's final state
  delta_rule_bwd       grid (N, B, H)       every chunk's input gradients

BlockSizes(backward="split"), the default since a GPU check and timing (H200: fwd+bwd 2.4x
faster at T 8k), replaces the last by two kernels with smaller live sets (the fused one holds
the partial sums of dq, dk, dO Delta^T and X Delta^T across its loop over Dv, besides
the chunk's q, k, W, T and decays); the forward then also keeps Delta, so it is not recomputed:

  delta_rule_bwd_dqk   grid (Dk/bk, N, B, H) dq, and dk's and dgcum's shares from O and the
                                            leaving state, per block of bk key columns
  delta_rule_bwd_wy    grid (N, B, H)       dv, dbeta, the rest of dk (through T) and of dgcum

The parallel kernels walk Dv in blocks of bv columns. The per-chunk math is xla.py's, called
verbatim. The triangular inverse is blocked (fla's
solve_tril layout): A's 16 x 16 diagonal blocks are inverted by forward substitution, the
off-diagonal blocks of the inverse follow from T_ij = -T_ii sum_{j<=m<i} A_im T_mj, all on
16-row tiles loaded from refs (Triton has no slicing of register values).
BlockSizes(wy_form="dense") instead inverts the whole [C, C] tile by one forward substitution
(pallas_tpu's and xla.chunk_inverse's form). BlockSizes(wy_form="split") keeps the blocked
inverse but stores only T, and one more kernel forms W and U from it with two large dots
(fla's recompute_w_u_fwd_kernel):

  delta_rule_wu        grid (N, B, H)       W = T diag(b gq) K, U = T diag(b) V of each chunk

Layout [B, T, H, D] as given; gates [B, T, H] and masks [B, T] are read with strides. The
intermediates are stored in the compute dtype: T as [B, Tp, H, C] (row t holds its chunk's row
of T), W, U, Delta, dDelta like k and v, and the per-chunk states as [B, H, N*Dk, Dv]. The
forward keeps T and the states for the backward. The caller pads T to a multiple of the chunk
(common.prepare).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from effattn.kernels.delta_rule import xla
from effattn.kernels.delta_rule.common import Chunked
from effattn.kernels.memory_chunk.xla import dot

SUB = 16  # rows of the inverse's diagonal blocks (Triton's smallest dot)
BACKWARDS = ("fused", "split")
DK_PARTIALS = ("float32", "compute")
WALK_FORMS = ("scaled_keys", "scaled_values")
WY_FORMS = ("blocked", "dense", "split")
PARALLEL_KERNELS = ("out", "bwd_prep", "bwd_dqk", "bwd_wy")  # num_stages_parallel's kernels
LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x log2(e))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters (the chunk itself is api's chunk_size, a multiple of 16).

  block_v: Dv columns per program of the two walks, and per step of the parallel kernels'
    loops over Dv (Dv itself where it does not divide Dv).
  num_warps: Triton warps of the walks and of the output / backward-prep kernels.
  num_warps_wy / num_warps_bwd: of the inverse and of the backward's per-chunk kernel(s).
  num_warps_wu: of delta_rule_wu (wy_form="split" only).
  num_stages: pipelining of the walks' chunk loads.
  backward: "split" (default: the forward also keeps Delta; the per-chunk gradients in two
    kernels with smaller live sets: delta_rule_bwd_dqk over (Dk/block_k, N, B, H) and
    delta_rule_bwd_wy over (N, B, H)) or "fused" (one per-chunk gradient kernel,
    delta_rule_bwd). H200, B 8, H 16, D 128, bf16, T 8k, fwd+bwd:
    split 7.28 ms, fused 17.40 ms (num_warps_bwd 8, then the default), both checked on the
    GPU first (docs/benchmarks.md).
  block_k: Dk columns per program of delta_rule_bwd_dqk (Dk itself where it does not divide
    Dk); only the split backward uses it.

  Launch options checked and timed on an H200 (2026-12-04; the defaults since; B 8, H 16,
  D 128, T 32k, bf16, gated, split backward: fwd+bwd 26.08 ms against 29.2-29.7 ms with the
  earlier keep_w=False, dk_partial="float32", num_stages_parallel=None, num_warps_bwd=8;
  docs/benchmarks.md, docs/delta_rule_vs_fla.md section 9):
  keep_w: the forward keeps delta_rule_wy's W as a residual (+1 [B, T, H, Dk] tensor), so
    delta_rule_bwd_prep reads neither T nor beta and writes only P^T dO (False: it recomputes W
    from T and writes it). bwd_prep 2.18 -> 1.30 ms.
  dk_partial: dtype of dk_a, the share of dk delta_rule_bwd_dqk hands to delta_rule_bwd_wy
    (split backward): "compute" (the matmul dtype, e.g. bf16: half the bytes, one more
    rounding of that share, as fla's dk / dk2) or "float32". bwd_dqk and bwd_wy 0.33 ms each.
  num_stages_parallel: the stages of a real loop over value blocks in the parallel kernels
    out, bwd_prep, bwd_dqk, bwd_wy (each block's operands loaded inside it, the partial sums
    carried), so Triton can pipeline the loads; None unrolls it at 1 stage. The fused
    backward's kernel keeps its unrolled loop. With num_warps_bwd 4: bwd_wy 8.0 -> 6.0 ms
    (bwd_dqk alone is 0.3 ms slower pipelined).
  unrolled: names of PARALLEL_KERNELS that keep the unrolled loop at 1 stage although
    num_stages_parallel is set. Default ("bwd_dqk",): bwd_dqk ran 0.3 ms slower pipelined,
    1.016x its kernels unrolled in the second H200 sweep of 2026-12-04; () pipelines all four.
  walk_form: how each step of the two walks (delta_rule_fwd, delta_rule_dstate) applies the
    gates. "scaled_values" (default since the second H200 sweep of 2026-12-04: 1.024x the
    walks' time alone; with unrolled=("bwd_dqk",) fwd+bwd 25.28 ms at T 32k against 25.96 ms
    with both earlier settings, each run checked first): the [C, bv] side is scaled, forward
    K^T (omega Delta), reverse omega (K dS) and Q^T ((scale gq) dO), so k, q and W go from
    their loads into the dots (no [C, Dk] f32 multiply, truncate and transpose of a register
    value a step); G_last and the carry's last entry are scalar loads and the gates exp2 of
    log2(e)-scaled exponents. "scaled_keys" (the earlier form, a forced path): the [C, Dk]
    operands are scaled, forward (omega K)^T Delta, reverse (omega K) dS and (gq Q)^T
    (scale dO), with G_last (and the carry's last entry) a masked 64-wide reduction and the
    gates libdevice expf. The same math up to rounding (docs/delta_rule_vs_fla.md section 6
    item 5).

  wy_form: how delta_rule_wy builds T = (I + A)^{-1}, W and U. "blocked" (default): on 16-row
    blocks (at C 64: 10 [16, Dk] x [Dk, 16] dots for A, four 15-step forward substitutions on
    the diagonal blocks, the off-diagonal blocks of T from float32 [16, 16] dots, TF32 on the
    GPU, then 20 [16, 16] x [16, D] dots for W and U). "dense": the whole chunk at once
    (xla.chunk_inverse and xla.chunk_wy, as pallas_tpu): A from one [C, Dk] x [Dk, C] dot,
    one (C - 1)-step forward substitution on the [C, C] float32 tile (no float32 dot, so no
    TF32), W and U one [C, C] x [C, D] dot each in the compute dtype. The same math up to
    rounding (docs/delta_rule_vs_fla.md section 6 item 6); checked and timed on the H200,
    0.78x (delta_rule_wy 11.68 ms against 4.63 at T 32k), so a forced path only. "split": the
    blocked inverse, but delta_rule_wy reads only k and the gates and stores only T, and
    delta_rule_wu (num_warps_wu) reads T back with k, v and the gates and forms W and U as one
    [C, C] x [C, D] dot each (xla.chunk_wy, the dense form's math: the blocked form's 20
    [16, 16] x [16, D] dots become 2 with M = C; T and k are read once more). The blocked
    form's roundings (T and the right-hand sides in the compute dtype), so the two differ only
    in the order of the float32 sums (docs/delta_rule_vs_fla.md section 11); not yet timed.
  """

  block_v: int = 64
  num_warps: int = 4
  num_warps_wy: int = 2
  num_warps_bwd: int = 4
  num_stages: int = 2
  backward: str = "split"
  block_k: int = 64
  keep_w: bool = True
  dk_partial: str = "compute"
  num_stages_parallel: int | None = 2
  walk_form: str = "scaled_values"
  wy_form: str = "blocked"
  unrolled: tuple[str, ...] = ("bwd_dqk",)
  num_warps_wu: int = 4

  def __post_init__(self):
    if not isinstance(self.unrolled, tuple) or set(self.unrolled) - set(PARALLEL_KERNELS):
      raise ValueError(f"BlockSizes.unrolled={self.unrolled!r} must be a tuple of names in "
                       f"{PARALLEL_KERNELS}")
    for field in ("block_v", "block_k"):
      size = getattr(self, field)
      if size < 16 or size & (size - 1):
        raise ValueError(f"BlockSizes.{field}={size} must be a power of two >= 16")
    if self.backward not in BACKWARDS:
      raise ValueError(f"BlockSizes.backward={self.backward!r} must be one of {BACKWARDS}")
    for field in ("num_warps", "num_warps_wy", "num_warps_bwd", "num_warps_wu"):
      if getattr(self, field) not in (1, 2, 4, 8, 16):
        raise ValueError(f"BlockSizes.{field}={getattr(self, field)} must be a power of two "
                         "<= 16")
    if self.dk_partial not in DK_PARTIALS:
      raise ValueError(f"BlockSizes.dk_partial={self.dk_partial!r} must be one of {DK_PARTIALS}")
    if self.num_stages_parallel is not None and not (
        isinstance(self.num_stages_parallel, int) and self.num_stages_parallel >= 1):
      raise ValueError(f"BlockSizes.num_stages_parallel={self.num_stages_parallel!r} must be "
                       "None or an int >= 1")
    if self.walk_form not in WALK_FORMS:
      raise ValueError(f"BlockSizes.walk_form={self.walk_form!r} must be one of {WALK_FORMS}")
    if self.wy_form not in WY_FORMS:
      raise ValueError(f"BlockSizes.wy_form={self.wy_form!r} must be one of {WY_FORMS}")

  def value_block(self, dv: int) -> int:
    return self.block_v if dv % self.block_v == 0 else dv

  def key_block(self, dk: int) -> int:
    return self.block_k if dk % self.block_k == 0 else dk

  def pipelined(self, kernel: str) -> bool:
    """Whether parallel kernel `kernel` (of PARALLEL_KERNELS) loops over value blocks as a
    real, pipelined loop."""
    return self.num_stages_parallel is not None and kernel not in self.unrolled

  def parallel_stages(self, kernel: str) -> int:
    return self.num_stages_parallel if self.pipelined(kernel) else 1


# The Triton kernels' offsets are int32 (tt.addptr with i32 tensors): an array of up to 2**31
# elements has its last index, 2**31 - 1, in range.
INT32_ELEMENTS = 2 ** 31


def largest_array(b: int, t: int, h: int, dk: int, dv: int, chunk: int) -> tuple[str, int]:
  """(which, elements) of the largest array the kernels index at these sizes (T padded to the
  chunk): the per-chunk states [B, H, N*Dk, Dv] (and their cotangents), or a [B, Tp, H, D]
  token array (q, k, v, W, U, Delta, T's [B, Tp, H, C]); the block-k shares of dgcum
  [Dk/bk, B, Tp, H] are smaller than k."""
  padded = -(-t // chunk) * chunk
  sizes = {"the per-chunk states [B, H, N*Dk, Dv]": b * h * (padded // chunk) * dk * dv,
           "a token array [B, Tp, H, max(Dk, Dv, C)]": b * padded * h * max(dk, dv, chunk)}
  which = max(sizes, key=sizes.get)
  return which, sizes[which]


def int32_offsets(B: int, T: int, H: int, Dk: int, Dv: int, chunk_size: int) -> str:  # noqa: N803
  """"" when every array the kernels index has at most 2**31 elements (int32 indices), else why
  not and the fix (a dispatch limit of the pallas_gpu path)."""
  which, elements = largest_array(B, T, H, Dk, Dv, chunk_size)
  if elements <= INT32_ELEMENTS:
    return ""
  return (f"{which} would hold {elements} elements > 2**31 at B={B} T={T} H={H} Dk={Dk} "
          f"Dv={Dv} chunk_size={chunk_size} (the Triton kernels' offsets are int32); split the "
          "batch or the sequence (carrying initial_state across calls), or use impl='xla'")


def block_inverse(a: dict, nb: int) -> dict:
  """(I + A)^{-1} from the blocks a[(i, j)], i >= j, of a strictly lower-triangular A (nb x nb
  blocks): the inverse's blocks for i >= j (the rest are zero)."""
  inv = {(i, i): xla.forward_substitution(a[(i, i)]) for i in range(nb)}
  for d in range(1, nb):  # by distance from the diagonal: each needs only nearer blocks
    for i in range(d, nb):
      j = i - d
      acc = functools.reduce(jnp.add, [dot(a[(i, m)], inv[(m, j)]) for m in range(j, i)])
      inv[(i, j)] = -dot(inv[(i, i)], acc)
  return inv


def _wy_gq(g, carry):
  """gq = e^G carry [C]: the entering state's decay at each token (W's row scale with beta)."""
  return jnp.exp(g) if carry is None else jnp.exp(g) * carry


def _blocked_inverse(k_ref, beta_ref, g_ref, runs_ref, carry_ref, *, chunk: int, dtype):
  """wy_form "blocked" and "split": T = (I + A)^{-1} of one chunk on 16-row blocks (k_ref
  [C, Dk]; beta_ref, g_ref, runs_ref, carry_ref [C], the masks None without segments). Returns
  (rows, the 16-row blocks of k, beta, gcum and carry, the inverse's blocks {(i, j): [16, 16]
  float32} for i >= j)."""
  nb = chunk // SUB
  rows = [pl.ds(i * SUB, SUB) for i in range(nb)]
  load = lambda ref: [None if ref is None else ref[r] for r in rows]  # noqa: E731
  ks, betas, gs, runs, carry = (load(r) for r in (k_ref, beta_ref, g_ref, runs_ref, carry_ref))
  a = {(i, j): xla.wy_block(ks[i], ks[j], betas[i], gs[i], gs[j], runs[i], runs[j],
                            diagonal=i == j, dtype=dtype)
       for i in range(nb) for j in range(i + 1)}
  return rows, ks, betas, gs, carry, block_inverse(a, nb)


def _wy_kernel(k_ref, v_ref, beta_ref, g_ref, *refs, chunk: int, dtype, has_runs: bool,
               dense: bool = False):
  """One chunk: k_ref [C, Dk]; v_ref [C, Dv]; beta_ref, g_ref [C]; runs_ref, carry_ref [C];
  outputs tinv_ref [C, C], w_ref [C, Dk], u_ref [C, Dv]. dense (BlockSizes.wy_form): the whole
  chunk at once, _wy_dense_kernel."""
  if dense:
    return _wy_dense_kernel(k_ref, v_ref, beta_ref, g_ref, *refs, dtype=dtype,
                            has_runs=has_runs)
  (runs_ref, carry_ref), (tinv_ref, w_ref, u_ref) = (refs[:2], refs[2:]) if has_runs else (
      (None, None), refs)
  nb = chunk // SUB
  rows, ks, betas, gs, carry, inv = _blocked_inverse(k_ref, beta_ref, g_ref, runs_ref, carry_ref,
                                                     chunk=chunk, dtype=dtype)
  zeros = jnp.zeros((SUB, SUB), jnp.float32)
  kb, vb = [], []
  for i in range(nb):
    gq = _wy_gq(gs[i], carry[i])
    kb.append((ks[i] * (betas[i] * gq)[:, None]).astype(dtype))
    vb.append((v_ref[rows[i], :] * betas[i][:, None]).astype(dtype))
  for i in range(nb):
    for j in range(nb):
      tinv_ref[rows[i], rows[j]] = inv.get((i, j), zeros).astype(tinv_ref.dtype)
    # W and U one 16-row block at a time: row block i sums over column blocks j <= i.
    w_ref[rows[i], :] = sum(dot(inv[(i, j)], kb[j], dtype=dtype)
                            for j in range(i + 1)).astype(w_ref.dtype)
    u_ref[rows[i], :] = sum(dot(inv[(i, j)], vb[j], dtype=dtype)
                            for j in range(i + 1)).astype(u_ref.dtype)


def _wy_dense_kernel(k_ref, v_ref, beta_ref, g_ref, *refs, dtype, has_runs: bool):
  """wy_form="dense", one chunk (refs as _wy_kernel's): A = tril(diag(b) (K K^T * D), -1) from
  one [C, Dk] x [Dk, C] dot (xla.wy_block over the whole chunk, diagonal: the causal strict
  mask and the runs mask the blocked form applies block by block), T by forward substitution
  on the whole [C, C] float32 tile (no float32 dots), W and U one [C, C] x [C, D] dot each with
  T and the right-hand sides in `dtype` (the blocked form's roundings)."""
  (runs_ref, carry_ref), (tinv_ref, w_ref, u_ref) = _masks(refs, 2, has_runs)
  runs, carry = (None if r is None else r[...] for r in (runs_ref, carry_ref))
  k, beta, g = k_ref[...], beta_ref[...], g_ref[...]
  tinv = xla.chunk_inverse(k, beta, g, runs, dtype=dtype)
  tinv_ref[...] = tinv.astype(tinv_ref.dtype)
  _store_wu(tinv, k, v_ref[...], beta, g, carry, w_ref, u_ref, dtype=dtype)


def _store_wu(tinv, k, v, beta, g, carry, w_ref, u_ref, *, dtype):
  """W = T diag(b gq) K and U = T diag(b) V of one chunk (xla.chunk_wy: one [C, C] x [C, D] dot
  each, T and the right-hand sides in `dtype`, float32 sums) into w_ref [C, Dk], u_ref [C, Dv]."""
  w, u = xla.chunk_wy(tinv, k, v, beta, _wy_gq(g, carry), dtype=dtype)
  w_ref[...], u_ref[...] = w.astype(w_ref.dtype), u.astype(u_ref.dtype)


def _tinv_kernel(k_ref, beta_ref, g_ref, *refs, chunk: int, dtype, has_runs: bool):
  """wy_form="split"'s delta_rule_wy, one chunk: k_ref [C, Dk]; beta_ref, g_ref [C]; runs_ref
  [C]; output tinv_ref [C, C] only (the blocked inverse, stored as the blocked form stores it;
  W and U follow in delta_rule_wu)."""
  (runs_ref,), (tinv_ref,) = _masks(refs, 1, has_runs)
  nb = chunk // SUB
  rows, *_, inv = _blocked_inverse(k_ref, beta_ref, g_ref, runs_ref, None, chunk=chunk,
                                   dtype=dtype)
  zeros = jnp.zeros((SUB, SUB), jnp.float32)
  for i in range(nb):
    for j in range(nb):
      tinv_ref[rows[i], rows[j]] = inv.get((i, j), zeros).astype(tinv_ref.dtype)


def _wu_kernel(tinv_ref, k_ref, v_ref, beta_ref, g_ref, *refs, dtype, has_runs: bool):
  """wy_form="split"'s delta_rule_wu, one chunk: tinv_ref [C, C] (delta_rule_wy's T, in
  `dtype`); k_ref [C, Dk]; v_ref [C, Dv]; beta_ref, g_ref, carry_ref [C]; outputs w_ref
  [C, Dk], u_ref [C, Dv]: two [C, C] x [C, D] dots instead of the blocked form's 16-row ones
  (T already holds the runs mask, so only carry is read, for gq)."""
  (carry_ref,), (w_ref, u_ref) = _masks(refs, 1, has_runs)
  carry = None if carry_ref is None else carry_ref[...]
  _store_wu(tinv_ref[...], k_ref[...], v_ref[...], beta_ref[...], g_ref[...], carry, w_ref,
            u_ref, dtype=dtype)


def _chunk_refs(refs, start, chunk):
  """The chunk [start, start + C) of token refs (2-d: rows; 1-d: entries; None stays None)."""
  out = []
  for r in refs:
    if r is None:
      out.append(None)
    else:
      out.append(r[pl.ds(start, chunk), :] if len(r.shape) == 2 else r[pl.ds(start, chunk)])
  return out


def _masks(refs, count: int, has_runs: bool):
  """(the first `count` refs as masks, or Nones; the remaining refs)."""
  return (list(refs[:count]), refs[count:]) if has_runs else ([None] * count, refs)


def _walk_gates(g_ref, carry_ref, tail_ref, start, chunk: int, with_gq: bool):
  """walk_form="scaled_values"'s (gq or None [C], omega [C], keep []) of the chunk
  [start, start + C): xla.state_gates with G_last and the carry's last entry read by scalar
  loads (no masked reduction) and e^x as 2^(x log2(e))."""
  g = g_ref[pl.ds(start, chunk)]
  last = start + chunk - 1
  g_last = g_ref[last]
  omega, keep = jnp.exp2((g_last - g) * LOG2E), jnp.exp2(g_last * LOG2E)
  gq = jnp.exp2(g * LOG2E) if with_gq else None
  if carry_ref is None:
    return gq, omega, keep
  gq = None if gq is None else gq * carry_ref[pl.ds(start, chunk)]
  return gq, omega * tail_ref[pl.ds(start, chunk)], keep * carry_ref[last]


def _fwd_kernel(k_ref, w_ref, u_ref, g_ref, s0_ref, *refs, chunk: int, dtype, has_runs: bool,
                scaled_values: bool = False):
  """Walk: k_ref, w_ref [Tp, Dk]; u_ref [Tp, bv]; g_ref [Tp]; s0_ref [Dk, bv]; carry, tail
  [Tp]; outputs delta_ref [Tp, bv], sT_ref [Dk, bv], states_ref [N*Dk, bv]. scaled_values
  (BlockSizes.walk_form): the state update K^T (omega Delta) for (omega K)^T Delta."""
  (carry_ref, tail_ref), (delta_ref, sT_ref, states_ref) = _masks(refs, 2, has_runs)
  dk = k_ref.shape[1]

  def body(c, state):
    start = pl.multiple_of(c * chunk, chunk)
    if scaled_values:
      k, w, u = _chunk_refs((k_ref, w_ref, u_ref), start, chunk)
      states_ref[pl.ds(c * dk, dk), :] = state.astype(states_ref.dtype)
      _, omega, keep = _walk_gates(g_ref, carry_ref, tail_ref, start, chunk, with_gq=False)
      delta = u - dot(w, state, dtype=dtype)
      state = keep * state + dot(k, omega[:, None] * delta, trans_a=True, dtype=dtype)
      delta_ref[pl.ds(start, chunk), :] = delta.astype(delta_ref.dtype)
      return state
    k, w, u, g, carry, tail = _chunk_refs((k_ref, w_ref, u_ref, g_ref, carry_ref, tail_ref),
                                          start, chunk)
    states_ref[pl.ds(c * dk, dk), :] = state.astype(states_ref.dtype)
    _, omega, keep = xla.state_gates(g, carry, tail)
    delta, state = xla.walk_forward(k, omega, keep, w, u, state, dtype=dtype)
    delta_ref[pl.ds(start, chunk), :] = delta.astype(delta_ref.dtype)
    return state

  num_chunks = k_ref.shape[0] // chunk
  sT_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _value_blocks(num: int, block_v: int, body, init, pipelined: bool):
  """body(cols, acc) -> acc over the `num` blocks of block_v value columns: unrolled in Python
  (pipelined False: today's kernels), or as a real loop (lax.fori_loop, a loop Triton can
  pipeline; init then holds the carried partial sums, zeros)."""
  if not pipelined:
    acc = init
    for j in range(num):
      acc = body(pl.ds(j * block_v, block_v), acc)
    return acc
  return jax.lax.fori_loop(
      0, num, lambda j, acc: body(pl.ds(pl.multiple_of(j * block_v, block_v), block_v), acc),
      init)


def _zeros_of(fn, *shapes):
  """Zeros shaped like fn's outputs on float32 arguments of these shapes (a loop's carry)."""
  out = jax.eval_shape(fn, *(jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out)


def _scores(q_ref, k_ref, g_ref, masks, dtype):
  """(P = Q K^T * D, gq) of one chunk."""
  runs, carry, tail = (None if m is None else m[...] for m in masks)
  g = g_ref[...]
  gq, _, _ = xla.state_gates(g, carry, tail)
  decay = xla.block_decay(g, g, runs, runs, diagonal=True)
  return xla.scores(q_ref[...], k_ref[...], decay, dtype=dtype), gq


def _out_kernel(q_ref, k_ref, g_ref, delta_ref, s_ref, *refs, scale: float, block_v: int, dtype,
                has_runs: bool, pipelined: bool = False):
  """One chunk: q_ref, k_ref [C, Dk]; g_ref [C]; delta_ref [C, Dv]; s_ref [Dk, Dv]; masks [C];
  output o_ref [C, Dv]."""
  masks, (o_ref,) = _masks(refs, 3, has_runs)
  p, gq = _scores(q_ref, k_ref, g_ref, masks, dtype)
  q = q_ref[...]

  def block(cols, acc):
    o = xla.chunk_output(q, p, gq, delta_ref[:, cols], s_ref[:, cols].astype(jnp.float32),
                         dtype=dtype)
    o_ref[:, cols] = (scale * o).astype(o_ref.dtype)
    return acc

  _value_blocks(o_ref.shape[1] // block_v, block_v, block, None, pipelined)


def _dlocal_blocks(p, do_ref, dlocal_ref, *, scale, block_v, dtype, pipelined):
  def block(cols, acc):
    dlocal = xla.chunk_dlocal(p, scale * do_ref[:, cols].astype(jnp.float32), dtype=dtype)
    dlocal_ref[:, cols] = dlocal.astype(dlocal_ref.dtype)
    return acc

  _value_blocks(do_ref.shape[1] // block_v, block_v, block, None, pipelined)


def _prep_kernel(q_ref, k_ref, beta_ref, g_ref, tinv_ref, do_ref, *refs, scale: float,
                 block_v: int, dtype, has_runs: bool, pipelined: bool = False):
  """One chunk of the backward's parallel prologue: outputs w_ref [C, Dk] and dlocal_ref
  [C, Dv] = P^T (scale dO)."""
  masks, (w_ref, dlocal_ref) = _masks(refs, 3, has_runs)
  p, gq = _scores(q_ref, k_ref, g_ref, masks, dtype)
  w = xla.chunk_w(tinv_ref[...], k_ref[...], beta_ref[...], gq, dtype=dtype)
  w_ref[...] = w.astype(w_ref.dtype)
  _dlocal_blocks(p, do_ref, dlocal_ref, scale=scale, block_v=block_v, dtype=dtype,
                 pipelined=pipelined)


def _dlocal_kernel(q_ref, k_ref, g_ref, do_ref, *refs, scale: float, block_v: int, dtype,
                   has_runs: bool, pipelined: bool = False):
  """keep_w's backward prologue (W kept from the forward): one chunk's dlocal_ref [C, Dv] =
  P^T (scale dO) only."""
  masks, (dlocal_ref,) = _masks(refs, 3, has_runs)
  p, _ = _scores(q_ref, k_ref, g_ref, masks, dtype)
  _dlocal_blocks(p, do_ref, dlocal_ref, scale=scale, block_v=block_v, dtype=dtype,
                 pipelined=pipelined)


def _dstate_kernel(q_ref, k_ref, w_ref, g_ref, dlocal_ref, do_ref, dsT_ref, *refs, chunk: int,
                   scale: float, dtype, has_runs: bool, scaled_values: bool = False):
  """Reverse walk: q_ref, k_ref, w_ref [Tp, Dk]; g_ref [Tp]; dlocal_ref, do_ref [Tp, bv];
  dsT_ref [Dk, bv]; carry, tail [Tp]; outputs ddelta_ref [Tp, bv], ds0_ref [Dk, bv] and
  dstates_ref [N*Dk, bv] (the cotangent of the state leaving each chunk). scaled_values
  (BlockSizes.walk_form): omega (K dS) for (omega K) dS and Q^T ((scale gq) dO) for
  (gq Q)^T (scale dO)."""
  (carry_ref, tail_ref), (ddelta_ref, ds0_ref, dstates_ref) = _masks(refs, 2, has_runs)
  dk = q_ref.shape[1]
  num_chunks = q_ref.shape[0] // chunk

  def body(step, ds):
    c = num_chunks - 1 - step
    start = pl.multiple_of(c * chunk, chunk)
    if scaled_values:
      q, k, w, dlocal, do = _chunk_refs((q_ref, k_ref, w_ref, dlocal_ref, do_ref), start, chunk)
      dstates_ref[pl.ds(c * dk, dk), :] = ds.astype(dstates_ref.dtype)
      gq, omega, keep = _walk_gates(g_ref, carry_ref, tail_ref, start, chunk, with_gq=True)
      ddelta = dlocal.astype(jnp.float32) + omega[:, None] * dot(k, ds, dtype=dtype)
      do_in = (scale * gq)[:, None] * do.astype(jnp.float32)
      ds = (dot(q, do_in, trans_a=True, dtype=dtype) + keep * ds
            - dot(w, ddelta, trans_a=True, dtype=dtype))
      ddelta_ref[pl.ds(start, chunk), :] = ddelta.astype(ddelta_ref.dtype)
      return ds
    q, k, w, g, dlocal, do, carry, tail = _chunk_refs(
        (q_ref, k_ref, w_ref, g_ref, dlocal_ref, do_ref, carry_ref, tail_ref), start, chunk)
    dstates_ref[pl.ds(c * dk, dk), :] = ds.astype(dstates_ref.dtype)
    gq, omega, keep = xla.state_gates(g, carry, tail)
    ddelta, ds = xla.walk_backward(q, k, gq, omega, keep, w, dlocal.astype(jnp.float32),
                                   scale * do.astype(jnp.float32), ds, dtype=dtype)
    ddelta_ref[pl.ds(start, chunk), :] = ddelta.astype(ddelta_ref.dtype)
    return ds

  ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dsT_ref[...].astype(jnp.float32))


def _bwd_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, tinv_ref, w_ref, do_ref, s_ref, ds_ref,
                ddelta_ref, *refs, scale: float, block_v: int, dtype, has_runs: bool):
  """One chunk: q_ref, k_ref, w_ref [C, Dk]; v_ref, do_ref, ddelta_ref [C, Dv]; beta_ref, g_ref
  [C]; tinv_ref [C, C]; s_ref, ds_ref [Dk, Dv]; masks [C]; outputs dq, dk [C, Dk], dv [C, Dv],
  dbeta, dg [C]."""
  masks, (dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref) = _masks(refs, 3, has_runs)
  runs, carry, tail = (None if m is None else m[...] for m in masks)
  ctx = xla.backward_setup(q_ref[...], k_ref[...], beta_ref[...], g_ref[...], tinv_ref[...],
                           w_ref[...], runs, carry, tail)
  acc = None
  for j in range(v_ref.shape[1] // block_v):  # Dv in blocks: the partial sums add up
    cols = pl.ds(j * block_v, block_v)
    dv, partial = xla.chunk_backward_block(
        ctx, v_ref[:, cols], scale * do_ref[:, cols].astype(jnp.float32),
        s_ref[:, cols].astype(jnp.float32), ds_ref[:, cols].astype(jnp.float32),
        ddelta_ref[:, cols].astype(jnp.float32), dtype=dtype)
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    acc = xla.accumulate(acc, partial)
  dq, dk, dbeta, dg = xla.chunk_backward_finish(ctx, acc, dtype=dtype)
  dq_ref[...], dk_ref[...] = dq.astype(dq_ref.dtype), dk.astype(dk_ref.dtype)
  dbeta_ref[...], dg_ref[...] = dbeta, dg


def _bwd_dqk_kernel(q_ref, k_ref, g_ref, delta_ref, do_ref, s_ref, ds_ref, *refs, scale: float,
                    block_v: int, dtype, has_runs: bool, pipelined: bool = False):
  """Split backward, scores half, one chunk and one block of bk key columns: q_ref, k_ref
  [C, bk]; g_ref [C]; delta_ref, do_ref [C, Dv]; s_ref, ds_ref [bk, Dv] (entering state, the
  leaving state's cotangent); masks [C]; outputs dq_ref [C, bk] (final), dka_ref [C, bk] and
  dga_ref [C] (this block's shares of dk and dgcum)."""
  masks, (dq_ref, dka_ref, dga_ref) = _masks(refs, 3, has_runs)
  runs, carry, tail = (None if m is None else m[...] for m in masks)
  g = g_ref[...]
  gq, omega, keep = xla.state_gates(g, carry, tail)
  decay = xla.block_decay(g, g, runs, runs, diagonal=True)

  def block(cols, acc):
    partial = xla.scores_backward_block(
        scale * do_ref[:, cols].astype(jnp.float32), delta_ref[:, cols].astype(jnp.float32),
        s_ref[:, cols].astype(jnp.float32), ds_ref[:, cols].astype(jnp.float32), dtype=dtype)
    return xla.accumulate(acc, partial)

  c, bk = q_ref.shape
  init = None if not pipelined else _zeros_of(
      functools.partial(xla.scores_backward_block, dtype=dtype), (c, block_v), (c, block_v),
      (bk, block_v), (bk, block_v))
  acc = _value_blocks(do_ref.shape[1] // block_v, block_v, block, init, pipelined)
  dq, dka, dga = xla.scores_backward_finish(q_ref[...], k_ref[...], gq, omega, keep, decay, acc,
                                            dtype=dtype)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dka_ref[...], dga_ref[...] = dka if dka_ref.dtype == dka.dtype else dka.astype(
      dka_ref.dtype), dga


def _bwd_wy_kernel(k_ref, v_ref, beta_ref, g_ref, tinv_ref, delta_ref, ddelta_ref, s_ref, dka_ref,
                   *refs, block_v: int, dtype, has_runs: bool, pipelined: bool = False):
  """Split backward, WY half, one chunk: k_ref, dka_ref [C, Dk]; v_ref, delta_ref, ddelta_ref
  [C, Dv]; beta_ref, g_ref [C]; tinv_ref [C, C]; s_ref [Dk, Dv]; masks [C]; outputs dk_ref
  [C, Dk] (dk_a + dk_b), dv_ref [C, Dv], dbeta_ref, dgb_ref [C]."""
  masks, (dk_ref, dv_ref, dbeta_ref, dgb_ref) = _masks(refs, 3, has_runs)
  runs, carry, tail = (None if m is None else m[...] for m in masks)
  g, beta, tinv = g_ref[...], beta_ref[...], tinv_ref[...]
  gq, _, _ = xla.state_gates(g, carry, tail)
  decay = xla.block_decay(g, g, runs, runs, diagonal=True)

  def block(cols, acc):
    dv, partial = xla.wy_backward_block(
        tinv, v_ref[:, cols], beta, delta_ref[:, cols].astype(jnp.float32),
        ddelta_ref[:, cols].astype(jnp.float32), s_ref[:, cols].astype(jnp.float32),
        dtype=dtype)
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    return xla.accumulate(acc, partial)

  c, dk = k_ref.shape
  init = None if not pipelined else _zeros_of(
      lambda *a: xla.wy_backward_block(*a, dtype=dtype)[1],
      (c, c), (c, block_v), (c,), (c, block_v), (c, block_v), (dk, block_v))
  acc = _value_blocks(v_ref.shape[1] // block_v, block_v, block, init, pipelined)
  dkb, dbeta, dgb = xla.wy_backward_finish(k_ref[...], beta, gq, decay, runs, acc, dtype=dtype)
  dka = dka_ref[...]
  dka = dka if dka.dtype == dkb.dtype else dka.astype(dkb.dtype)
  dk_ref[...] = (dka + dkb).astype(dk_ref.dtype)
  dbeta_ref[...], dgb_ref[...] = dbeta, dgb


# -- wrappers -------------------------------------------------------------------------------------


def _mask_args(x: Chunked, names=("runs", "carry", "tail")):
  if x.runs is None:
    return []
  return [getattr(x, n).astype(jnp.int32) if n == "runs" else getattr(x, n) for n in names]


def _params(num_warps, num_stages=1):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pipelined(block_sizes: BlockSizes, kernel: str) -> dict:
  """A parallel kernel's keyword for num_stages_parallel (none when it keeps the unrolled
  loop: the kernel's static arguments, and so the bench's kernel signatures, stay as they
  were)."""
  return {"pipelined": True} if block_sizes.pipelined(kernel) else {}


def _wy_form(block_sizes: BlockSizes) -> dict:
  """delta_rule_wy's keyword for wy_form (none by default: its static arguments, and so the
  bench's kernel signature, stay today's)."""
  return {"dense": True} if block_sizes.wy_form == "dense" else {}


def _walk_form(block_sizes: BlockSizes) -> dict:
  """The two walks' keyword for walk_form (none by default: their static arguments, and so
  the bench's kernel signatures, stay today's)."""
  return {"scaled_values": True} if block_sizes.walk_form == "scaled_values" else {}


def _chunk_specs(chunk, masks: int):
  """BlockSpecs over grid (N, B, H) for one chunk of [B, Tp, H, D], [B, Tp, H], [B, Tp] and
  of the per-chunk states [B, H, N*Dk, Dv]."""
  sq = pl.squeezed
  tok = lambda d: pl.BlockSpec((sq, chunk, sq, d), lambda n, b, h: (b, n, h, 0))
  gate = pl.BlockSpec((sq, chunk, sq), lambda n, b, h: (b, n, h))
  state = lambda dk, dv: pl.BlockSpec((sq, sq, dk, dv), lambda n, b, h: (b, h, n, 0))
  return tok, gate, state, [pl.BlockSpec((sq, chunk), lambda n, b, h: (b, n))] * masks


def _walk_specs(padded, block_v, masks: int):
  """BlockSpecs over grid (Dv/bv, B, H): whole-sequence refs of one (row, head, column block)."""
  sq = pl.squeezed
  tok = lambda d: pl.BlockSpec((sq, padded, sq, d), lambda vi, b, h: (b, 0, h, 0))
  cols = pl.BlockSpec((sq, padded, sq, block_v), lambda vi, b, h: (b, 0, h, vi))
  gate = pl.BlockSpec((sq, padded, sq), lambda vi, b, h: (b, 0, h))
  state = lambda rows: pl.BlockSpec((sq, sq, rows, block_v), lambda vi, b, h: (b, h, 0, vi))
  return tok, cols, gate, state, [pl.BlockSpec((sq, padded), lambda vi, b, h: (b, 0))] * masks


def _like(x, dtype):
  return jax.ShapeDtypeStruct(x.shape, dtype)


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Sizes of one call: b, padded T, h, dk, dv, chunks n, value block bv, segment masks."""

  b: int
  padded: int
  h: int
  dk: int
  dv: int
  n: int
  bv: int
  has_runs: bool

  @classmethod
  def of(cls, x: Chunked, chunk: int, block_sizes: BlockSizes):
    b, padded, h, dk = x.q.shape
    dv = x.v.shape[-1]
    return cls(b, padded, h, dk, dv, padded // chunk, block_sizes.value_block(dv),
               x.runs is not None)

  @property
  def masks(self) -> int:
    return 3 if self.has_runs else 0


def _split_wy(x: Chunked, d: _Dims, *, chunk: int, dtype, block_sizes: BlockSizes,
              interpret: bool):
  """wy_form="split": (T, W, U) in two kernels, delta_rule_wy writing only T [B, Tp, H, C] and
  delta_rule_wu reading it back for W and U."""
  tok, gate, _, masks = _chunk_specs(chunk, d.masks)
  tinv = pl.pallas_call(
      functools.partial(_tinv_kernel, chunk=chunk, dtype=dtype, has_runs=d.has_runs),
      grid=(d.n, d.b, d.h),
      in_specs=[tok(d.dk), gate, gate] + masks[:1],
      out_specs=tok(chunk),
      out_shape=jax.ShapeDtypeStruct((d.b, d.padded, d.h, chunk), dtype),
      compiler_params=_params(block_sizes.num_warps_wy),
      interpret=interpret,
      name="delta_rule_wy",
  )(x.k, x.beta, x.gcum, *_mask_args(x, ("runs",)))
  w, u = pl.pallas_call(
      functools.partial(_wu_kernel, dtype=dtype, has_runs=d.has_runs),
      grid=(d.n, d.b, d.h),
      in_specs=[tok(chunk), tok(d.dk), tok(d.dv), gate, gate] + masks[:1],
      out_specs=[tok(d.dk), tok(d.dv)],
      out_shape=[_like(x.k, dtype), _like(x.v, dtype)],
      compiler_params=_params(block_sizes.num_warps_wu),
      interpret=interpret,
      name="delta_rule_wu",
  )(tinv, x.k, x.v, x.beta, x.gcum, *_mask_args(x, ("carry",)))
  return tinv, w, u


def forward(x: Chunked, s0, *, chunk: int, scale: float, dtype, out_dtype,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.forward, with o in out_dtype and residuals (T [B, Tp, H, C], states
  [B, H, N*Dk, Dv]) in `dtype`."""
  d = _Dims.of(x, chunk, block_sizes)
  b, padded, h, dk, dv, n, bv, has_runs = dataclasses.astuple(d)
  tok, gate, state, masks = _chunk_specs(chunk, d.masks)
  if block_sizes.wy_form == "split":
    tinv, w, u = _split_wy(x, d, chunk=chunk, dtype=dtype, block_sizes=block_sizes,
                           interpret=interpret)
  else:
    tinv, w, u = pl.pallas_call(
        functools.partial(_wy_kernel, chunk=chunk, dtype=dtype, has_runs=has_runs,
                          **_wy_form(block_sizes)),
        grid=(n, b, h),
        in_specs=[tok(dk), tok(dv), gate, gate] + masks[:2],
        out_specs=[tok(chunk), tok(dk), tok(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, padded, h, chunk), dtype), _like(x.k, dtype),
                   _like(x.v, dtype)],
        compiler_params=_params(block_sizes.num_warps_wy),
        interpret=interpret,
        name="delta_rule_wy",
    )(x.k, x.v, x.beta, x.gcum, *_mask_args(x, ("runs", "carry")))

  wtok, cols, wgate, wstate, wmasks = _walk_specs(padded, bv, d.masks)
  delta, final, states = pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, dtype=dtype, has_runs=has_runs,
                        **_walk_form(block_sizes)),
      grid=(dv // bv, b, h),
      in_specs=[wtok(dk), wtok(dk), cols, wgate, wstate(dk)] + wmasks[:2],
      out_specs=[cols, wstate(dk), wstate(n * dk)],
      out_shape=[_like(x.v, dtype), jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, n * dk, dv), dtype)],
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="delta_rule_fwd",
  )(x.k, w, u, x.gcum, s0.astype(jnp.float32), *_mask_args(x, ("carry", "tail")))

  o = pl.pallas_call(
      functools.partial(_out_kernel, scale=float(scale), block_v=bv, dtype=dtype,
                        has_runs=has_runs, **_pipelined(block_sizes, "out")),
      grid=(n, b, h),
      in_specs=[tok(dk), tok(dk), gate, tok(dv), state(dk, dv)] + masks,
      out_specs=tok(dv),
      out_shape=_like(x.v, out_dtype),
      compiler_params=_params(block_sizes.num_warps, block_sizes.parallel_stages("out")),
      interpret=interpret,
      name="delta_rule_out",
  )(x.q, x.k, x.gcum, delta, states, *_mask_args(x))
  # Residuals: (T, states), then Delta (split backward), then W (keep_w).
  residuals = (tinv, states) + ((delta,) if block_sizes.backward == "split" else ())
  return o, final, residuals + ((w,) if block_sizes.keep_w else ())


def backward(x: Chunked, residuals, do, dfinal, *, chunk: int, scale: float, dtype,
             block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """Same contract as xla.backward, except dq, dk, dv in the dtype of q, k, v."""
  tinv, states = residuals[:2]
  d = _Dims.of(x, chunk, block_sizes)
  b, padded, h, dk, dv, n, bv, has_runs = dataclasses.astuple(d)
  tok, gate, state, masks = _chunk_specs(chunk, d.masks)
  if block_sizes.keep_w:  # W from the forward: the prologue reads no T and writes only dlocal
    w = residuals[-1]
    dlocal = pl.pallas_call(
        functools.partial(_dlocal_kernel, scale=float(scale), block_v=bv, dtype=dtype,
                          has_runs=has_runs, **_pipelined(block_sizes, "bwd_prep")),
        grid=(n, b, h),
        in_specs=[tok(dk), tok(dk), gate, tok(dv)] + masks,
        out_specs=tok(dv),
        out_shape=_like(x.v, dtype),
        compiler_params=_params(block_sizes.num_warps, block_sizes.parallel_stages("bwd_prep")),
        interpret=interpret,
        name="delta_rule_bwd_prep",
    )(x.q, x.k, x.gcum, do, *_mask_args(x))
  else:
    w, dlocal = pl.pallas_call(
        functools.partial(_prep_kernel, scale=float(scale), block_v=bv, dtype=dtype,
                          has_runs=has_runs, **_pipelined(block_sizes, "bwd_prep")),
        grid=(n, b, h),
        in_specs=[tok(dk), tok(dk), gate, gate, tok(chunk), tok(dv)] + masks,
        out_specs=[tok(dk), tok(dv)],
        out_shape=[_like(x.k, dtype), _like(x.v, dtype)],
        compiler_params=_params(block_sizes.num_warps, block_sizes.parallel_stages("bwd_prep")),
        interpret=interpret,
        name="delta_rule_bwd_prep",
    )(x.q, x.k, x.beta, x.gcum, tinv, do, *_mask_args(x))

  wtok, cols, wgate, wstate, wmasks = _walk_specs(padded, bv, d.masks)
  ddelta, ds0, dstates = pl.pallas_call(
      functools.partial(_dstate_kernel, chunk=chunk, scale=float(scale), dtype=dtype,
                        has_runs=has_runs, **_walk_form(block_sizes)),
      grid=(dv // bv, b, h),
      in_specs=[wtok(dk), wtok(dk), wtok(dk), wgate, cols, cols, wstate(dk)] + wmasks[:2],
      out_specs=[cols, wstate(dk), wstate(n * dk)],
      out_shape=[_like(x.v, dtype), jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, n * dk, dv), dtype)],
      compiler_params=_params(block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="delta_rule_dstate",
  )(x.q, x.k, w, x.gcum, dlocal, do, dfinal.astype(jnp.float32),
    *_mask_args(x, ("carry", "tail")))

  f32 = lambda a: _like(a, jnp.float32)
  if block_sizes.backward == "split":
    return _split_gradients(x, d, tinv, states, residuals[2], do, dstates, ddelta, ds0,
                            chunk=chunk, scale=scale, dtype=dtype, block_sizes=block_sizes,
                            interpret=interpret)
  # dq, dk, dv in the inputs' dtype (written once, no extra cast pass); gate grads float32.
  dq, dk_, dv_, dbeta, dg = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=float(scale), block_v=bv, dtype=dtype,
                        has_runs=has_runs),
      grid=(n, b, h),
      in_specs=[tok(dk), tok(dk), tok(dv), gate, gate, tok(chunk), tok(dk), tok(dv),
                state(dk, dv), state(dk, dv), tok(dv)] + masks,
      out_specs=[tok(dk), tok(dk), tok(dv), gate, gate],
      out_shape=[x.q, x.k, x.v, f32(x.beta), f32(x.gcum)],
      compiler_params=_params(block_sizes.num_warps_bwd),
      interpret=interpret,
      name="delta_rule_bwd",
  )(x.q, x.k, x.v, x.beta, x.gcum, tinv, w, do, states, dstates, ddelta, *_mask_args(x))
  return dq, dk_, dv_, dbeta, dg, ds0


def _split_gradients(x: Chunked, d: _Dims, tinv, states, delta, do, dstates, ddelta, ds0, *,
                     chunk: int, scale: float, dtype, block_sizes: BlockSizes, interpret: bool):
  """backward="split": every chunk's input gradients in two kernels (the scores half per block
  of key columns, then the WY half, which adds the two halves of dk)."""
  bk = block_sizes.key_block(d.dk)
  nk = d.dk // bk
  sq = pl.squeezed
  tok_k = pl.BlockSpec((sq, chunk, sq, bk), lambda ki, n, b, h: (b, n, h, ki))
  tok_v = pl.BlockSpec((sq, chunk, sq, d.dv), lambda ki, n, b, h: (b, n, h, 0))
  gate = pl.BlockSpec((sq, chunk, sq), lambda ki, n, b, h: (b, n, h))
  rows = pl.BlockSpec((sq, sq, bk, d.dv), lambda ki, n, b, h: (b, h, n * nk + ki, 0))
  share = pl.BlockSpec((sq, sq, chunk, sq), lambda ki, n, b, h: (ki, b, n, h))
  masks = [pl.BlockSpec((sq, chunk), lambda ki, n, b, h: (b, n))] * d.masks
  dka_dtype = jnp.float32 if block_sizes.dk_partial == "float32" else dtype
  dq, dka, dga = pl.pallas_call(
      functools.partial(_bwd_dqk_kernel, scale=float(scale), block_v=d.bv, dtype=dtype,
                        has_runs=d.has_runs, **_pipelined(block_sizes, "bwd_dqk")),
      grid=(nk, d.n, d.b, d.h),
      in_specs=[tok_k, tok_k, gate, tok_v, tok_v, rows, rows] + masks,
      out_specs=[tok_k, tok_k, share],
      out_shape=[_like(x.q, x.q.dtype), _like(x.k, dka_dtype),
                 jax.ShapeDtypeStruct((nk, d.b, d.padded, d.h), jnp.float32)],
      compiler_params=_params(block_sizes.num_warps, block_sizes.parallel_stages("bwd_dqk")),
      interpret=interpret,
      name="delta_rule_bwd_dqk",
  )(x.q, x.k, x.gcum, delta, do, states, dstates, *_mask_args(x))

  tok, gate, state, masks = _chunk_specs(chunk, d.masks)
  f32 = lambda a: _like(a, jnp.float32)
  dk, dv, dbeta, dgb = pl.pallas_call(
      functools.partial(_bwd_wy_kernel, block_v=d.bv, dtype=dtype, has_runs=d.has_runs,
                        **_pipelined(block_sizes, "bwd_wy")),
      grid=(d.n, d.b, d.h),
      in_specs=[tok(d.dk), tok(d.dv), gate, gate, tok(chunk), tok(d.dv), tok(d.dv),
                state(d.dk, d.dv), tok(d.dk)] + masks,
      out_specs=[tok(d.dk), tok(d.dv), gate, gate],
      out_shape=[x.k, x.v, f32(x.beta), f32(x.gcum)],
      compiler_params=_params(block_sizes.num_warps_bwd, block_sizes.parallel_stages("bwd_wy")),
      interpret=interpret,
      name="delta_rule_bwd_wy",
  )(x.k, x.v, x.beta, x.gcum, tinv, delta, ddelta, states, dka, *_mask_args(x))
  return dq, dk, dv, dbeta, jnp.sum(dga, axis=0) + dgb, ds0
