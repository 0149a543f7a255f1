"""moh, its own oracles: MHA at K = E with uniform routers, gates and the load-balance loss
against their formulas, the router's gradient from the balance loss, routed heads only. The
common oracles (the routed kernel path included) are in test_mechanisms.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn.testing import assert_close, oracles
from effattn.testing.inputs import random_inputs
from effattn.testing.mechanisms import Jitted, build


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
  mha = build("softmax", num_kv_heads=num_kv_heads, impl=impl, seed=3)
  attn = build("moh", num_kv_heads=num_kv_heads, impl=impl, seed=4,
               moh={"num_shared_heads": shared, "top_k": 4 - shared})
  nnx.update(attn, nnx.state(mha, nnx.Param))
  _zero_routers(attn)
  x, pos = random_inputs()
  for causal in (True, False):
    want, _ = mha(x, positions=pos, causal=causal)
    got, aux = attn(x, positions=pos, causal=causal)
    assert_close(f"y causal={causal}", want, got, reduction=x.shape[1])
    assert float(aux["moh_active_fraction"]) == 1.0


@pytest.mark.parametrize("scaling", ["official", "paper"])
def test_gates_equal_formula(scaling):
  """Gates of a tiny example recomputed in numpy from the router weights."""
  h, hs, k = 6, 2, 2
  attn = build("moh", d_model=12, num_heads=h, seed=5,
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
  assert_close("gates", want, gates, reduction=h)
  assert np.all((np.asarray(gates)[..., hs:] != 0).sum(-1) == k)


def test_balance_loss_equals_formula():
  """L_b = E * sum_i f_i P_i over real tokens, times balance_weight, in aux."""
  h, hs, k = 4, 1, 2
  attn = build("moh", d_model=16, num_heads=h, seed=6,
               moh={"num_shared_heads": hs, "top_k": k, "balance_weight": 0.3})
  x, pos = random_inputs(batch=2, length=6, d_model=16)
  seg = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]], jnp.int32)
  _, aux = attn(x, positions=pos, segment_ids=seg)
  xr = np.asarray(x, np.float64)[np.asarray(seg) != 0]  # real tokens only
  p = _np_softmax(xr @ np.asarray(attn.w_routed.kernel.value, np.float64))
  chosen = np.zeros_like(p)
  np.put_along_axis(chosen, np.argsort(-p, -1)[:, :k], 1.0, axis=-1)
  e = h - hs
  want = e * np.sum(chosen.mean(0) * p.mean(0))
  assert_close("loss_moh_balance", 0.3 * want, aux["loss_moh_balance"], reduction=xr.shape[0])
  f = chosen.mean(0)
  assert_close("moh_load_imbalance", f.max() / f.mean(), aux["moh_load_imbalance"],
               reduction=xr.shape[0])
  assert_close("moh_active_fraction", (hs + k) / h, aux["moh_active_fraction"],
               reduction=xr.shape[0])


def test_balance_loss_has_router_gradient():
  attn = build("moh", moh={"num_shared_heads": 0, "top_k": 1})
  x, pos = random_inputs()

  def loss(m):
    return m(x, positions=pos, train=True)[1]["loss_moh_balance"]

  grads = nnx.grad(loss)(attn)
  assert float(jnp.abs(grads.w_routed.kernel.value).max()) > 0


def test_routed_heads_only_keep_the_common_oracles():
  """No shared heads: no two-stage mix of shared and routed outputs."""
  module = build("moh", moh={"num_shared_heads": 0, "top_k": 2})
  attn = Jitted(module)
  x, pos = random_inputs()
  oracles.check_causality(attn, x, pos)
  oracles.check_decode_matches_forward(attn, x, pos, prompt_len=5)
  oracles.check_segments_isolated(attn, x)
  oracles.check_segments_isolated(attn, x, causal=False)
  oracles.check_gradients_finite(module, x, pos)


@pytest.mark.parametrize("opts,match", [
    ({"num_shared_heads": 5}, "num_shared_heads"),
    ({"num_shared_heads": 2, "top_k": 3}, "top_k"),
    ({"scaling": "softmax"}, "scaling"),
])
def test_bad_options_named(opts, match):
  with pytest.raises(ValueError, match=match):
    build("moh", moh=opts)


def test_gqa_group_must_not_straddle_shared_and_routed():
  with pytest.raises(ValueError, match="multiple of"):
    build("moh", num_kv_heads=2, moh={"num_shared_heads": 1})


def test_window_rejected():
  with pytest.raises(ValueError, match="window"):
    build("moh", window=4)
