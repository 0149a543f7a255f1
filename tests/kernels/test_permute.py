"""kernels/permute.py: the row permutation's value and gradient are those of the plain gather,
its backward has no scatter; inverse_permutation against argsort; and the two users (routing's
cluster sort, dynamic_mask's chunk-sorted keys) keep their exact gradients, without the
scatter-adds autodiff of their gathers had (GPU atomics)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import routing
from effattn.kernels.block_sparse import sorted_chunks
from effattn.kernels.permute import inverse_permutation, permute, stable_partition
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import build


def _random_perm(key, shape, axis):
  return jnp.argsort(jax.random.uniform(key, shape), axis=axis).astype(jnp.int32)


def _plain(x, perm, axis):
  """The previous formulation: a gather that autodiff transposes into a scatter-add."""
  return jnp.take_along_axis(x, perm.reshape(perm.shape + (1,) * (x.ndim - perm.ndim)), axis=axis)


def _scatters(text):
  """(unique_indices, result type) of each scatter op in a lowered StableHLO text."""
  lines = text.splitlines()
  out = []
  for i, line in enumerate(lines):
    if '"stablehlo.scatter"' in line:
      j = i
      while not lines[j].lstrip().startswith("})"):
        j += 1
      out.append((re.search(r"unique_indices = (\w+)", line).group(1),
                  lines[j].rsplit("->", 1)[-1].strip()))
  return out


def _jaxpr_scatters(closed):
  """(primitive, shape, dtype) of every scatter equation, sub-jaxprs included (one entry per
  call site, where the lowered text would show a shared function once)."""
  out = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name.startswith("scatter"):
        aval = e.outvars[0].aval
        out.append((e.primitive.name, tuple(aval.shape), str(aval.dtype)))
      for v in e.params.values():
        for s in v if isinstance(v, (tuple, list)) else (v,):
          if hasattr(s, "eqns"):
            walk(s)
          elif hasattr(getattr(s, "jaxpr", None), "eqns"):
            walk(s.jaxpr)
  walk(closed.jaxpr)
  return out


# (x shape, perm rank, axis): per (row, head) tokens [B, T, H, D]; a [B, H, T] vector along
# the last axis; one permutation shared by the heads; a middle axis; a plain [T, D] table.
_CASES = [((2, 9, 3, 4), 3, 1), ((2, 3, 10), 3, -1), ((2, 7, 3, 4), 2, 1), ((3, 2, 5, 6), 3, 2),
          ((11, 4), 1, 0)]


@pytest.mark.parametrize("shape, rank, axis", _CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_and_gradient_are_the_gathers(shape, rank, axis, dtype):
  kx, kp, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape).astype(dtype)
  perm = _random_perm(kp, shape[:rank], axis)
  inv = inverse_permutation(perm, axis)
  ct = jax.random.normal(kc, shape).astype(dtype)
  y0, vjp0 = jax.vjp(lambda x: _plain(x, perm, axis), x)
  y1, vjp1 = jax.vjp(lambda x: permute(x, perm, inv, axis), x)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
  np.testing.assert_array_equal(np.asarray(vjp0(ct)[0]), np.asarray(vjp1(ct)[0]))
  # Through a nonlinearity and jit, with the integer args traced too.
  loss = lambda f: lambda x, p, i: jnp.sum(jnp.sin(f(x, p, i).astype(jnp.float32)))  # noqa
  g0 = jax.jit(jax.grad(loss(lambda x, p, i: _plain(x, p, axis))))(x, perm, inv)
  g1 = jax.jit(jax.grad(loss(lambda x, p, i: permute(x, p, i, axis))))(x, perm, inv)
  np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))


@pytest.mark.parametrize("shape, rank, axis", _CASES[:3])
def test_backward_has_no_scatter(shape, rank, axis):
  x = jnp.ones(shape, jnp.bfloat16)
  perm = _random_perm(jax.random.key(1), shape[:rank], axis)
  inv = inverse_permutation(perm, axis)
  loss = lambda f: lambda x, p, i: jnp.sum(f(x, p, i).astype(jnp.float32) ** 2)  # noqa: E731
  plain = jax.jit(jax.grad(loss(lambda x, p, i: _plain(x, p, axis)))).lower(x, perm, inv)
  assert "scatter" in plain.as_text()  # what the check would catch
  ours = jax.jit(jax.grad(loss(lambda x, p, i: permute(x, p, i, axis)))).lower(x, perm, inv)
  assert "scatter" not in ours.as_text()
  # The inverse built inside: its one scatter is an integer store with unique indices.
  inner = jax.jit(jax.grad(loss(lambda x, p, i: permute(x, p, inverse_permutation(p, axis),
                                                         axis)))).lower(x, perm, inv)
  assert [u for u, _ in _scatters(inner.as_text())] == ["true"]


def test_second_derivative_is_the_gathers_and_has_no_scatter():
  x = jax.random.normal(jax.random.key(2), (2, 8, 3))
  perm = _random_perm(jax.random.key(3), (2, 8), 1)
  inv = inverse_permutation(perm, 1)
  w = jax.random.normal(jax.random.key(4), x.shape)

  def gg(f):
    g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x)) * w))
    return jax.grad(lambda x: jnp.sum(g(x) * w))
  want = gg(lambda x: _plain(x, perm, 1))(x)
  got = jax.jit(gg(lambda x: permute(x, perm, inv, 1)))
  np.testing.assert_allclose(np.asarray(got(x)), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert "scatter" not in got.lower(x).as_text()


@pytest.mark.parametrize("shape, axis", [((7,), 0), ((3, 16), 1), ((2, 13, 3), 1), ((4, 2, 9), -1),
                                         ((5, 3, 2), 0)])
def test_inverse_permutation(shape, axis):
  perm = _random_perm(jax.random.key(5), shape, axis)
  inv = inverse_permutation(perm, axis)
  np.testing.assert_array_equal(np.asarray(inv), np.asarray(jnp.argsort(perm, axis=axis)))
  iota = jax.lax.broadcasted_iota(jnp.int32, shape, axis % len(shape))
  np.testing.assert_array_equal(np.asarray(jnp.take_along_axis(perm, inv, axis=axis)), iota)
  assert inv.dtype == perm.dtype
  text = jax.jit(inverse_permutation, static_argnums=1).lower(perm, axis).as_text()
  assert "stablehlo.sort" not in text and [u for u, _ in _scatters(text)] == ["true"]


def test_one_to_one_map_of_kept_rows():
  """Slots [B, M] filled from rows [B, N] (N < M), the rest zero: the gradient of the masked
  gather, and the output side (every slot used by at most one row) back again."""
  b, n, m, d = 2, 5, 8, 3
  slot_of_row = jnp.stack([jnp.array([0, 2, 3, 6, 7]), jnp.array([1, 2, 4, 5, 6])]).astype(
      jnp.int32)  # [B, N]: row -> slot, one-to-one
  keep = jnp.zeros((b, m), bool).at[jnp.arange(b)[:, None], slot_of_row].set(True)
  row_of_slot = jnp.zeros((b, m), jnp.int32).at[jnp.arange(b)[:, None], slot_of_row].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))  # [B, M], 0 where not kept
  x = jax.random.normal(jax.random.key(6), (b, n, d))
  ct = jax.random.normal(jax.random.key(7), (b, m, d))
  plain = lambda x: jnp.where(keep[..., None], _plain(x, row_of_slot, 1), 0.0)  # noqa: E731
  ours = lambda x: permute(x, row_of_slot, slot_of_row, 1, keep=keep)  # noqa: E731
  y0, vjp0 = jax.vjp(plain, x)
  y1, vjp1 = jax.vjp(ours, x)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
  np.testing.assert_array_equal(np.asarray(vjp0(ct)[0]), np.asarray(vjp1(ct)[0]))
  # And back: slots -> rows, the backward zeroing the slots no row uses.
  back = lambda s: permute(s, slot_of_row, row_of_slot, 1, inverse_keep=keep)  # noqa: E731
  yb, vjpb = jax.vjp(back, ct)
  np.testing.assert_array_equal(np.asarray(yb), np.asarray(_plain(ct, slot_of_row, 1)))
  want = jax.vjp(lambda s: _plain(s, slot_of_row, 1), ct)[1](x)[0]
  np.testing.assert_array_equal(np.asarray(vjpb(x)[0]), np.asarray(want))


# -- the users -------------------------------------------------------------------------------

def _old_formulation(monkeypatch):
  """Both users as they were: plain gathers, routing's inverse by a second argsort."""
  plain = lambda x, perm, inverse, axis=1, **_: _plain(x, perm, axis)  # noqa: E731
  monkeypatch.setattr(sorted_chunks, "permute", plain)
  monkeypatch.setattr(routing, "permute", plain)
  monkeypatch.setattr(routing, "inverse_permutation",
                      lambda p, axis: jnp.argsort(p, axis=axis).astype(p.dtype))


