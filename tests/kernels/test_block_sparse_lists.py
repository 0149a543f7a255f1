"""block_sparse list building: the sort-free compaction equals the argsort formulation exactly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.block_sparse.common import (block_mask_from_lists, causal_block_mask,
                                                 lists_from_block_mask, pad_lists,
                                                 transpose_lists)


def _old_lists(block_mask):
  """The argsort version lists_from_block_mask replaced: the oracle."""
  k = block_mask.shape[-1]
  order = jnp.argsort(~block_mask, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
  slot = jnp.arange(k, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.clip(counts - 1, 0, k - 1)[..., None], axis=-1)
  indices = jnp.where(slot < counts[..., None], order, jnp.where(counts[..., None] > 0, last, 0))
  return pad_lists(indices, counts)


def _old_transpose(indices, counts, num_k_blocks):
  dense = block_mask_from_lists(indices, counts, num_k_blocks)
  return _old_lists(jnp.swapaxes(dense, -1, -2))


def _masks():
  """(name, mask) over shapes and densities, with empty rows, full rows and triangles."""
  out = []
  key = jax.random.key(0)
  for shape in [(1, 1, 1, 1), (1, 1, 3, 5), (2, 3, 5, 7), (2, 2, 16, 33), (1, 2, 64, 64),
                (2, 1, 8, 128)]:
    for p in (0.0, 0.1, 0.5, 1.0):
      key, sub = jax.random.split(key)
      m = jax.random.bernoulli(sub, p, shape)
      out.append((f"{shape}-p{p}", m))
    if shape[-2] >= 3:  # rows 0 empty, 1 full, the rest random
      key, sub = jax.random.split(key)
      m = jax.random.bernoulli(sub, 0.3, shape).at[..., 0, :].set(False).at[..., 1, :].set(True)
      out.append((f"{shape}-empty-full", m))
    n_q, n_k = shape[-2:]
    tri = jnp.broadcast_to(causal_block_mask(n_q, n_k, 16, 16), shape)
    out.append((f"{shape}-causal", tri))
    band = jnp.broadcast_to(causal_block_mask(n_q, n_k, 16, 16, window=40), shape)
    out.append((f"{shape}-band", band))
  return out


_MASKS = _masks()


def _equal(got, want):
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == jnp.int32
    assert g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name,mask", _MASKS, ids=[n for n, _ in _MASKS])
def test_lists_equal_argsort_oracle(name, mask):
  del name
  got = jax.jit(lists_from_block_mask)(mask)
  _equal(got, _old_lists(mask))
  _equal(lists_from_block_mask(mask), got)  # eager too


@pytest.mark.parametrize("name,mask", _MASKS, ids=[n for n, _ in _MASKS])
def test_transpose_equal_argsort_oracle(name, mask):
  del name
  idx, cnt = _old_lists(mask)
  n_k = mask.shape[-1]
  got = jax.jit(transpose_lists, static_argnums=2)(idx, cnt, n_k)
  _equal(got, _old_transpose(idx, cnt, n_k))
  t_idx, t_cnt = got
  np.testing.assert_array_equal(np.asarray(block_mask_from_lists(t_idx, t_cnt, mask.shape[-2])),
                                np.asarray(mask).swapaxes(-1, -2))


def test_lists_accept_numpy_and_01_ints():
  m = np.array([[[[1, 0, 1], [0, 0, 0], [1, 1, 1]]]])
  _equal(lists_from_block_mask(m.astype(bool)), _old_lists(jnp.asarray(m, bool)))
  _equal(lists_from_block_mask(jnp.asarray(m, jnp.int32)), _old_lists(jnp.asarray(m, bool)))


# The sort primitive (jaxpr `sort[`, StableHLO `stablehlo.sort`), not `indices_are_sorted`.
_SORT = re.compile(r"\bsort\b")


def _texts(fn, *args, static=()):
  jaxpr = str(jax.make_jaxpr(fn, static_argnums=static)(*args))
  hlo = jax.jit(fn, static_argnums=static).lower(*args).as_text()
  return jaxpr, hlo


def test_no_sort_in_jaxpr_or_hlo():
  mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 8, 32, 64))
  idx, cnt = lists_from_block_mask(mask)
  for texts in (_texts(lists_from_block_mask, mask),
                _texts(transpose_lists, idx, cnt, 64, static=(2,))):
    for text in texts:
      assert not _SORT.search(text), text
    assert "unique_indices=True" in texts[0]  # a plain store on the GPU, no atomics
  # The oracle does sort, so the check above can fail.
  assert all(_SORT.search(t) for t in _texts(_old_lists, mask))
