"""Oracles every attention mechanism must satisfy (../shared/mechanisms.md, common oracles).

Each helper takes a built module and inputs and asserts; mechanism tests call them.
    x: [B, T, d_model] float32, positions: [B, T] int32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from effattn.attention import registry


def attention_config(name: str, **fields) -> ml_collections.ConfigDict:
  """An attention config like configs/base.py builds, with `fields` overriding.

  Mechanism options go in a nested dict under the mechanism's name, e.g.
  attention_config("linear", linear={"feature_map": "relu"}).
  """
  cfg = {"name": name, "num_kv_heads": None, "head_dim": None, "window": None, "impl": "reference"}
  cfg.update(fields)
  return ml_collections.ConfigDict(cfg)


def build(name: str, *, d_model: int = 32, num_heads: int = 4, seed: int = 0, **fields):
  return registry.build(attention_config(name, **fields), d_model=d_model, num_heads=num_heads,
                        rngs=nnx.Rngs(seed))


def random_inputs(batch: int = 2, length: int = 12, d_model: int = 32, seed: int = 1):
  x = jax.random.normal(jax.random.key(seed), (batch, length, d_model), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return x, positions


def check_causality(module, x, positions, *, t: int | None = None, atol: float = 0.0):
  """Perturbing x[:, t+1:] leaves y[:, :t+1] unchanged (bit-exact by default)."""
  t = x.shape[1] // 2 if t is None else t
  y, _ = module(x, positions=positions, causal=True)
  noise = jax.random.normal(jax.random.key(123), x.shape, x.dtype)
  x2 = x.at[:, t + 1:].add(noise[:, t + 1:] * 3.0)
  y2, _ = module(x2, positions=positions, causal=True)
  np.testing.assert_allclose(np.asarray(y2[:, :t + 1]), np.asarray(y[:, :t + 1]), rtol=0,
                             atol=atol, err_msg="future tokens changed past outputs")
  assert not np.allclose(np.asarray(y2[:, t + 1:]), np.asarray(y[:, t + 1:])), \
      "outputs after t did not react to their inputs at all"


def check_decode_matches_forward(module, x, positions, *, prompt_len: int = 0,
                                 rtol: float = 1e-4, atol: float = 1e-4):
  """Prefill `prompt_len` tokens in one call, then decode one token at a time: equals forward."""
  y_full, _ = module(x, positions=positions, causal=True)
  b, t, _ = x.shape
  cache = module.init_cache(b, t, x.dtype)
  outs = []
  start = 0
  if prompt_len:
    y, cache = module.decode(x[:, :prompt_len], positions=positions[:, :prompt_len], cache=cache)
    outs.append(y)
    start = prompt_len
  for i in range(start, t):
    y, cache = module.decode(x[:, i:i + 1], positions=positions[:, i:i + 1], cache=cache)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(y_full),
                             rtol=rtol, atol=atol, err_msg="decode differs from the forward pass")


def check_segments_isolated(module, x, positions=None, *, rtol: float = 1e-5, atol: float = 1e-5,
                            causal: bool = True):
  """Two packed segments (plus padding) give the same outputs as each run alone."""
  b, t, _ = x.shape
  cut = t // 2
  pad = 2
  seg = np.zeros((b, t), np.int32)
  seg[:, :cut] = 1
  seg[:, cut:t - pad] = 2
  pos = np.zeros((b, t), np.int32)
  pos[:, :cut] = np.arange(cut)
  pos[:, cut:t - pad] = np.arange(t - pad - cut)
  y, _ = module(x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg), causal=causal)
  y1, _ = module(x[:, :cut], positions=jnp.asarray(pos[:, :cut]), causal=causal)
  y2, _ = module(x[:, cut:t - pad], positions=jnp.asarray(pos[:, cut:t - pad]), causal=causal)
  np.testing.assert_allclose(np.asarray(y[:, :cut]), np.asarray(y1), rtol=rtol, atol=atol,
                             err_msg="segment 1 saw other tokens")
  np.testing.assert_allclose(np.asarray(y[:, cut:t - pad]), np.asarray(y2), rtol=rtol, atol=atol,
                             err_msg="segment 2 saw other tokens")
  # Padding content must not leak into real tokens.
  x_pad = x.at[:, t - pad:].set(100.0)
  y_pad, _ = module(x_pad, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg), causal=causal)
  np.testing.assert_allclose(np.asarray(y_pad[:, :t - pad]), np.asarray(y[:, :t - pad]),
                             rtol=rtol, atol=atol, err_msg="padding influenced real tokens")


def check_gradients_finite(module, x, positions):
  """Gradients w.r.t. params and inputs exist and are finite."""

  def loss(m, x):
    y, aux = m(x, positions=positions, causal=True, train=True)
    return jnp.mean(y ** 2) + sum(v for k, v in aux.items() if k.startswith("loss_"))

  grads = nnx.grad(loss, argnums=(0, 1))(module, x)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf))), "non-finite gradient"
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[0])), "all-zero grads"