def _grads(attn, x, pos, seg):
  """Gradients w.r.t. params and x of a random projection of y, and the gradient's jaxpr."""
  graph, params = nnx.split(attn)
  proj = jax.random.normal(jax.random.key(7), x.shape)

  def f(params, x):
    y, _ = nnx.merge(graph, params)(x, positions=pos, segment_ids=seg)
    return jnp.sum(y * proj)
  traced = jax.jit(jax.grad(f, argnums=(0, 1))).trace(params, x)
  lowered = traced.lower()
  return lowered.compile()(params, x), traced.jaxpr, lowered


def _packed(b, t):
  seg = np.ones((b, t), np.int32)  # ragged runs, a different cut per row
  seg[0, t // 2:] = 2
  seg[1, 5:] = 2
  seg[1, t - 7:] = 3
  return jnp.asarray(seg)


def _dynamic_mask():
  attn = build("dynamic_mask", impl="xla", num_kv_heads=2, num_heads=4,
               dynamic_mask={"block": 8, "sort_chunk": 16, "key_layout": "sorted",
                             "keep_window": 6})
  attn.A[...] = jnp.array([1.5, -2.0])  # a non-trivial key bias, so its gradient matters
  return attn


def _routing():
  return build("routing", impl="xla", routing={"num_clusters": 3, "block": 8})


# (module, gather shapes whose transposes were scatter-adds, how many): T = 37 padded to
# S = 40 keys in 8-key tiles for dynamic_mask (k and v [B, S, H_kv, D], the bias [B, H_kv, S]);
# routing's q = k, v and the un-permuted output [B, T, H_route, D] (four gathers in the
# forward, whose transposes autodiff gives as three scatter-adds of that shape).
@pytest.mark.parametrize("make, gone, packed", [
    (_dynamic_mask, {(2, 40, 2, 8): 2, (2, 2, 40): 1}, True),
    (_routing, {(2, 37, 2, 8): 3}, False),
    (_routing, {(2, 37, 2, 8): 3}, True),
], ids=["dynamic_mask_sorted_packed", "routing", "routing_packed"])
def test_users_keep_their_gradients_without_the_scatter_adds(make, gone, packed, monkeypatch):
  b, t = 2, 37  # ragged: the last tile is partial
  x, pos = random_inputs(batch=b, length=t)
  seg = _packed(b, t) if packed else None
  g1, jaxpr1, low1 = _grads(make(), x, pos, seg)
  with monkeypatch.context() as m:
    _old_formulation(m)
    g0, jaxpr0, _ = _grads(make(), x, pos, seg)
  for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c), err_msg=jax.tree_util.keystr(path))

  adds0 = [s for p, s, dt in _jaxpr_scatters(jaxpr0) if p == "scatter-add"]
  adds1 = [s for p, s, dt in _jaxpr_scatters(jaxpr1) if p == "scatter-add"]
  for shape, n in gone.items():
    assert adds0.count(shape) == n, adds0  # the old formulation had them (the check can fail)
    assert adds1.count(shape) == 0, adds1
  assert sorted(adds1) == sorted(s for s in adds0 if s not in gone)  # nothing else moved
  # The lowered program: no float scatter into those shapes either.
  for unique, ty in _scatters(low1.as_text()):
    assert not any(ty == f"tensor<{'x'.join(map(str, s))}xf32>" for s in gone), (unique, ty)


@pytest.mark.parametrize("shape,axis", [((3, 17), -1), ((2, 9, 3), 1), ((1, 1, 5), 2)])
def test_stable_partition_is_the_stable_argsort_without_a_sort(shape, axis):
  keep = jax.random.bernoulli(jax.random.key(sum(shape)), 0.4, shape)
  keep = keep.at[(0,) * (len(shape) - 1)].set(False)  # an empty row
  perm, inverse, count = stable_partition(keep, axis=axis)
  want = jnp.argsort(~keep, axis=axis, stable=True)
  np.testing.assert_array_equal(np.asarray(perm), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(inverse),
                                np.asarray(jnp.argsort(want, axis=axis)))
  np.testing.assert_array_equal(np.asarray(count), np.asarray(jnp.sum(keep, axis=axis)))
  text = jax.jit(lambda m: stable_partition(m, axis=axis)).lower(keep).as_text()
  assert not re.search(r"\bsort\b", text)
