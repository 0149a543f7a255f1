"""The common oracles of every registered mechanism, parametrized over attention.names().

A mechanism is covered as soon as it registers: each is built from configs/base.py at the tiny
size of effattn/testing/mechanisms.py (its DEFAULTS updated by its TINY options) and checked
for causality (bit-exact on the reference path), decode equal to the forward pass (token by
token and after a prompt), packed segments isolated and padding inert, finite non-zero
gradients for every parameter, its xla path equal to its reference path, and, where an op of
it has a Pallas kernel, that kernel (interpreted on CPU as on a GPU or TPU) equal to the
reference path, forward and gradients, with the kernel found in the lowered program. Each
mechanism's own oracles (its paper's formulas) live in tests/attention/test_<name>.py.

A mixed stack (effattn.testing.mechanisms.MIXED_PATTERN) gets the oracles that apply to a
model: causality, decode equal to the forward pass, packed segments, and the trainer's step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effattn import attention
from effattn.config import validate
from effattn.kernels import dispatch
from effattn.model import Transformer
from effattn.testing import assert_close, assert_trees_close, inputs, kernels, oracles
from effattn.testing import mechanisms as mech
from effattn.train.optimizer import make_optimizer
from effattn.train.state import create
from effattn.train.step import make_train_step

NAMES = attention.names()
KERNEL_CASES = [(name, p) for name in NAMES for p in mech.kernel_platforms(name)]
B, T = 2, 32
# Segments start at 0 and 16: whole chunks of the chunked mechanisms (16 tokens), whose
# mini-batch updates are exact only at chunk starts; the last 3 tokens are padding.
CUT, PAD = 16, 3


def tiny_config(name: str, impl: str):
  config = mech.tiny_model(name)
  config.model.attention.impl = impl
  config.model.vocab_size = 32
  validate(config)
  return config


def tiny_module(name: str, impl: str = "reference"):
  attn = tiny_config(name, impl).model.attention
  return attention.build(attn, d_model=mech.D_MODEL, num_heads=mech.NUM_HEADS, rngs=nnx.Rngs(0))


def tiny_inputs(seed: int = 1):
  return inputs.random_inputs(B, T, mech.D_MODEL, seed=seed)


@pytest.mark.parametrize("name", NAMES)
def test_base_config_validates_and_builds_the_model(name):
  config = tiny_config(name, "auto")
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  assert nnx.state(model, nnx.Param), name
  module = tiny_module(name, "auto")
  x, pos = tiny_inputs()
  y, aux = jax.eval_shape(lambda x: module(x, positions=pos), x)
  assert (y.shape, y.dtype) == (x.shape, x.dtype)
  assert all(v.shape == () for v in jax.tree.leaves(aux)), f"aux must hold scalars: {aux}"


@pytest.mark.parametrize("name", NAMES)
def test_causal_bit_exact_on_the_reference_path(name):
  x, pos = tiny_inputs()
  oracles.check_causality(mech.Jitted(tiny_module(name)), x, pos, t=T // 2 - 3)


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_the_forward_pass(name):
  module = mech.Jitted(tiny_module(name))
  x, pos = tiny_inputs()
  oracles.check_decode_matches_forward(module, x, pos)  # token by token from an empty cache
  oracles.check_decode_matches_forward(module, x, pos, prompt_len=11)  # prefill, then steps


SEGMENT_CASES = [(name, causal) for name in NAMES for causal in (True, False)
                 if causal or not attention.get(name).CAUSAL_ONLY]
SEGMENT_IDS = [f"{n}-{'causal' if c else 'bidirectional'}" for n, c in SEGMENT_CASES]


@pytest.mark.parametrize("name,causal", SEGMENT_CASES, ids=SEGMENT_IDS)
def test_packed_segments_isolated_and_padding_inert(name, causal):
  x, _ = tiny_inputs()
  oracles.check_segments_isolated(mech.Jitted(tiny_module(name)), x, cut=CUT, pad=PAD,
                                  causal=causal)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_finite_gradient(name):
  x, pos = tiny_inputs()
  oracles.check_gradients_finite(tiny_module(name, "auto"), x, pos)


def _loss_and_grads(module, params, x, pos, seg, cot):
  """(y, loss terms, grads of params, grad of x) of <y, cot> + loss_* aux, in one jit."""
  graphdef, _, rest = mech.params_and_rest(module)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest, copy=True)(x, positions=pos, segment_ids=seg)
    terms = mech.loss_terms(aux)
    return jnp.vdot(y, cot) + terms, (y, terms)

  fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  lowered = fn.lower(params, x)
  (g_params, g_x), (y, terms) = lowered.compile()(params, x)
  return (y, terms, g_params, g_x), lowered


def _packed_inputs():
  x, _ = tiny_inputs(seed=2)
  seg, pos = oracles.packed_layout(B, T, CUT, PAD)
  cot = jax.random.normal(jax.random.key(5), x.shape, x.dtype)
  return x, pos, seg, cot


@functools.cache
def _reference(name):
  """The reference path's outputs and gradients on packed inputs (once per worker)."""
  module = tiny_module(name, "reference")
  params = mech.params_and_rest(module)[1]
  out, _ = _loss_and_grads(module, params, *_packed_inputs())
  return params, out


