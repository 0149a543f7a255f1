"""Shared suite: a linear-scan path equals reference.py, forward, final state and gradients.

Each test_linear_scan_<impl>.py subclasses `LinearScanSuite` and sets IMPL / INTERPRET.
Gradients go through jax.vjp with random cotangents on o AND the final state (never `.sum()`).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.linear_scan import linear_scan, linear_scan_normalizer

# Absolute tolerance per dtype, times sqrt(reduction length) and the reference's magnitude.
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-3}


def assert_close(name, want, got, dtype, reduce_len):
  want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
  assert want.shape == got.shape, f"{name}: shape {got.shape} != {want.shape}"
  atol = TOL[dtype] * np.sqrt(reduce_len) * max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def two_segments(b, t, cut):
  """Rows of [1]*cut + [2]*(t-cut), the second row one segment (mixed packing in a batch)."""
  seg = np.ones((b, t), np.int32)
  seg[0, cut:] = 2
  return jnp.asarray(seg)


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


class LinearScanSuite:
  IMPL = "reference"
  INTERPRET = False
  CHUNK = 16
  BLOCK_SIZES = None  # the kernel paths' BlockSizes (None: their defaults)

  def fwd_and_grads(self, impl, q, k, v, log_decay, s0, causal, seg, scale, do, ds):
    """(o, final_state, dq, dk, dv, ds0) of one path, in a single jit (fast on CPU)."""
    def f(q, k, v, s0):
      return linear_scan(q, k, v, log_decay, causal=causal, initial_state=s0, segment_ids=seg,
                         scale=scale, impl=impl, chunk_size=self.CHUNK, interpret=self.INTERPRET,
                         block_sizes=self.BLOCK_SIZES)

    @jax.jit
    def run(q, k, v, s0, do, ds):
      (o, s), vjp = jax.vjp(f, q, k, v, s0)
      return (o, s) + vjp((do, ds))
    return run(q, k, v, s0, do, ds)

  @pytest.mark.parametrize("name,dims,decay,causal,features,dtype", CASES,
                           ids=[c[0] for c in CASES])
  def test_matches_reference(self, name, dims, decay, causal, features, dtype):
    b, t, h, dk, dv = dims
    keys = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 8)
    q = jax.random.normal(keys[0], (b, t, h, dk)).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, h, dk)).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, h, dv)).astype(dtype)
    log_decay = None if decay is None else jnp.asarray(decay, jnp.float32)
    s0 = jax.random.normal(keys[3], (b, h, dk, dv)) if "state" in features else None
    seg = two_segments(b, t, t // 3) if "segments" in features else None
    do = jax.random.normal(keys[4], (b, t, h, dv)).astype(dtype)
    ds = jax.random.normal(keys[5], (b, h, dk, dv))
    args = (q, k, v, log_decay, s0, causal, seg, dk ** -0.5, do, ds)
    want = self.fwd_and_grads("reference", *args)
    got = self.fwd_and_grads(self.IMPL, *args)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    for name_, w, g in zip(("o", "final_state", "dq", "dk", "dv", "ds0"), want, got):
      if w is None:
        assert g is None, name_
        continue
      assert_close(name_, w, g, dtype, t)

  def test_normalizer_matches_reference(self):
    b, t, h, d = 2, 21, 2, 16
    keys = jax.random.split(jax.random.key(7), 5)
    q, k = (jax.nn.elu(jax.random.normal(kk, (b, t, h, d))) + 1 for kk in keys[:2])
    z0 = jax.random.uniform(keys[2], (b, h, d))
    seg = two_segments(b, t, 8)

    @jax.jit
    def run(q, k, z0, dn, dz):
      out = {}
      for impl in ("reference", self.IMPL):
        f = lambda q, k, z0, impl=impl: linear_scan_normalizer(
            q, k, jnp.array([0.0, -0.4]), initial_state=z0, segment_ids=seg, impl=impl,
            chunk_size=self.CHUNK, interpret=self.INTERPRET)  # block_sizes: the defaults
        (n, z), vjp = jax.vjp(f, q, k, z0)
        out[impl] = (n, z) + vjp((dn, dz))
      return out
    dn, dz = jax.random.normal(keys[3], (b, t, h)), jax.random.normal(keys[4], (b, h, d))
    out = run(q, k, z0, dn, dz)
    assert out[self.IMPL][0].shape == (b, t, h) and out[self.IMPL][1].shape == (b, h, d)
    for name, w, g in zip(("n", "final_key_sum", "dq", "dk", "dz0"), out["reference"],
                          out[self.IMPL]):
      assert_close(name, w, g, jnp.float32, t)

  def test_state_carries_across_calls(self):
    """Two calls chained through the state equal one call on the concatenation (with decay)."""
    b, t, h, d = 1, 29, 2, 16
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys)
    g = jnp.array([-0.1, -1.0])
    cut = 11

    @jax.jit
    def run(q, k, v):
      scan = lambda q, k, v, s0=None: linear_scan(
          q, k, v, g, initial_state=s0, impl=self.IMPL, chunk_size=self.CHUNK,
          interpret=self.INTERPRET, block_sizes=self.BLOCK_SIZES)
      o1, s1 = scan(q[:, :cut], k[:, :cut], v[:, :cut])
      o2, s2 = scan(q[:, cut:], k[:, cut:], v[:, cut:], s1)
      return scan(q, k, v), (o1, o2, s2)
    (o_full, s_full), (o1, o2, s2) = run(q, k, v)
    assert_close("o", o_full, jnp.concatenate([o1, o2], 1), jnp.float32, t)
    assert_close("final_state", s_full, s2, jnp.float32, t)
