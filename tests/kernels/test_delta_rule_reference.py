"""delta_rule's oracles: the recurrence against the paper's literal update, the closed form, the
spec's oracles (b = 0 only decays; a = b = 1 with orthonormal keys recalls exactly), the decode
step, and the chunked path carried across calls."""

import jax
import jax.numpy as jnp
import numpy as np

from effattn.kernels.delta_rule import delta_rule, delta_rule_step, reference
from tests.kernels.delta_rule_test_base import assert_close, make_inputs


def test_recurrence_is_the_papers():
  """S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T with S [Dv, Dk], o_t = S_t q_t, in
  float64 numpy; our state is its transpose."""
  (q, k, v, g, beta, s0), _, _ = make_inputs("literal", 1, 9, 1, 5, 3, dtype=jnp.float32,
                                             gate=-0.4, segments=False, state=True)
  qn, kn, vn, gn, bn = (np.asarray(x[0, :, 0], np.float64) for x in (q, k, v, g, beta))
  s = np.asarray(s0[0, 0], np.float64).T
  want = []
  for t in range(9):
    s = (np.exp(gn[t]) * s @ (np.eye(5) - bn[t] * np.outer(kn[t], kn[t]))
         + bn[t] * np.outer(vn[t], kn[t]))
    want.append(s @ qn[t] * 5 ** -0.5)
  o, final = reference.recurrent(q, k, v, g, beta, initial_state=s0)
  np.testing.assert_allclose(np.asarray(o[0, :, 0]), np.stack(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final[0, 0]), s.T, rtol=1e-5, atol=1e-6)


def test_closed_form_equals_recurrence_forward_and_gradients():
  args, seg, cts = make_inputs("closed", 2, 14, 1, 6, 5, dtype=jnp.float32, gate=-0.5,
                               segments=True, state=True)

  @jax.jit
  def both(args, cts):
    out = []
    for form in (reference.recurrent, reference.quadratic):
      f = lambda *a, form=form: form(*a[:5], initial_state=a[5], segment_ids=seg)
      o, vjp = jax.vjp(f, *args)
      out.append(o + vjp(cts))
    return out
  rec, quad = both(args, cts)
  for name, a, b in zip(("o", "final", "dq", "dk", "dv", "dg", "dbeta", "ds0"), rec, quad):
    assert_close(name, a, b, jnp.float32)


def test_no_write_only_decays():
  """b = 0: the state only decays, S_t = e^{G_t} S0, o_t = scale q_t e^{G_t} S0."""
  (q, k, v, g, beta, s0), _, _ = make_inputs("nowrite", 1, 7, 2, 4, 3, dtype=jnp.float32,
                                             gate=-0.3, segments=False, state=True)
  o, final = jax.jit(reference.recurrent, static_argnames="scale")(
      q, k, v, g, jnp.zeros_like(beta), initial_state=s0, scale=1.0)
  decay = jnp.exp(jnp.cumsum(g, axis=1))                                     # [B, T, H]
  want = decay[..., None] * jnp.einsum("bthk,bhkv->bthv", q, s0)
  assert_close("o", want, o, jnp.float32)
  assert_close("final", decay[:, -1][..., None, None] * s0, final, jnp.float32)


def test_full_writes_recall_orthonormal_keys():
  """a = b = 1 and one-hot keys: reading key j returns the last value written to it, exactly,
  on the chunked path too."""
  t, d = 12, 4
  which = np.array([0, 1, 2, 1, 3, 0, 2, 2, 1, 3, 0, 1])
  k = jnp.asarray(np.eye(d, dtype=np.float32)[which])[None, :, None]        # [1, T, 1, D]
  v = jnp.asarray(np.random.default_rng(0).standard_normal((1, t, 1, 3)), jnp.float32)
  ones, zeros = jnp.ones((1, t, 1)), jnp.zeros((1, t, 1))
  for impl in ("reference", "xla"):
    o, _ = delta_rule(k, k, v, zeros, ones, scale=1.0, impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(o), np.asarray(v), atol=1e-6, err_msg=impl)
  # Querying key 2 after the whole sequence returns its last value (token 7).
  _, final = delta_rule(k, k, v, zeros, ones, impl="xla", chunk_size=5)
  np.testing.assert_allclose(np.asarray(final[0, 0, 2]), np.asarray(v[0, 7, 0]), atol=1e-6)


def test_decode_steps_equal_the_sequence():
  (q, k, v, g, beta, s0), _, _ = make_inputs("steps", 2, 6, 2, 8, 4, dtype=jnp.float32,
                                             gate=-0.2, segments=False, state=True)

  @jax.jit
  def both(q, k, v, g, beta, s0):
    state, outs = s0, []
    for t in range(6):
      o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
      outs.append(o_t)
    return reference.recurrent(q, k, v, g, beta, initial_state=s0), (jnp.stack(outs, 1), state)
  (o, final), (o_steps, state) = both(q, k, v, g, beta, s0)
  assert_close("o", o, o_steps, jnp.float32)
  assert_close("state", final, state, jnp.float32)


def test_state_carries_across_calls():
  """Two chunked calls chained through the state equal one call on the concatenation."""
  (q, k, v, g, beta, _), _, _ = make_inputs("carry", 1, 26, 2, 8, 8, dtype=jnp.float32,
                                            gate=-0.2, segments=False, state=False)
  cut = 13  # two calls of one shape: one compile for both
  run = lambda sl, s0=None: delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                       initial_state=s0, impl="xla", chunk_size=8)
  o_full, s_full = run(slice(None))
  o1, s1 = run(slice(0, cut))
  o2, s2 = run(slice(cut, None), s1)
  assert_close("o", o_full, jnp.concatenate([o1, o2], 1), jnp.float32)
  assert_close("final_state", s_full, s2, jnp.float32)
