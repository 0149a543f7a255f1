"""Cached generation equals re-running the full forward pass on the growing sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.evaluate import generate as gen
from effattn.testing.configs import fresh_model, tiny_eval
from effattn.train.state import split_model

PROMPT, NEW = 5, 7


def _model(data_dir, window=None, num_kv_heads=None):
  config = tiny_eval(data_dir)
  config.model.attention.window = window
  config.model.attention.num_kv_heads = num_kv_heads
  model, config = fresh_model(config)
  return model, config


def _growing_forward(model, prompt, keys, *, temperature, top_k):
  """The slow oracle: the full model on the whole sequence so far, once per new token."""
  graphdef, params, rest = split_model(model)
  seq = prompt
  for key in keys:
    logits = gen.full_forward_logits(graphdef, params, rest, seq)
    token = gen.choose(logits[:, -1], key, temperature=temperature, top_k=top_k)
    seq = jnp.concatenate([seq, token[:, None]], 1)
  return np.asarray(seq[:, prompt.shape[1]:])


@pytest.mark.parametrize("window,num_kv_heads,temperature,top_k", [
    (None, None, None, 0), (None, None, 0.7, 5), (4, 1, None, 0)])
def test_generation_equals_growing_full_forward(data_dir, window, num_kv_heads, temperature,
                                                top_k):
  model, _ = _model(data_dir, window, num_kv_heads)
  graphdef, params, rest = split_model(model)
  prompt = jax.random.randint(jax.random.key(1), (3, PROMPT), 3, 32)
  key = jax.random.key(2)
  tokens, logits = gen.generate(graphdef, params, rest, prompt, key, max_new_tokens=NEW,
                                temperature=temperature, top_k=top_k)
  assert tokens.shape == (3, NEW) and logits.shape == (3, NEW, 32)
  expected = _growing_forward(model, prompt, jax.random.split(key, NEW),
                              temperature=temperature, top_k=top_k)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  check = gen.check_against_full_forward(graphdef, params, rest, prompt, tokens, logits)
  assert check["max_rel_logit_diff"] < 1e-4
  if temperature is None:
    assert check["argmax_match"] == 1.0
  else:  # every sampled token is among the top k of its logits
    ranks = np.sum(np.asarray(logits) > np.take_along_axis(
        np.asarray(logits), np.asarray(tokens)[..., None], -1), -1)
    assert np.all(ranks < top_k)


def test_generate_task_reports_speed_and_consistency(data_dir):
  model, config = _model(data_dir)
  result = gen.generate_task(model, config, workdir=None)
  assert result["prompt_len"] == 8 and result["max_new_tokens"] == 8
  assert result["consistent_with_full_forward"]
  for mode in ("greedy", "sample"):
    assert result[mode]["tokens_per_sec"] > 0
    assert result[mode]["max_rel_logit_diff"] < 1e-4


def test_choose_greedy_and_top_k():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
  assert int(gen.choose(logits, jax.random.key(0), temperature=None, top_k=0)[0]) == 1
  draws = {int(gen.choose(logits, jax.random.key(i), temperature=5.0, top_k=2)[0])
           for i in range(40)}
  assert draws == {1, 3}