def _assert_equals_reference(name, got):
  _, want = _reference(name)
  for label, w, g in zip(("y", "loss terms"), want[:2], got[:2]):
    assert_close(label, w, g, reduction=T)
  assert_trees_close("grad", want[2], got[2], reduction=T)
  assert_close("grad x", want[3], got[3], reduction=T)


@pytest.mark.parametrize("name", NAMES)
def test_xla_path_equals_the_reference_path(name):
  params, _ = _reference(name)
  got, _ = _loss_and_grads(tiny_module(name, "xla"), params, *_packed_inputs())
  _assert_equals_reference(name, got)


@pytest.mark.parametrize("name,platform", KERNEL_CASES,
                         ids=[f"{n}-pallas_{p}" for n, p in KERNEL_CASES])
def test_pallas_kernels_equal_the_reference_path(name, platform, monkeypatch):
  """As on a GPU / TPU: "auto" picks the platform's kernels, run here in the interpreter."""
  chosen = []
  choose = dispatch.Family.choose

  def spy(family, impl, **kwargs):
    choice = choose(family, impl, **kwargs)
    chosen.append((family.op, choice))
    return choice

  monkeypatch.setattr(dispatch.Family, "choose", spy)
  params, _ = _reference(name)
  with dispatch.interpret_kernels(platform):
    got, lowered = _loss_and_grads(tiny_module(name, "auto"), params, *_packed_inputs())
  cls = attention.get(name)
  for op in cls.OPS:
    if any(p.is_pallas and p.platform == platform for p in dispatch.family(op).paths):
      paths = {c for o, c in chosen if o == op}
      assert (f"pallas_{platform}", True) in paths, f"{op} ran {paths}, not its kernel"
  names = kernels.lowered_pallas_names(lowered)
  assert names, "no pallas_call in the lowered program"
  _assert_equals_reference(name, got)


# ------------------------------------------------------------------ a mixed stack (issue 20)
# mech.MIXED_PATTERN (lightning, sliding-window MQA softmax, Gated DeltaNet) at the suite's tiny
# size, its blocks checked through mech.Stack by the same oracles as one mechanism.


@functools.cache
def mixed_model():
  """The mixed stack on the reference path (the plainest program, the fastest to compile) and
  its config, built once per worker (no layer of it has state a call changes)."""
  config = mech.tiny_mixed_model()
  config.model.attention.impl = "reference"
  config.model.vocab_size = 32
  validate(config)
  return Transformer(config.model, rngs=nnx.Rngs(0)), config


def test_mixed_stack_is_causal_bit_exact_on_the_reference_path():
  model, _ = mixed_model()
  assert [type(b.attn).registered_name for b in model.blocks] == [
      "lightning", "softmax", "gated_deltanet"]
  x, pos = tiny_inputs()
  oracles.check_causality(mech.Jitted(mech.Stack(model)), x, pos, t=T // 2 - 3)


def test_mixed_stack_decodes_like_its_forward_pass():
  stack = mech.Jitted(mech.Stack(mixed_model()[0]))
  x, pos = tiny_inputs()
  oracles.check_decode_matches_forward(stack, x, pos)  # every layer with its own cache
  oracles.check_decode_matches_forward(stack, x, pos, prompt_len=11)


def test_mixed_stack_packed_segments_isolated_and_padding_inert():
  x, _ = tiny_inputs()
  oracles.check_segments_isolated(mech.Jitted(mech.Stack(mixed_model()[0])), x, cut=CUT,
                                  pad=PAD)


def test_mixed_stack_train_step_updates_every_parameter():
  """The trainer's jitted step on a packed, padded batch: a finite loss, every parameter of
  every layer updated, every mechanism's aux terms logged."""
  model, config = mixed_model()
  tx, schedule = make_optimizer(config.optimizer, total_steps=10)
  graphdef, state = create(model, tx)
  seg, pos = oracles.packed_layout(B, T, CUT, PAD)
  tokens = jax.random.randint(jax.random.key(3), (B, T), 1, 32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "segment_ids": seg,
           "positions": pos, "weights": (seg > 0).astype(jnp.float32)}
  step = jax.jit(make_train_step(graphdef, tx, schedule))
  new_state, metrics = step(*step(state, batch)[:1], batch)  # step 0 warms up at rate 0
  assert np.isfinite(float(metrics["loss"]))
  before = jax.tree_util.tree_leaves_with_path(state.params)
  after = jax.tree.leaves(new_state.params)
  unchanged = [jax.tree_util.keystr(p) for (p, x), y in zip(before, after)
               if jnp.array_equal(x, y)]
  assert not unchanged, f"parameters without an update: {unchanged}"
  assert {"aux/delta_write", "aux/delta_log_decay"} <= set(metrics), sorted(metrics)
