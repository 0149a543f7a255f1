"""Attention with persistent keys (kernels/softmax/persistent.py): the query-chunked path, the
cuDNN layout (checked through XLA, which computes the same masked softmax) and the windowed
block_sparse path (its Triton kernels interpreted) equal the dense oracle, forward and every
gradient; the layout flags rows it cannot hold; memory is flat in T; "auto" gives a window to
the block-sparse kernels where one runs; the decode form (over_cache) equals the dense oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels import dispatch
from effattn.kernels.softmax import attention_mask, persistent, reference_attention, sequence_index
from effattn.testing import assert_close
from effattn.testing.kernels import assert_kernels_ran


def _inputs(t=37, b=2, h=4, h_kv=2, d=16, n_p=3, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return (arr(b, t, h, d), arr(b, t, h_kv, d), arr(b, t, h_kv, d), arr(n_p, h_kv, d),
          arr(n_p, h_kv, d), arr(b, t, h, d))


def _segments(t):
  seg = np.ones((2, t), np.int32)
  seg[0, 10:] = 2
  seg[0, 30:] = 0  # padding at the end of row 0
  seg[1, 20:] = 5
  return jnp.asarray(seg)


def _fwd_and_grads(fn, q, k, v, pk, pv, do):
  out, vjp = jax.vjp(fn, q, k, v, pk, pv)
  return (out,) + vjp(do)


PATHS = {
    "chunked": lambda seg, window: lambda q, k, v, pk, pv: persistent.chunked(
        q, k, v, pk, pv, segment_ids=seg, window=window, chunk=8),
    "laid_out": lambda seg, window: lambda q, k, v, pk, pv: persistent.laid_out(
        q, k, v, pk, pv, segment_ids=seg, attention_impl="xla", max_segments=4)[0],
}


@pytest.mark.parametrize("path,segments,window", [
    ("chunked", False, None), ("chunked", True, None), ("chunked", True, 5),
    ("chunked", False, 100), ("laid_out", False, None), ("laid_out", True, None)])
def test_matches_dense_oracle(path, segments, window):
  q, k, v, pk, pv, do = _inputs()
  seg = _segments(q.shape[1]) if segments else None
  want = jax.jit(lambda *a: _fwd_and_grads(lambda q, k, v, pk, pv: persistent.reference(
      q, k, v, pk, pv, segment_ids=seg, window=window), *a))(q, k, v, pk, pv, do)
  got = jax.jit(lambda *a: _fwd_and_grads(PATHS[path](seg, window), *a))(q, k, v, pk, pv, do)
  for name, w, g in zip(("o", "dq", "dk", "dv", "dpk", "dpv"), want, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5, err_msg=name)


def test_layout_flags_what_it_cannot_hold():
  t = 12
  ok = lambda seg: bool(persistent.layout(jnp.asarray(seg, jnp.int32), t, 2, 3)[3])  # noqa: E731
  assert ok([[1] * 6 + [2] * 6])
  assert not ok([[1] * 4 + [2] * 4 + [1] * 4])  # an id recurring after another
  assert not ok([[1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]])  # more runs than the layout's 3


def test_layout_puts_each_segment_behind_its_copy():
  tok_slot, src, seg, _, copy_slot = persistent.layout(jnp.asarray([[7, 7, 7, 9, 9]]), 5, 2, 3)
  np.testing.assert_array_equal(np.asarray(tok_slot[0]), [2, 3, 4, 7, 8])
  np.testing.assert_array_equal(np.asarray(src[0, :9]), [5, 6, 0, 1, 2, 5, 6, 3, 4])
  np.testing.assert_array_equal(np.asarray(seg[0]), [7, 7, 7, 7, 7, 9, 9, 9, 9, 10, 10])
  np.testing.assert_array_equal(np.asarray(copy_slot[0]), [0, 1, 5, 6, 9, 10])


BAND_CASES = [
    # name, T, dtype, segments, window, N_p. T = 150: three 64-token tiles, the last ragged.
    ("f32-segments-w5-np4", 150, jnp.float32, True, 5, 4),  # a window under a tile
    ("f32-w70-np0", 150, jnp.float32, False, 70, 0),  # across tiles, not a multiple of one
    ("bf16-segments-w200-np4", 150, jnp.bfloat16, True, 200, 4),  # longer than T
    ("bf16-w1-np4", 40, jnp.bfloat16, False, 1, 4),  # only itself and the persistent keys
]


@pytest.mark.parametrize("name,t,dtype,segments,window,n_p", BAND_CASES,
                         ids=[c[0] for c in BAND_CASES])
def test_block_sparse_path_matches_dense_oracle(name, t, dtype, segments, window, n_p):
  """persistent_attention's block_sparse path (the Triton kernels in the interpreter, GQA,
  head_dim 64) against the dense oracle: o and the gradients of q, k, v and both persistent
  tensors, with packed segments and padding or none."""
  q, k, v, pk, pv, do = (x.astype(dtype) for x in _inputs(t=t, d=64, n_p=n_p, seed=len(name)))
  seg = None
  if segments:
    seg = np.ones((2, t), np.int32)
    seg[0, 50:] = 2
    seg[0, 120:] = 0  # padding at the end of row 0
    seg[1, 70:] = 5  # a segment starting inside a tile
    seg = jnp.asarray(seg)

  def pair(q, k, v, pk, pv, do):
    ref = lambda *a: persistent.reference(*a, segment_ids=seg, window=window)  # noqa: E731
    path = lambda *a: persistent.persistent_attention(  # noqa: E731
        *a, segment_ids=seg, window=window, impl="pallas_gpu", interpret=True)
    return (_fwd_and_grads(ref, q, k, v, pk, pv, do),
            _fwd_and_grads(path, q, k, v, pk, pv, do))

  want, got = jax.jit(pair)(q, k, v, pk, pv, do)
  reduction = n_p + min(window, t)
  for gname, w, g in zip(("o", "dq", "dk", "dv", "dpk", "dpv"), want, got):
    assert_close(gname, w, g, dtype=dtype, reduction=t if gname[1:] in ("k", "v", "pk", "pv")
                 else reduction)


def test_auto_gives_a_window_to_the_block_sparse_kernels():
  """Where the Triton kernels run (standing in for a GPU here) "auto" takes the block_sparse
  path for a windowed call; at a head_dim they do not take, or on the CPU, the chunked one."""
  q, k, v, pk, pv, _ = _inputs(t=32, d=64, n_p=2)
  attend = lambda q, k, v, window: persistent.persistent_attention(  # noqa: E731
      q, k, v, pk, pv, window=window)
  with dispatch.interpret_kernels("gpu"):
    assert_kernels_ran({"block_sparse_fwd"}, lambda q: attend(q, k, v, 8), q)
    assert not persistent._band_kernel(q, 8)
    assert "head_dim=16" in persistent._band_kernel(q[..., :16], 8)
  assert "backend is cpu" in persistent._band_kernel(q, 8)


def test_band_lists_hold_the_band_only():
  idx, cnt = persistent.band_lists(256, 64, 70)  # query block 3 (192..255) needs keys >= 123
  assert idx.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(np.asarray(cnt[0, 0]), [1, 2, 3, 3])
  np.testing.assert_array_equal(np.asarray(idx[0, 0, 3, :3]), [1, 2, 3])
  assert persistent.band_lists(256, 64, 1)[0].shape[-1] == 1  # the diagonal block alone


def test_forced_cudnn_with_a_window_is_refused():
  q, k, v, pk, pv, _ = _inputs(t=8)
  with pytest.raises(ValueError, match="cudnn"):
    persistent.persistent_attention(q, k, v, pk, pv, window=4, impl="cudnn")


def _temp_bytes(fn, t, tokens=1024):
  q, k, v, pk, pv, do = _inputs(t=t, b=tokens // t)
  compiled = jax.jit(lambda *a: _fwd_and_grads(fn, *a)).lower(q, k, v, pk, pv, do).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_flat_in_t_at_equal_tokens():
  chunk = lambda q, k, v, pk, pv: persistent.chunked(q, k, v, pk, pv, chunk=32)  # noqa: E731
  dense = lambda q, k, v, pk, pv: persistent.reference(q, k, v, pk, pv)  # noqa: E731
  assert _temp_bytes(chunk, 512) <= 1.25 * _temp_bytes(chunk, 128)
  assert _temp_bytes(dense, 512) >= 2.5 * _temp_bytes(dense, 128)  # the [T, T] scores


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tq,h_kv,n_p", [(3, 2, 3), (1, 2, 3), (1, 4, 3), (1, 2, 0)])
def test_over_cache_equals_one_softmax_over_the_concatenation(dtype, tq, h_kv, n_p):
  """The decode form: the persistent pairs and a cache under a dense mask (causal, and in row 0
  slots cut off by a window) equal the dense oracle's one softmax over [persistent || cache]:
  a chunk of queries as two softmaxes merged by log-sum-exp, one query (a decode step) as the
  products and sums over the cache as it lies, grouped (h_kv 2 of 4 heads) or not, with and
  without persistent pairs."""
  q, k, v, pk, pv, _ = _inputs(t=11, h_kv=h_kv, n_p=n_p)
  q = q[:, -tq:]  # the new tokens at positions 11 - tq .. 10
  mask = attention_mask(sequence_index(2, tq, 11 - tq), sequence_index(2, 11), causal=True)
  mask = mask.at[0, :, :, :4].set(False)
  k_all, v_all = persistent._with_persistent(q, k, v, pk, pv)
  want = reference_attention(q, k_all, v_all, jnp.concatenate(
      [jnp.ones((2, 1, tq, n_p), bool), mask], -1))
  cast = lambda x: x.astype(dtype)  # noqa: E731
  got = persistent.over_cache(cast(q), cast(k), cast(v), pk, pv, mask)
  assert got.dtype == jnp.dtype(dtype) and got.shape == q.shape
  assert_close("over_cache", want, got, reduction=14)
