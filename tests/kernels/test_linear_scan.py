"""linear_scan: every path (the chunked jnp path, the Triton and Mosaic TPU kernels in interpret
mode) equals reference.py, forward, final state and gradients; the kernels are what runs and
lower for their devices; chunk sizes that do not divide T.

Gradients go through jax.vjp with random cotangents on o AND the final state (never `.sum()`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from effattn.kernels import dispatch, hlo
from effattn.kernels.linear_scan import (linear_scan, linear_scan_normalizer, pallas_gpu,
                                         reference, segment_runs, xla)
from effattn.testing import assert_close
from effattn.testing.inputs import case_key, two_segments

# (impl, interpret, chunk, block_sizes): every path compared with the reference, at a chunk that
# leaves ragged chunks in the cases below. The Triton kernel runs in one pass (splits=1) and with
# T in parts (splits=2: 3 chunks of 16 in 2 parts of 2, so a part boundary inside the sequence
# and a part holding only padding at the end).
ONE_PASS, PARTS = pallas_gpu.BlockSizes(splits=1), pallas_gpu.BlockSizes(splits=2)
PATHS = {"xla": ("xla", False, 8, None),
         "pallas_gpu-interpret": ("pallas_gpu", True, 16, ONE_PASS),
         "pallas_gpu-parts-interpret": ("pallas_gpu", True, 16, PARTS),
         "pallas_tpu-interpret": ("pallas_tpu", True, 8, None)}

CASES = [
    # name, (B, T, H, Dk, Dv), log-decay per head, causal, features, dtype
    ("causal-decay-state-ragged", (2, 37, 2, 16, 32), (0.0, -0.3), True, ("state",), jnp.float32),
    ("strong-decay-segments", (2, 40, 2, 16, 16), (-5.0, -30.0), True, ("state", "segments"),
     jnp.float32),
    ("bidirectional-segments", (2, 35, 2, 16, 16), (0.0, -0.5), False, ("segments",),
     jnp.float32),
    ("bf16-no-decay", (1, 33, 2, 32, 16), None, True, ("state",), jnp.bfloat16),
    ("shorter-than-a-chunk", (1, 5, 1, 16, 16), (-0.2,), True, ("state",), jnp.float32),
]


# The parts path on the cases whose features it handles apart from the one-pass kernel: a state
# and segments entering later parts, and the reverse scan of the bidirectional form.
PARTS_CASES = ("strong-decay-segments", "bidirectional-segments")
MATCH_CASES = [(path, case) for path in PATHS for case in CASES
               if path != "pallas_gpu-parts-interpret" or case[0] in PARTS_CASES]


def _fwd_and_grads(path, chunk, q, k, v, log_decay, s0, causal, seg, scale, do, ds):
  """(o, final_state, dq, dk, dv, ds0) of one path, in a single jit (fast on CPU)."""
  impl, interpret, _, block_sizes = PATHS[path] if path in PATHS else (path, False, 0, None)

  def f(q, k, v, s0):
    return linear_scan(q, k, v, log_decay, causal=causal, initial_state=s0, segment_ids=seg,
                       scale=scale, impl=impl, chunk_size=chunk, interpret=interpret,
                       block_sizes=block_sizes)

  @jax.jit
  def run(q, k, v, s0, do, ds):
    (o, s), vjp = jax.vjp(f, q, k, v, s0)
    return (o, s) + vjp((do, ds))
  return run(q, k, v, s0, do, ds)


@pytest.mark.parametrize("path,case", MATCH_CASES, ids=[f"{p}-{c[0]}" for p, c in MATCH_CASES])
def test_matches_reference(path, case):
  name, dims, decay, causal, features, dtype = case
  chunk = PATHS[path][2]
  b, t, h, dk, dv = dims
  keys = jax.random.split(case_key(name), 8)
  q = jax.random.normal(keys[0], (b, t, h, dk)).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, h, dk)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, h, dv)).astype(dtype)
  log_decay = None if decay is None else jnp.asarray(decay, jnp.float32)
  s0 = jax.random.normal(keys[3], (b, h, dk, dv)) if "state" in features else None
  seg = two_segments(b, t, t // 3) if "segments" in features else None
  do = jax.random.normal(keys[4], (b, t, h, dv)).astype(dtype)
  ds = jax.random.normal(keys[5], (b, h, dk, dv))
  args = (q, k, v, log_decay, s0, causal, seg, dk ** -0.5, do, ds)
  want = _fwd_and_grads("reference", chunk, *args)
  got = _fwd_and_grads(path, chunk, *args)
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32
  for label, w, g in zip(("o", "final_state", "dq", "dk", "dv", "ds0"), want, got):
    if w is None:
      assert g is None, label
      continue
    assert_close(label, w, g, dtype=dtype, reduction=t)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "pallas_gpu-parts-interpret"])
def test_normalizer_matches_reference(path):
  impl, interpret, chunk, _ = PATHS[path]  # block_sizes: the defaults
  b, t, h, d = 2, 21, 2, 16
  keys = jax.random.split(jax.random.key(7), 5)
  q, k = (jax.nn.elu(jax.random.normal(kk, (b, t, h, d))) + 1 for kk in keys[:2])
  z0 = jax.random.uniform(keys[2], (b, h, d))
  seg = two_segments(b, t, 8)

  @jax.jit
  def run(q, k, z0, dn, dz):
    out = {}
    for path, interp in (("reference", False), (impl, interpret)):
      f = lambda q, k, z0, path=path, interp=interp: linear_scan_normalizer(  # noqa: E731
          q, k, jnp.array([0.0, -0.4]), initial_state=z0, segment_ids=seg, impl=path,
          chunk_size=chunk, interpret=interp)
      (n, z), vjp = jax.vjp(f, q, k, z0)
      out[path] = (n, z) + vjp((dn, dz))
    return out
  dn, dz = jax.random.normal(keys[3], (b, t, h)), jax.random.normal(keys[4], (b, h, d))
  out = run(q, k, z0, dn, dz)
  assert out[impl][0].shape == (b, t, h) and out[impl][1].shape == (b, h, d)
  for label, w, g in zip(("n", "final_key_sum", "dq", "dk", "dz0"), out["reference"], out[impl]):
    assert_close(label, w, g, reduction=t)


@pytest.mark.parametrize("path", PATHS)
def test_state_carries_across_calls(path):
  impl, interpret, chunk, block_sizes = PATHS[path]
  """Two calls chained through the state equal one call on the concatenation (with decay)."""
  b, t, h, d = 1, 29, 2, 16
  keys = jax.random.split(jax.random.key(3), 3)
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys)
  g = jnp.array([-0.1, -1.0])
  cut = 11

  @jax.jit
  def run(q, k, v):
    scan = lambda q, k, v, s0=None: linear_scan(  # noqa: E731
        q, k, v, g, initial_state=s0, impl=impl, chunk_size=chunk, interpret=interpret,
        block_sizes=block_sizes)
    o1, s1 = scan(q[:, :cut], k[:, :cut], v[:, :cut])
    o2, s2 = scan(q[:, cut:], k[:, cut:], v[:, cut:], s1)
    return scan(q, k, v), (o1, o2, s2)
  (o_full, s_full), (o1, o2, s2) = run(q, k, v)
  assert_close("o", o_full, jnp.concatenate([o1, o2], 1), reduction=t)
  assert_close("final_state", s_full, s2, reduction=t)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_xla_any_chunk_size(chunk):
  """Chunks of 1 (the recurrence), not dividing T, and longer than T; both directions."""
  keys = jax.random.split(jax.random.key(chunk), 4)
  b, t, h, d = 2, 16, 2, 4
  q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
  s0 = jax.random.normal(keys[3], (b, h, d, d))
  g = jnp.array([-0.1, -4.0])
  seg = two_segments(b, t, 7)

  @jax.jit
  def run(q, k, v, s0):
    out = []
    for reverse in (False, True):
      out.append(reference.scan_quadratic(q, k, v, g, reverse=reverse, initial_state=s0,
                                          segment_ids=seg))
      out.append(xla.scan_chunked(q, k, v, g, s0, segment_runs(seg), reverse=reverse,
                                  chunk_size=chunk))
    return out
  for want, got in zip(*[iter(run(q, k, v, s0))] * 2):
    assert_close("o", want[0], got[0], reduction=t)
    assert_close("final_state", want[1], got[1], reduction=t)


def test_xla_chunk_coefficients_mask_padding():
  decay, w_q, w_k, keep = xla.chunk_coefficients(jnp.float32(-1.0), 3, 5, reverse=False)
  assert float(decay[:, 3:].max()) == 0.0 and float(w_k[3:].max()) == 0.0
  assert abs(float(keep) - float(jnp.exp(-3.0))) < 1e-6


def _loss_grads(impl, interpret, **kwargs):
  def f(q, k, v):
    o, s = linear_scan(q, k, v, jnp.full((q.shape[2],), -0.5), impl=impl, interpret=interpret,
                       **kwargs)
    return jnp.vdot(o, jnp.cos(o)) + jnp.vdot(s, s)
  return jax.grad(f, argnums=(0, 1, 2))


@pytest.mark.parametrize("impl,names", [
    ("pallas_gpu", ["linear_scan", "linear_scan", "linear_scan_reverse", "linear_scan_reverse"]),
    ("pallas_tpu", ["linear_scan_tpu", "linear_scan_tpu", "linear_scan_tpu_reverse",
                    "linear_scan_tpu_reverse"]),
])
def test_kernels_run_forward_and_backward(impl, names):
  # 1 forward scan + the 3 transposed scans of the backward (dq causal; dk, dv reverse).
  x = jnp.ones((1, 40, 1, 16))
  assert sorted(hlo.pallas_call_names(_loss_grads(impl, True), x, x, x)) == names


def test_parts_run_a_states_pass_per_scan():
  """Each of the 4 scans (1 forward, 3 backward) is a states pass and an outputs pass."""
  x = jnp.ones((1, 40, 1, 16))
  grads = _loss_grads("pallas_gpu", True, chunk_size=16, block_sizes=PARTS)
  assert sorted(hlo.pallas_call_names(grads, x, x, x)) == sorted(
      ["linear_scan", "linear_scan_states"] * 2
      + ["linear_scan_reverse", "linear_scan_reverse_states"] * 2)


def test_parts_follow_the_grid():
  """splits=0 cuts T into parts while the grid is small, one pass once it is large."""
  assert pallas_gpu.parts_for(0, 32, 256) == (8, 32)  # B=2, H=8, Dv/block_v=2 at T=16k
  assert pallas_gpu.parts_for(0, 256, 256) == (1, 256)  # B=8, H=16: one pass
  assert pallas_gpu.parts_for(0, 32, 12) == (3, 4)  # parts of at least MIN_PART_CHUNKS
  assert pallas_gpu.parts_for(5, 32, 12) == (4, 3)  # 5 parts of 3 chunks would leave one empty
  assert pallas_gpu.parts_for(1, 32, 12) == (1, 12)


@pytest.mark.parametrize("shape,passes", [((2, 100, 2, 64), ("",)),
                                          ((1, 2048, 2, 128), ("", "_states"))])
def test_lowers_to_triton_with_its_name(shape, passes):
  """Lowering for CUDA (no GPU needed) emits the Triton custom calls named by the kernel: one
  pass per scan, or (a long T on a small grid) a states pass and an outputs pass."""
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  with dispatch.lower_for("gpu"):  # choose as on the GPU this machine lacks
    exported = export.export(
        jax.jit(_loss_grads("pallas_gpu", False)), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            x, x, x)
  names = hlo.kernel_names(exported.mlir_module())
  assert sorted(names) == sorted(f"linear_scan{r}{p}" for r in ("", "_reverse") for p in passes
                                 for _ in range(2))


def test_lowers_to_mosaic():
  x = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
  with dispatch.lower_for("tpu"):  # choose as on the TPU this machine lacks
    exported = export.export(
        jax.jit(_loss_grads("pallas_tpu", False)), platforms=["tpu"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(x, x, x)
  calls = hlo.kernels(exported.mlir_module())
  assert len(calls) >= 4 and {c.family for c in calls} == {"mosaic_tpu"}


@pytest.mark.parametrize("field,value", [("chunk", 48), ("block_v", 8)])
def test_block_sizes_must_be_powers_of_two(field, value):
  with pytest.raises(ValueError, match=f"BlockSizes.{field}"):
    pallas_gpu.BlockSizes(**{field: value})


def test_rejects_head_dims_the_tiles_cannot_hold():
  x = jnp.ones((1, 8, 1, 12))
  with pytest.raises(ValueError, match="Dk=12.*impl='xla'"):
    linear_scan(x, x, jnp.ones((1, 8, 1, 16)), impl="pallas_gpu", interpret=True)


DECAY_CASES = [
    # name, (B, T, H, Dk, Dv), log-decay per head, causal, features, dtype
    ("decay-grad-state-segments", (2, 21, 2, 16, 16), (-0.1, -0.6), True, ("state", "segments"),
     jnp.float32),
    ("decay-grad-strong-state", (1, 13, 2, 16, 16), (0.0, -8.0), True, ("state",), jnp.float32),
    ("decay-grad-bidirectional", (2, 19, 2, 16, 16), (-0.05, -0.5), False, ("segments",),
     jnp.float32),
    ("decay-grad-bf16", (1, 18, 2, 16, 16), (-0.2, -1.0), True, ("state",), jnp.bfloat16),
]
DECAY_MATCH = [(path, case) for path in PATHS for case in DECAY_CASES
               if path != "pallas_gpu-parts-interpret" or "segments" in case[4]]


@pytest.mark.parametrize("path,case", DECAY_MATCH, ids=[f"{p}-{c[0]}" for p, c in DECAY_MATCH])
def test_log_decay_gradient_matches_reference(path, case):
  """d log_decay (random cotangents on o and the final state) equals jax.grad of reference.py."""
  name, (b, t, h, dk, dv), decay, causal, features, dtype = case
  impl, interpret, chunk, block_sizes = PATHS[path]
  keys = jax.random.split(case_key(name), 6)
  q, k = (jax.random.normal(kk, (b, t, h, dk)).astype(dtype) for kk in keys[:2])
  v = jax.random.normal(keys[2], (b, t, h, dv)).astype(dtype)
  s0 = jax.random.normal(keys[3], (b, h, dk, dv)) if "state" in features else None
  seg = two_segments(b, t, 8) if "segments" in features else None
  do = jax.random.normal(keys[4], (b, t, h, dv))
  ds = jax.random.normal(keys[5], (b, h, dk, dv))

  @jax.jit
  def grads(g):
    out = []
    for impl_, interpret_ in (("reference", False), (impl, interpret)):
      def loss(g, impl_=impl_, interpret_=interpret_):
        o, s = linear_scan(q, k, v, g, causal=causal, initial_state=s0, segment_ids=seg,
                           scale=dk ** -0.5, impl=impl_, chunk_size=chunk,
                           interpret=interpret_, block_sizes=block_sizes)
        return jnp.vdot(o.astype(jnp.float32), do) + jnp.vdot(s, ds)
      out.append(jax.grad(loss)(g))
    return out
  want, got = grads(jnp.asarray(decay, jnp.float32))
  assert_close("d log_decay", want, got, dtype=dtype, reduction=b * t)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "pallas_gpu-parts-interpret"])
def test_normalizer_log_decay_gradient_matches_reference(path):
  impl, interpret, chunk, _ = PATHS[path]
  b, t, h, d = 2, 17, 2, 16
  keys = jax.random.split(jax.random.key(11), 5)
  q, k = (jax.nn.elu(jax.random.normal(kk, (b, t, h, d))) + 1 for kk in keys[:2])
  z0 = jax.random.uniform(keys[2], (b, h, d))
  seg = two_segments(b, t, 6)
  dn, dz = jax.random.normal(keys[3], (b, t, h)), jax.random.normal(keys[4], (b, h, d))

  @jax.jit
  def grads(g):
    out = []
    for impl_, interpret_ in (("reference", False), (impl, interpret)):
      def loss(g, impl_=impl_, interpret_=interpret_):
        n, z = linear_scan_normalizer(q, k, g, initial_state=z0, segment_ids=seg, impl=impl_,
                                      chunk_size=chunk, interpret=interpret_)
        return jnp.vdot(n, dn) + jnp.vdot(z, dz)
      out.append(jax.grad(loss)(g))
    return out
  want, got = grads(jnp.array([-0.1, -0.7]))
  assert_close("d log_decay", want, got, reduction=b * t)


@pytest.mark.parametrize("learned", [False, True])
def test_only_a_learned_decay_makes_the_backward_write_f32(learned):
  """A learned decay's backward writes dq, dk in f32 (bf16 rounding of them spoils d log_decay,
  which cancels across tokens); a fixed decay's backward stays as it was: bf16 dq, dk."""
  x = jax.ShapeDtypeStruct((1, 64, 1, 16), jnp.bfloat16)

  def loss(q, k, v, g):
    o, _ = linear_scan(q, k, v, g if learned else jax.lax.stop_gradient(g), impl="pallas_gpu")
    return jnp.vdot(o.astype(jnp.float32), o.astype(jnp.float32))
  with dispatch.lower_for("gpu"):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        x, x, x, jnp.array([-0.3])).lower(lowering_platforms=("cuda",)).as_text()
  results = [re.search(r"-> \(([^()]*)\)\s*$", line).group(1) for line in text.splitlines()
             if "__gpu$xla.gpu.triton" in line]
  assert len(results) == 4  # the forward scan and the three of the backward
  assert sum(r.count("tensor<1x64x1x16xf32>") for r in results) == (2 if learned else 0)
