"""model.pattern (hybrid stacks): parsing and its errors, the default's unchanged param tree, a
mixed stack that trains, is causal and decodes like its forward pass, and its checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from effattn.config import ConfigError, validate
from effattn.evaluate.runner import restore_model
from effattn.model import Transformer, pattern
from effattn.testing.mechanisms import MIXED_PATTERN as MIXED  # the mechanism suite's stack
from effattn.train import checkpoint as ckpt_lib
from effattn.train.optimizer import make_optimizer
from effattn.train.state import create


def tiny_config(pattern_text: str = "", num_layers: int = 3):
  config = base.get_config()
  m = config.model
  m.vocab_size, m.d_model, m.num_heads, m.num_layers, m.mlp = 40, 32, 2, num_layers, "none"
  m.attention.impl = "xla"
  m.pattern = pattern_text
  config.data.seq_len = 16
  config.data.mqar.num_pairs = 2
  return config


def layer_names(model):
  return [type(block.attn).registered_name for block in model.blocks]


def test_pattern_repeats_and_entries_override_only_themselves():
  config = tiny_config("2*lightning:decay=none,softmax:window=8:num_kv_heads=1", num_layers=6)
  config.model.attention.lightning.scale = 0.5
  validate(config)
  layers = pattern.layer_attention(config.model)
  assert [a["name"] for a in layers] == ["lightning", "lightning", "softmax"] * 2
  assert layers[0]["lightning"] == {**config.model.attention.lightning.to_dict(), "decay": "none"}
  assert layers[2]["window"] == 8 and layers[2]["num_kv_heads"] == 1
  assert layers[0]["window"] is None and layers[0]["impl"] == "xla"  # model.attention's own
  assert config.model.attention.lightning.decay == "tnl"  # the section itself is untouched
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  assert layer_names(model) == ["lightning", "lightning", "softmax"] * 2
  assert [b.attn.window for b in model.blocks] == [None, None, 8] * 2
  assert model.blocks[0].attn.opts.decay == "none" and model.blocks[0].attn.opts.scale == 0.5
  # Values are typed by the field's default: tuples, booleans, floats, `none`.
  (entry,) = pattern.parse("lightning:log_decay=(-1,-2.5):scale=2:num_kv_heads=none")
  assert dict(entry.options) == {"log_decay": (-1, -2.5), "scale": 2.0}
  assert dict(entry.shared) == {"num_kv_heads": None}
  assert pattern.describe(config.model) == "2*lightning:decay=none,softmax:window=8:num_kv_heads=1"
  assert pattern.describe(tiny_config().model) == "softmax"


@pytest.mark.parametrize("text,match", [
    ("lightnin,softmax", r"^model.pattern entry 'lightnin': unknown attention mechanism "
                         r"'lightnin'; registered: .*lightning"),
    ("lightning*3", r"write the count first"),
    ("lightning,softmax", r"^model.num_layers=3 is not a multiple of the 2 layers of "
                          r"model.pattern='lightning,softmax'"),
    ("lightning,,softmax,", r"has an empty entry"),
    ("0*softmax,softmax,softmax", r"count before '\*' must be a positive integer"),
    ("3*softmax:windw=4", r"^model.pattern entry '3\*softmax:windw=4': softmax has no field "
                          r"'windw'.*shared: num_kv_heads, head_dim, window, impl"),
    ("3*softmax:window", r"'window' must look like field=value"),
    ("3*softmax:window=big", r"window='big' must be an integer or none"),
    ("3*softmax:window=0", r"^model.pattern entry '3\*softmax:window=0': "
                           r"model.attention.window=0 must be"),
    ("2*softmax,lightning:window=4", r"^model.pattern entry 'lightning:window=4': "
                                     r"model.attention.window=4 is not supported by lightning"),
    ("2*softmax,lightning:scale=0", r"model.attention.lightning.scale=0.0 must be"),
    ("2*softmax,lightning:decay=fast", r"model.attention.lightning.decay='fast' must be one of"),
    ("2*softmax,softmax:num_kv_heads=3", r"num_kv_heads=3 must divide the 2 query heads"),
    ("2*softmax,lightning:impl=cudnn", r"^model.pattern entry 'lightning:impl=cudnn': .*cudnn"),
    ("2*softmax,softmax:head_dim=15", r"^model.pattern entry 'softmax:head_dim=15': RoPE needs "
                                      r"an even head dim"),
])
def test_bad_patterns_fail_in_one_line(text, match):
  with pytest.raises(ConfigError, match=match) as info:
    validate(tiny_config(text))
  assert "\n" not in str(info.value)


def test_inherited_fields_are_checked_per_entry():
  config = tiny_config("2*lightning,softmax")
  config.model.attention.window = 8  # for softmax only: lightning refuses a window
  with pytest.raises(ConfigError, match=r"entry '2\*lightning': model.attention.window=8 is not "
                                        r"supported by lightning.*unset it for this entry "
                                        r"\(2\*lightning:window=none\)"):
    validate(config)
  config.model.pattern = "2*lightning:window=none,softmax"
  config.model.attention.name = "unused"  # a pattern replaces it
  validate(config)
  config.model.pattern, config.model.causal = "2*softmax,neural_memory", False
  config.model.attention.window = None
  with pytest.raises(ConfigError, match=r"entry 'neural_memory': model.causal=False"):
    validate(config)


def _tree(model):
  return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def test_no_pattern_keeps_the_param_tree_and_a_pattern_of_one_equals_it():
  """Empty pattern: model.attention for every layer, as before patterns existed; a one-entry
  pattern builds the same tree with the same values (the same init order)."""
  plain, lightning = tiny_config(num_layers=2), tiny_config(num_layers=2)
  lightning.model.attention.name = "lightning"
  for config, text in ((plain, "softmax"), (lightning, "lightning")):
    a = _tree(Transformer(config.model, rngs=nnx.Rngs(0)))
    config.model.pattern = text
    b = _tree(Transformer(config.model, rngs=nnx.Rngs(0)))
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a), text
    assert any(k.startswith("blocks.1.attn.") for k in a), list(a)[:5]


def test_hybrid_layers_have_their_mechanisms_param_trees():
  hybrid = nnx.eval_shape(lambda: Transformer(tiny_config(MIXED).model, rngs=nnx.Rngs(0)))
  assert layer_names(hybrid) == ["lightning", "softmax", "gated_deltanet"]
  for i, text in enumerate(MIXED.split(",")):
    alone = nnx.eval_shape(lambda t=text: Transformer(tiny_config(f"3*{t}").model,
                                                      rngs=nnx.Rngs(0)))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(alone.blocks[i]))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(hybrid.blocks[i])) == want


def test_every_mechanisms_aux_terms_reach_the_model():
  """Traced only (no compile): each mechanism's terms, averaged over the layers reporting them."""
  config = tiny_config("moh,gated_deltanet,neural_memory")
  model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  _, aux = nnx.eval_shape(lambda m, x: m(x, train=True), model, jnp.zeros((2, 8), jnp.int32))
  assert {"loss_moh_balance", "moh_active_fraction", "delta_write", "delta_log_decay",
          "memory_lr", "memory_forget"} <= set(aux)
  assert all(v.shape == () for v in aux.values())


