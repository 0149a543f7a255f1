"""KV caches of the softmax-style decoders: a full cache of max_len slots, or a ring of W slots
for a sliding window of W keys.

    cache = kv_cache.init(batch, slots, num_kv_heads, head_dim, dtype)   # {"k", "v", "index"}
    o, cache = kv_cache.window_attend(q, k, v, cache, window=W, attend=fn)

k, v: [B, S, H_kv, D] keys and values already RoPE-rotated at their absolute positions; index:
the number of tokens written so far. In the ring (S = W) the token at absolute position p lives
in slot p % W, so the position each slot holds is a function of `index` alone (slot_positions):
no position array is stored, and a cache filled from outside with index = P (random values at
the real shapes, as scripts/bench_decode.py does) is a valid cache after P tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from effattn.kernels.softmax.common import attention_mask, sequence_index

# attend(q [B, t, H, D], k, v [B, S, H_kv, D], mask [B, 1, t, S] bool) -> o [B, t, H, D]
Attend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def init(batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype: Any) -> dict:
  """An empty cache of `slots` key/value slots: {"k", "v": [B, S, H_kv, D], "index": 0}."""
  shape = (batch, slots, num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "index": jnp.zeros((), jnp.int32)}


def check(cache: dict, new: tuple, *, what: str, window: int | None) -> None:
  """One ValueError line when t new keys of shape `new` = [B, t, H_kv, D] do not fit `cache`:
  another batch or head layout, a full cache too short for them, or a ring of other than
  `window` slots."""
  (b, t, *heads), (cb, slots, *cheads) = tuple(new), cache["k"].shape
  if (b, heads) != (cb, cheads):
    raise ValueError(f"{what} decode: new keys [B, t, H_kv, D] = {list(new)} do not fit the "
                     f"cache's {list(cache['k'].shape)}; make the cache with this module's "
                     "init_cache(batch, max_len)")
  if window is not None and slots != window:
    raise ValueError(f"{what} decode: window={window} keeps a ring of {window} cache slots, "
                     f"this cache has {slots}; make it with this module's init_cache")
  if window is None and t > slots:
    raise ValueError(f"{what} decode: {t} tokens do not fit a cache of max_len={slots}; "
                     "init_cache with max_len >= the prompt plus the tokens to generate")


def slot_positions(index: jax.Array, slots: int) -> jax.Array:
  """[W] absolute position held by each ring slot after `index` tokens (negative: empty).

  Slot s holds the latest position p < index with p % W = s: index-1 - ((index-1 - s) mod W)."""
  last = index - 1
  return last - jnp.mod(last - jnp.arange(slots, dtype=jnp.int32), slots)


def write(cache: dict, k: jax.Array, v: jax.Array) -> dict:
  """The last min(t, W) of t new keys/values into their ring slots (position p at p % W); the
  earlier ones are already out of every later query's window. index += t."""
  t, w = k.shape[1], cache["k"].shape[1]
  m, start = min(t, w), cache["index"]
  new = {"index": start + t}
  for name, x in (("k", k), ("v", v)):
    x = x[:, t - m:].astype(cache[name].dtype)
    if m == 1:  # the one-token step: an in-place update of one slot
      new[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], x, start % w, axis=1)
    else:  # m consecutive positions: m distinct slots, wrapping around the ring
      new[name] = cache[name].at[:, (start + t - m + jnp.arange(m)) % w].set(x)
  return new


def window_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, *, window: int,
                  attend: Attend, what: str = "sliding-window") -> tuple[jax.Array, dict]:
  """Sliding-window causal attention of t new tokens over a ring cache, and the cache after.

  q: [B, t, H, D], k / v: [B, t, H_kv, D] of the tokens at positions index .. index+t-1 (RoPE
  applied). Query i sees the keys at positions in (index+i - W, index+i]: the ring's valid slots
  within its window and the chunk's own keys up to itself. `attend` runs the softmax under the
  mask it is given (the mechanism's own: plain, or with persistent keys).
  """
  check(cache, k.shape, what=what, window=window)
  b, t = q.shape[:2]
  start = cache["index"]
  if t == 1:
    # One token: written first (its slot held position index - W, just out of its window),
    # then attended with the ring as it stands, so the cache is never copied.
    cache = write(cache, k, v)
    valid = slot_positions(start + 1, window) >= 0
    mask = jnp.broadcast_to(valid, (b, 1, 1, window))
    return attend(q, cache["k"], cache["v"], mask), cache
  # A chunk: its own tokens evict keys its earlier queries still see, so attend over
  # [ring || chunk] first, then write.
  k_pos = jnp.concatenate([slot_positions(start, window),
                           start + jnp.arange(t, dtype=jnp.int32)])
  k_idx = jnp.broadcast_to(k_pos, (b, window + t))
  mask = attention_mask(sequence_index(b, t, start), k_idx, causal=True, window=window,
                        k_valid=k_idx >= 0)
  both = lambda name, x: jnp.concatenate([cache[name], x.astype(cache[name].dtype)], axis=1)
  o = attend(q, both("k", k), both("v", v), mask)
  return o, write(cache, k, v)
