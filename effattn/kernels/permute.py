"""Row permutations whose gradient is a gather, not a scatter-add.

Autodiff transposes a row gather y = x[idx] (take_along_axis, x[idx], jnp.take) into a
scatter-add of the cotangent with unique_indices=False: it cannot know that idx hits each row
once. On the GPU that is an atomic add per element (bf16 atomics for bf16 activations; on an
H200 such glue took 37% of a sibling op's backward). Where idx is a permutation (or a
one-to-one map of kept rows) the transpose is a gather by the inverse map, with no atomics:

    y = permute(x, perm, inverse, axis=1)        # y[b, i, h] = x[b, perm[b, i, h], h]
    dx = permute(dy, inverse, perm, axis=1)      # the backward, itself a permute

`permute` is that gather under jax.custom_vjp (reverse mode only: no jax.jvp through it).
`inverse_permutation` builds the inverse without a sort: one scatter of an iota with unique
indices (a plain store on the GPU, no atomics; integer, outside every gradient);
`stable_partition` the order that puts a mask's kept entries first (a stable argsort of the
mask, again without a sort: cumsum ranks and that scatter).

Layout: x [B, T, H, D] (any leading batch dims and any trailing dims); perm [B, T, H] is a
prefix of x's dims holding the permuted axis (perm.shape == x.shape[:perm.ndim] except along
`axis`), broadcast over x's remaining trailing dims. So a per-(row, head) permutation of the
tokens of [B, T, H, D] takes perm [B, T, H] and axis 1, one of a [B, H, T] vector takes perm
[B, H, T] and axis -1, and one shared by the heads takes perm [B, T] and axis 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _norm_axis(axis: int, ndim: int) -> int:
  a = axis + ndim if axis < 0 else axis
  if not 0 <= a < ndim:
    raise ValueError(f"axis {axis} out of range for an index of rank {ndim}")
  return a


def _gather(x, idx, keep, axis: int):
  """x [..., N, ...] -> [..., M, ...]: x's rows at idx (along axis), rows where keep is false 0."""
  extra = (1,) * (x.ndim - idx.ndim)
  # clip, as jax's indexing: a permutation is in range, and a map that is not (grouped_softmax's
  # on a layout it rejects, where its lax.cond may still run both branches under vmap) reads
  # clamped rows, never out of bounds.
  y = jnp.take_along_axis(x, idx.reshape(idx.shape + extra), axis=axis, mode="clip")
  if keep is not None:
    y = jnp.where(keep.reshape(keep.shape + extra), y, jnp.zeros((), y.dtype))
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _permute(x, perm, inverse, keep, inverse_keep, axis):
  return _gather(x, perm, keep, axis)


def _permute_fwd(x, perm, inverse, keep, inverse_keep, axis):
  # y through _permute itself: a derivative of the first gradient (which reads y) takes this
  # rule again rather than the plain gather's scatter-add.
  return _permute(x, perm, inverse, keep, inverse_keep, axis), (perm, inverse, keep, inverse_keep)


def _permute_bwd(axis, res, dy):
  perm, inverse, keep, inverse_keep = res
  # The transpose of the gather by perm is the gather by its inverse, again a permute (so a
  # second derivative has no scatter either). Integer and bool args get no cotangent.
  return _permute(dy, inverse, perm, inverse_keep, keep, axis), None, None, None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x: jax.Array, perm: jax.Array, inverse: jax.Array, axis: int = 1, *,
            keep: jax.Array | None = None, inverse_keep: jax.Array | None = None) -> jax.Array:
  """x [B, T, H, D] -> y with y[b, i, h] = x[b, perm[b, i, h], h] along `axis` (here 1).

  perm [B, T, H] int: a permutation of 0..T-1 along `axis` for each other index, its shape a
  prefix of x's (x's dims past perm.ndim are carried along); inverse: its inverse, of the
  same shape (inverse_permutation(perm, axis)). The value is take_along_axis(x, perm, axis);
  the gradient w.r.t. x is the same gather of the cotangent by `inverse`, where autodiff of
  the plain gather would scatter-add (GPU atomics). perm and inverse get no gradient.

  A one-to-one map of kept rows also works (x's and y's lengths along `axis` may then differ):
  keep (perm's shape, bool) zeroes y's rows where it is false, and each row n of x is used by
  at most one kept row of y, inverse[n], where inverse_keep (inverse's shape) holds (None:
  every row is kept / used). Nothing checks that the maps are inverse: a wrong `inverse`
  gives wrong gradients silently.
  """
  if perm.ndim > x.ndim:
    raise ValueError(f"perm of rank {perm.ndim} for x of rank {x.ndim}")
  return _permute(x, perm, inverse, keep, inverse_keep, _norm_axis(axis, perm.ndim))


def inverse_permutation(perm: jax.Array, axis: int = -1) -> jax.Array:
  """perm [B, T, H] int (a permutation of 0..T-1 along `axis` for each other index) -> its
  inverse, inv[b, perm[b, i, h], h] = i, by one scatter with unique indices (no sort, no
  atomics). The values of perm must be a permutation: anything else leaves garbage."""
  a = _norm_axis(axis, perm.ndim)
  # inv[i_0, .., perm[i], .., i_n] = i along axis: every other index is its own iota.
  at = tuple(perm if d == a else jax.lax.broadcasted_iota(perm.dtype, perm.shape, d)
             for d in range(perm.ndim))
  iota = jax.lax.broadcasted_iota(perm.dtype, perm.shape, a)
  return jnp.zeros_like(perm).at[at].set(iota, unique_indices=True, mode="drop")


def stable_partition(keep: jax.Array, axis: int = -1):
  """keep [B, T, H] bool -> (perm, inverse, count) along `axis` (here 1).

  perm [B, T, H] int32: the kept positions in order, then the dropped ones in order (what a
  stable argsort of ~keep gives, without the sort kernel); inverse: each position's place in
  perm; count [B, H]: the kept positions. The kept ranks are a cumsum, the dropped ones follow
  them, and perm is inverse_permutation's one unique-index store."""
  a = _norm_axis(axis, keep.ndim)
  kept = keep.astype(jnp.int32)
  rank = jnp.cumsum(kept, axis=a, dtype=jnp.int32) - kept  # kept entries before each
  count = jnp.sum(kept, axis=a, dtype=jnp.int32, keepdims=True)
  position = jax.lax.broadcasted_iota(jnp.int32, keep.shape, a)
  inverse = jnp.where(keep, rank, count + position - rank)
  return inverse_permutation(inverse, axis=a), inverse, jnp.squeeze(count, a)
