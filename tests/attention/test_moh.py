"""moh: MHA at K = E with uniform routers, gates and load-balance loss against their formulas,
the routed kernel path inside the module, and the common oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.attention import moh
from effattn.kernels.head_routing import api as head_routing_api
from tests.attention import oracles


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _zero_routers(attn):
  for name in ("w_routed", "w_shared", "w_mix"):
    layer = getattr(attn, name)
    if layer is not None:
      layer.kernel.value = jnp.zeros_like(layer.kernel.value)


@pytest.mark.parametrize("impl,shared,num_kv_heads", [
    ("reference", 2, None), ("reference", 0, None), ("reference", 1, None), ("xla", 2, 2)])
def test_full_top_k_with_uniform_routers_equals_mha(impl, shared, num_kv_heads):
  """Oracle: K = E and uniform router logits give every gate 1 (official scaling): MHA/GQA."""
  mha = oracles.build("softmax", num_kv_heads=num_kv_heads, impl=impl, seed=3)
  attn = oracles.build("moh", num_kv_heads=num_kv_heads, impl=impl, seed=4,
                       moh={"num_shared_heads": shared, "top_k": 4 - shared})
  nnx.update(attn, nnx.state(mha, nnx.Param))
  _zero_routers(attn)
  x, pos = oracles.random_inputs()
  for causal in (True, False):
    want, _ = mha(x, positions=pos, causal=causal)
    got, aux = attn(x, positions=pos, causal=causal)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(aux["moh_active_fraction"]) == 1.0


@pytest.mark.parametrize("scaling", ["official", "paper"])
def test_gates_equal_formula(scaling):
  """Gates of a tiny example recomputed in numpy from the router weights."""
  h, hs, k = 6, 2, 2
  attn = oracles.build("moh", d_model=12, num_heads=h, seed=5,
                       moh={"num_shared_heads": hs, "top_k": k, "scaling": scaling})
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 12)), np.float64)
  gates, _ = attn.route(jnp.asarray(x, jnp.float32))
  w = {n: np.asarray(getattr(attn, n).kernel.value, np.float64)
       for n in ("w_routed", "w_shared", "w_mix")}
  pr, ps, alpha = _np_softmax(x @ w["w_routed"]), _np_softmax(x @ w["w_shared"]), _np_softmax(
      x @ w["w_mix"])
  top = np.argsort(-pr, axis=-1)[..., :k]
  chosen = np.zeros_like(pr)
  np.put_along_axis(chosen, top, 1.0, axis=-1)
  routed = pr * chosen
  shared = ps
  if scaling == "official":
    routed = routed / routed.sum(-1, keepdims=True) * k
    shared = shared * hs
    alpha = alpha * 2
  want = np.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], -1)
  np.testing.assert_allclose(np.asarray(gates), want, rtol=1e-5, atol=1e-6)
  assert np.all((np.asarray(gates)[..., hs:] != 0).sum(-1) == k)


def test_balance_loss_equals_formula():
  """L_b = E * sum_i f_i P_i over real tokens, times balance_weight, in aux."""
  h, hs, k = 4, 1, 2
  attn = oracles.build("moh", d_model=16, num_heads=h, seed=6,
                       moh={"num_shared_heads": hs, "top_k": k, "balance_weight": 0.3})
  x, pos = oracles.random_inputs(batch=2, length=6, d_model=16)
  seg = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]], jnp.int32)
  _, aux = attn(x, positions=pos, segment_ids=seg)
  xr = np.asarray(x, np.float64)[np.asarray(seg) != 0]  # real tokens only
  p = _np_softmax(xr @ np.asarray(attn.w_routed.kernel.value, np.float64))
  chosen = np.zeros_like(p)
  np.put_along_axis(chosen, np.argsort(-p, -1)[:, :k], 1.0, axis=-1)
  e = h - hs
  want = e * np.sum(chosen.mean(0) * p.mean(0))
  np.testing.assert_allclose(float(aux["loss_moh_balance"]), 0.3 * want, rtol=1e-5)
  f = chosen.mean(0)
  np.testing.assert_allclose(float(aux["moh_load_imbalance"]), f.max() / f.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["moh_active_fraction"]), (hs + k) / h, rtol=1e-6)


def test_balance_loss_has_router_gradient():
  attn = oracles.build("moh", moh={"num_shared_heads": 0, "top_k": 1})
  x, pos = oracles.random_inputs()

  def loss(m):
    return m(x, positions=pos, train=True)[1]["loss_moh_balance"]

  grads = nnx.grad(loss)(attn)
  assert float(jnp.abs(grads.w_routed.kernel.value).max()) > 0


@pytest.mark.parametrize("fields", [
    {"num_kv_heads": 2, "moh": {"num_shared_heads": 2, "top_k": 1, "scaling": "paper"}},
    {"moh": {"num_shared_heads": 0, "top_k": 2}},  # routed heads only, no two-stage mix
])
def test_moh_module_oracles(fields):
  attn = oracles.build("moh", **fields)
  x, pos = oracles.random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_segments_isolated(attn, x, causal=False)
  oracles.check_gradients_finite(attn, x, pos)


def test_routed_kernel_path_equals_reference(monkeypatch):
  """The whole layer with its routed heads on the Pallas kernel (interpret) = reference path."""
  monkeypatch.setattr(moh, "head_routed_attention",
                      functools.partial(head_routing_api.head_routed_attention, interpret=True))
  fields = dict(d_model=64, num_heads=4, seed=7,
                moh={"num_shared_heads": 1, "top_k": 2, "block_q": 16, "block_k": 16})
  ref = oracles.build("moh", impl="reference", **fields)
  fast = oracles.build("moh", impl="pallas", **fields)
  x, pos = oracles.random_inputs(batch=1, length=24, d_model=64)
  seg = jnp.asarray([[1] * 10 + [2] * 12 + [0] * 2], jnp.int32)

  def run(m, x):
    y, aux = m(x, positions=pos, segment_ids=seg)
    return y, aux["loss_moh_balance"]

  (y_r, l_r), vjp_r = jax.vjp(run, ref, x)
  (y_f, l_f), vjp_f = jax.vjp(run, fast, x)
  np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_r), atol=2e-5)
  cot = (jax.random.normal(jax.random.key(9), y_r.shape), jnp.ones(()))
  g_r, g_f = vjp_r(cot), vjp_f(cot)
  for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_f)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5)


@pytest.mark.parametrize("opts,match", [
    ({"num_shared_heads": 5}, "num_shared_heads"),
    ({"num_shared_heads": 2, "top_k": 3}, "top_k"),
    ({"scaling": "softmax"}, "scaling"),
])
def test_bad_options_named(opts, match):
  with pytest.raises(ValueError, match=match):
    oracles.build("moh", moh=opts)


def test_gqa_group_must_not_straddle_shared_and_routed():
  with pytest.raises(ValueError, match="multiple of"):
    oracles.build("moh", num_kv_heads=2, moh={"num_shared_heads": 1})


def test_window_rejected():
  with pytest.raises(ValueError, match="window"):
    oracles.build("moh", window=4)
