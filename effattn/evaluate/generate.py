"""Generation with the decode cache: greedy and temperature/top-k sampling, tokens/s, and a check.

    python eval.py --workdir runs/text --config.eval.task=generate

Prompts are the first `prompt_len` tokens of the first `num_prompts` rows of the eval split.
The whole generation is one jit-compiled function: the prompt is prefilled into the cache with one
`model.decode` call, then `lax.scan` runs one-token decode steps with the cache in the carry.

The check: every generated token's logits are compared with those of the full forward pass over
the final sequence. The model is causal, so the full pass's logits at position t are exactly those
of re-running the model on the sequence grown up to t; greedy tokens must be their argmax.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effattn import data as data_lib
from effattn.evaluate import common
from effattn.evaluate.registry import register_eval_task, task_options
from effattn.train.state import split_model


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """Options of eval.task=generate (config.eval.generate.<field>).

  Attributes:
    num_prompts: prompts decoded together (the batch).
    prompt_len: prompt tokens; 0 = data.seq_len // 2.
    max_new_tokens: tokens generated per prompt; 0 = data.seq_len // 2.
    temperature: sampling temperature (> 0) of the sampled run.
    top_k: sample among the k most likely tokens; 0 = all.
    seed: sampling seed.
    repeats: timed runs after the compiling one (the median is reported).
  """

  num_prompts: int = 8
  prompt_len: int = 0
  max_new_tokens: int = 0
  temperature: float = 0.8
  top_k: int = 20
  seed: int = 0
  repeats: int = 3

  def validate(self) -> None:
    for field in ("num_prompts", "repeats"):
      if getattr(self, field) < 1:
        raise ValueError(f"eval.generate.{field}={getattr(self, field)} must be >= 1")
    for field in ("prompt_len", "max_new_tokens", "top_k"):
      if getattr(self, field) < 0:
        raise ValueError(f"eval.generate.{field}={getattr(self, field)} must be >= 0")
    if self.temperature <= 0:
      raise ValueError(f"eval.generate.temperature={self.temperature} must be > 0 (greedy "
                       f"decoding is always run as well)")


def choose(logits: jax.Array, key: jax.Array, *, temperature: float | None,
           top_k: int) -> jax.Array:
  """Next tokens [B] from logits [B, V]: argmax when temperature is None, else a sample."""
  if temperature is None:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k"))
def generate(graphdef, params, rest, prompt, key, *, max_new_tokens: int,
             temperature: float | None = None, top_k: int = 0):
  """prompt int32 [B, P] -> (tokens int32 [B, N], logits float32 [B, N, V] each was chosen from).

  N = max_new_tokens. temperature None is greedy decoding.
  """
  model = nnx.merge(graphdef, params, rest)
  b, p = prompt.shape
  cache = model.init_cache(b, p + max_new_tokens)
  logits, cache = model.decode(prompt, positions=jnp.broadcast_to(jnp.arange(p), (b, p)),
                               cache=cache)
  pick = functools.partial(choose, temperature=temperature, top_k=top_k)

  def step(carry, key):
    cache, logits, position = carry
    token = pick(logits, key)
    next_logits, cache = model.decode(token[:, None], positions=position, cache=cache)
    return (cache, next_logits[:, 0], position + 1), (token, logits)

  keys = jax.random.split(key, max_new_tokens)
  # The scan feeds all but the last token back; the last is only chosen.
  carry = (cache, logits[:, -1], jnp.full((b, 1), p, jnp.int32))
  (_, last_logits, _), (tokens, step_logits) = jax.lax.scan(step, carry, keys[:-1])
  tokens = jnp.concatenate([tokens, pick(last_logits, keys[-1])[None]], 0)
  step_logits = jnp.concatenate([step_logits, last_logits[None]], 0)
  return tokens.T, jnp.swapaxes(step_logits, 0, 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def full_forward_logits(graphdef, params, rest, tokens):
  """Logits float32 [B, T, V] of the causal full forward pass over tokens [B, T]."""
  model = nnx.merge(graphdef, params, rest)
  logits, _ = model(tokens)
  return logits.astype(jnp.float32)


def check_against_full_forward(graphdef, params, rest, prompt, tokens, step_logits) -> dict:
  """Compares decode-cache logits with the full forward pass over prompt + generated tokens."""
  seq = jnp.concatenate([prompt, tokens], 1)
  p, n = prompt.shape[1], tokens.shape[1]
  full = np.asarray(full_forward_logits(graphdef, params, rest, seq))[:, p - 1:p - 1 + n]
  step_logits = np.asarray(step_logits)
  scale = max(float(np.max(np.abs(full))), 1e-6)
  return {"max_abs_logit_diff": float(np.max(np.abs(full - step_logits))),
          "max_rel_logit_diff": float(np.max(np.abs(full - step_logits)) / scale),
          "argmax_match": float(np.mean(np.argmax(full, -1) == np.asarray(tokens)))}


def timed_generate(graphdef, params, rest, prompt, key, repeats: int, **kw):
  """(tokens, logits, median seconds of `repeats` runs after a compiling run)."""
  out = jax.block_until_ready(generate(graphdef, params, rest, prompt, key, **kw))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(generate(graphdef, params, rest, prompt, key, **kw))
    times.append(time.perf_counter() - t0)
  return out[0], out[1], float(np.median(times))


def _tokenizer(config):
  if config.data.name == "text":
    from effattn.data import text
    return text.tokenizer(config.data)
  if config.data.name == "passkey":
    from effattn.data.tokenizers import ByteTokenizer
    return ByteTokenizer()
  return None


@register_eval_task("generate", options=GenerateOptions)
def generate_task(model, config, workdir) -> dict:
  """Greedy and sampled generation from eval-split prompts: tokens/s and the consistency check."""
  del workdir
  opts = task_options(config, "generate")
  common.require_lm(config, "generate")
  train_len = int(config.data.seq_len)
  prompt_len = opts.prompt_len or max(train_len // 2, 1)
  new = opts.max_new_tokens or max(train_len // 2, 1)
  if prompt_len > train_len:
    raise ValueError(f"eval.generate.prompt_len={prompt_len} exceeds data.seq_len={train_len}: "
                     f"prompts are cut from eval rows")
  batch = next(data_lib.eval_batches(config.data, config.eval.split, opts.num_prompts,
                                     max_examples=opts.num_prompts))
  prompt = jnp.asarray(batch["inputs"][:, :prompt_len])
  graphdef, params, rest = split_model(model)
  key = jax.random.key(opts.seed)
  result = {"num_prompts": opts.num_prompts, "prompt_len": prompt_len, "max_new_tokens": new}
  samples = {}
  for mode, temperature in (("greedy", None), ("sample", opts.temperature)):
    tokens, logits, seconds = timed_generate(
        graphdef, params, rest, prompt, key, opts.repeats, max_new_tokens=new,
        temperature=temperature, top_k=opts.top_k if temperature else 0)
    check = check_against_full_forward(graphdef, params, rest, prompt, tokens, logits)
    result[mode] = {"seconds": seconds, "tokens_per_sec": opts.num_prompts * new / seconds,
                    **check}
    if mode == "sample":  # sampled tokens need not be the argmax; their logits must match
      del result[mode]["argmax_match"]
      result[mode].update(temperature=opts.temperature, top_k=opts.top_k)
    samples[mode] = np.asarray(tokens)
  result["consistent_with_full_forward"] = bool(result["greedy"]["argmax_match"] == 1.0)
  tok = _tokenizer(config)
  if tok is not None:
    result["example"] = {"prompt": tok.decode(np.asarray(prompt[0])),
                         **{mode: tok.decode(t[0]) for mode, t in samples.items()}}
  return result
