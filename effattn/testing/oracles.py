"""The oracles every attention mechanism satisfies (the common oracles of the mechanism spec).

Each check takes a built module (or a `mechanisms.Jitted` one) and inputs, and asserts:
    x: [B, T, d_model] float32, positions: [B, T] int32.
Comparisons go through `tolerances.assert_close` with the sequence length as the reduction (the
paths compared differ in how they sum over tokens); `exact=True` asks for bit-equality.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effattn.testing.mechanisms import loss_terms, params_and_rest, perturb_params
from effattn.testing.tolerances import assert_close


def _same(name: str, want, got, *, exact: bool, reduction: int) -> None:
  if exact:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
  else:
    assert_close(name, want, got, reduction=reduction)


def check_causality(module, x, positions, *, t: int | None = None, exact: bool = True):
  """Perturbing x[:, t+1:] leaves y[:, :t+1] unchanged (bit-exact unless exact=False), and the
  outputs after t do react."""
  t = x.shape[1] // 2 if t is None else t
  y, _ = module(x, positions=positions, causal=True)
  noise = jax.random.normal(jax.random.key(123), x.shape, x.dtype)
  x2 = x.at[:, t + 1:].add(noise[:, t + 1:] * 3.0)
  y2, _ = module(x2, positions=positions, causal=True)
  _same("outputs up to t after perturbing the future", y[:, :t + 1], y2[:, :t + 1], exact=exact,
        reduction=x.shape[1])
  assert not np.allclose(np.asarray(y2[:, t + 1:]), np.asarray(y[:, t + 1:])), \
      "outputs after t did not react to their inputs at all"


def check_decode_matches_forward(module, x, positions, *, prompt_len: int = 0):
  """Prefill `prompt_len` tokens in one call (none: from an empty cache), then decode one token
  at a time: the outputs equal the causal forward pass."""
  y_full, _ = module(x, positions=positions, causal=True)
  b, t, _ = x.shape
  cache = module.init_cache(b, t, x.dtype)
  outs = []
  if prompt_len:
    y, cache = module.decode(x[:, :prompt_len], positions=positions[:, :prompt_len], cache=cache)
    outs.append(y)
  for i in range(prompt_len, t):
    y, cache = module.decode(x[:, i:i + 1], positions=positions[:, i:i + 1], cache=cache)
    outs.append(y)
  assert_close(f"decode after a prompt of {prompt_len}", y_full, jnp.concatenate(outs, axis=1),
               reduction=t)


def check_decode_in_chunks(module, x, positions, chunks, *, max_len: int | None = None):
  """Decode x in consecutive calls of `chunks` tokens each (prefill chunks of any size), then
  the rest one token at a time, into a cache of `max_len` slots (None: T): the outputs equal
  the causal forward pass."""
  y_full, _ = module(x, positions=positions, causal=True)
  b, t, _ = x.shape
  cache = module.init_cache(b, t if max_len is None else max_len, x.dtype)
  cuts = np.cumsum([0, *chunks])
  cuts = [*cuts, *range(int(cuts[-1]) + 1, t + 1)]
  outs = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    y, cache = module.decode(x[:, lo:hi], positions=positions[:, lo:hi], cache=cache)
    outs.append(y)
  assert_close(f"decode in chunks {tuple(chunks)}", y_full, jnp.concatenate(outs, axis=1),
               reduction=t)
  return cache


def packed_layout(b: int, t: int, cut: int, pad: int):
  """Every row: segment 1 at [0, cut), segment 2 at [cut, t - pad), then padding (segment 0);
  positions restart at each segment. Returns (segment_ids, positions) [B, T] int32."""
  seg = np.zeros((b, t), np.int32)
  seg[:, :cut] = 1
  seg[:, cut:t - pad] = 2
  pos = np.zeros((b, t), np.int32)
  pos[:, :cut] = np.arange(cut)
  pos[:, cut:t - pad] = np.arange(t - pad - cut)
  return jnp.asarray(seg), jnp.asarray(pos)


def check_segments_isolated(module, x, *, cut: int | None = None, pad: int = 2,
                            causal: bool = True):
  """Two packed segments plus padding give the outputs each segment gives alone, and the
  padding's content does not reach the real tokens."""
  b, t, _ = x.shape
  cut = t // 2 if cut is None else cut
  seg, pos = packed_layout(b, t, cut, pad)
  y, _ = module(x, positions=pos, segment_ids=seg, causal=causal)
  y1, _ = module(x[:, :cut], positions=pos[:, :cut], causal=causal)
  y2, _ = module(x[:, cut:t - pad], positions=pos[:, cut:t - pad], causal=causal)
  assert_close("segment 1 packed vs alone", y1, y[:, :cut], reduction=t)
  assert_close("segment 2 packed vs alone", y2, y[:, cut:t - pad], reduction=t)
  y_pad, _ = module(x.at[:, t - pad:].set(100.0), positions=pos, segment_ids=seg, causal=causal)
  assert_close("real tokens with other padding", y[:, :t - pad], y_pad[:, :t - pad], reduction=t)


def check_gradients_finite(module, x, positions, *, segment_ids=None, perturb: float = 0.05):
  """Training-mode gradients are finite for x and every parameter, and no parameter's is zero
  (each parameter reaches the loss: outputs and the `loss_*` aux terms).

  The gradients are taken at the parameters plus `perturb` * N(0, 1) noise: a zero-initialized
  parameter (a gate's scale) stops the gradient of the ones it multiplies at init only, while
  an unwired parameter gets none anywhere."""
  graphdef, params, rest = params_and_rest(perturb_params(nnx.clone(module), perturb, seed=11))
  cot = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

  def loss(params, x):
    model = nnx.merge(graphdef, params, rest, copy=True)  # train mode updates its state
    y, aux = model(x, positions=positions, segment_ids=segment_ids, causal=True, train=True)
    return jnp.vdot(y.astype(jnp.float32), cot) + loss_terms(aux)

  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert np.all(np.isfinite(np.asarray(g_x))) and np.any(np.asarray(g_x) != 0), "grad of x"
  for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0]:
    name = jax.tree_util.keystr(path)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), f"non-finite gradient of {name}"
    assert np.any(g != 0), f"zero gradient of {name}: the parameter does not reach the loss"