@pytest.fixture(scope="module")
def mixed():
  """The mixed stack, and one jitted forward + backward over a batch whose row 1 differs from
  row 0 from position 7 on."""
  config = tiny_config(MIXED)
  validate(config)
  model = Transformer(config.model, rngs=nnx.Rngs(1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  toks = jax.random.randint(jax.random.key(0), (1, 12), 0, 40)
  batch = jnp.concatenate([toks, toks.at[:, 7:].set((toks[:, 7:] + 1) % 40)], 0)

  @jax.jit
  def loss_and_grad(params):
    def loss(params):
      logits, aux = nnx.merge(graphdef, params, rest)(batch, train=True)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), (logits, aux)
    return jax.value_and_grad(loss, has_aux=True)(params)

  return model, batch, loss_and_grad(params)


def test_mixed_stack_has_finite_gradients_everywhere_and_is_causal(mixed):
  model, _, ((value, (logits, aux)), grads) = mixed
  assert layer_names(model) == ["lightning", "softmax", "gated_deltanet"]
  assert np.isfinite(float(value))
  leaves = [(jax.tree_util.keystr(p, simple=True, separator="."), np.asarray(g))
            for p, g in jax.tree_util.tree_leaves_with_path(grads)]
  assert all(np.all(np.isfinite(g)) for _, g in leaves)
  dead = [path for path, g in leaves if not np.any(g)]
  assert not dead, dead
  assert {f"blocks.{i}.attn" for i in range(3)} <= {".".join(p.split(".")[:3]) for p, _ in leaves}
  np.testing.assert_allclose(np.asarray(logits[0, :7]), np.asarray(logits[1, :7]), atol=1e-5)
  assert not np.allclose(np.asarray(logits[0, 7:]), np.asarray(logits[1, 7:]))
  # Gated DeltaNet's terms (the trainer logs them as aux/<key>) reach the model's aux.
  assert set(aux) == {"delta_write", "delta_log_decay"}
  assert all(np.isfinite(float(v)) for v in aux.values())


def test_mixed_stack_decodes_like_its_forward_pass(mixed):
  """One token at a time, each layer with its own kind of cache (a multi-token prefill is each
  mechanism's own decode test; one step function keeps this to one compile)."""
  model, batch, ((_, (full, _)), _) = mixed
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b, t = batch.shape
  cache = model.init_cache(b, t)
  assert len({jax.tree.structure(c) for c in cache}) == 3

  @jax.jit
  def decode_all(params, cache):
    m = nnx.merge(graphdef, params, rest)

    def step(cache, i):
      token = jax.lax.dynamic_slice_in_dim(batch, i, 1, axis=1)
      out, cache = m.decode(token, positions=jnp.full((b, 1), i), cache=cache)
      return cache, out[:, 0]

    return jnp.swapaxes(jax.lax.scan(step, cache, jnp.arange(t))[1], 0, 1)

  np.testing.assert_allclose(np.asarray(decode_all(params, cache)), np.asarray(full),
                             atol=2e-5, rtol=1e-4)


def test_hybrid_checkpoint_restores_for_eval(mixed, tmp_path):
  """Saved as the trainer does, restored as eval.py does (config.json laid over base.py)."""
  model = mixed[0]
  config = tiny_config(MIXED)
  tx, _ = make_optimizer(config.optimizer, total_steps=4)
  _, state = create(model, tx)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.maybe_save(3, state, force=True)
  checkpointer.close()
  ckpt_lib.save_config(config, str(tmp_path))
  saved = ckpt_lib.merge_into(base.get_config(), ckpt_lib.load_config(str(tmp_path)))
  assert saved.model.pattern == MIXED
  restored, step = restore_model(saved, str(tmp_path))
  assert step == 3 and layer_names(restored) == layer_names(model)
  want, got = _tree(model), _tree(restored)
  assert list(want) == list(got) and all(np.array_equal(want[k], got[k]) for k in want)
