"""Landmark attention (Mohtashami & Jaggi, NeurIPS 2023; epfml/landmark-attention).

The sequence is cut into blocks of `block_len` regular tokens (the code's mem_freq = 50); every
block is represented by a landmark whose key enters a grouped softmax. For query i in block b(i)
with scores s_ij = q_i . k_j / sqrt(D):

  outer group G_i = {regular j <= i of block b(i)} U {landmarks of earlier blocks}
  own-block token j:        a_ij = exp(s_ij) / sum_{l in G_i} exp(s_il)
  token j of earlier block c: a_ij = [exp(s_ij) / sum_{l in c} exp(s_il)] * p_{i, landmark(c)}

A landmark's own value gets weight 0 (its weight passes to its block), so each row sums to 1.

Landmarks are inserted by this module, not by the data pipeline, so any task and the shared
trainer work unchanged and the loss never sees landmark positions. The landmark of block c is a
learned embedding plus the mean of the block's inputs at this layer, projected by the key
projection and rotated to the block's last position. (In the paper the landmark is a token of
the sequence and its state comes from the previous layer; carrying it inside the module keeps
the [B, T, d_model] interface. Landmark queries are never needed: their outputs are dropped.)
Blocks follow positions within each packed segment, so segments stay independent (padding,
segment 0 at position 0, is cut by token count instead).

Training and full-sequence calls go through effattn.kernels.grouped_softmax. On GPU and
TPU (`impl` "auto" or "pallas", head_dim in 16/32/64/128, block_len < `tile`) that is a
flash-style Pallas kernel (Triton on GPU, Mosaic on TPU): tokens are re-laid out so every
block fills one tile of `tile` slots with its landmark key in the tile's last slot, an earlier
block is one key tile whose within-block softmax, value summary and landmark score are
tile-local, and nothing [T, T] is built; rows
with more blocks than the layout's `max_groups` tiles take the path below through lax.cond, so
the result is always exact, and aux["grouped_softmax_fallback_frac"] says how often. Elsewhere
(and with impl "xla") the grouped softmax is evaluated with dense scores (as the official
code's non-Triton path), `query_chunk` queries at a time with the scores recomputed in the
backward pass, so memory is O(query_chunk * T) per layer (docs/mechanisms_sparse.md); impl
"reference" takes all queries at once.

Decoding scores the landmarks of completed blocks, keeps the top_k blocks per query and head
plus the current block, and attends to them with the same grouped formula at a cost of
(top_k + 1) * block_len keys per token, so context can grow far past the training length; with
top_k >= the number of blocks it equals the full forward pass. The cache is laid out for that:
keys and values head-major ([B, H, N * block_len, D]: a block is one contiguous slice per head)
and the landmark keys in their own [B, H, N, D] array, so a step reads the N landmark keys and
k + 1 blocks, never a copy of the whole cache (see init_cache).

The paper's inference retrieves in the forward pass over a prompt too: with `forward_top_k` = k
> 0, a call with train=False (evaluation) runs the prompt through that retrieval, `query_chunk`
tokens at a time through the decode cache, with k blocks per query (training always attends to
every block). It is an inference-time field (the parameters do not depend on it), so eval.py
can set it on any trained checkpoint (`--config.model.attention.landmark.forward_top_k=2`, or
eval.passkey.vary for a grid per k). It reads each row as one sequence from index 0 (padding
after it is fine): a row packing several segments gets NaN outputs rather than a wrong answer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels import grouped_softmax
from effattn.ranges import NON_NEGATIVE_INT, POSITIVE_INT, ConfigError

_NEG = -1e30


def block_groups(positions, segment_ids, block_len: int):
  """[B, T] -> group id per token: a new group starts at every block_len-th position of a
  segment and at every segment start. Groups are contiguous runs in token order.

  Padding (segment id 0) has position 0 everywhere, so it is cut by token count instead: every
  block_len tokens of a padding run. (Cutting it by position would make each padded token a
  group of its own, up to T groups, more than the kernel's group tiles hold; padded outputs
  are never used.)
  """
  start = (positions % block_len == 0)
  start = start.at[:, 0].set(True)
  if segment_ids is not None:
    seg_start = jnp.concatenate(
        [jnp.ones_like(start[:, :1]), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    idx = jnp.arange(start.shape[1], dtype=jnp.int32)
    run_start = jax.lax.cummax(jnp.where(seg_start, idx, 0), axis=1)
    start = jnp.where(segment_ids == 0, (idx - run_start) % block_len == 0, start) | seg_start
  return jnp.cumsum(start.astype(jnp.int32), axis=1) - 1


def kernel_tile(opts) -> int:
  """Slots per block tile of the kernel: opts.tile, or (0) the smallest power of two >= 16
  above block_len (a tile holds a block's tokens and its landmark key)."""
  return opts.tile or max(16, 1 << opts.block_len.bit_length())


@register("landmark")
class LandmarkAttention(base.Attention):
  """Grouped-softmax attention through per-block landmarks; see the module docstring."""

  DEFAULTS = {
      "block_len": 50,  # regular tokens per block (the official mem_freq)
      "top_k": 4,  # blocks retrieved per query while decoding (the paper uses 2-4)
      # Blocks retrieved per query by the forward pass at inference (train=False), as decoding
      # does: 0 = every earlier block (the grouped softmax of training), k > 0 = top k + own.
      "forward_top_k": 0,
      # Queries per step of the full forward: O(query_chunk * T) memory per layer instead of
      # O(T^2); 0 evaluates all queries at once.
      "query_chunk": 256,
      # Kernel path (GPU/TPU): slots per block tile (a power of two >= 16, > block_len: the
      # last slot holds the block's landmark key; 0: the smallest such, 64 for 50), block
      # tiles of the layout (0: grouped_softmax.default_max_groups), Pallas interpret mode (CPU
      # tests).
      "tile": 0,
      "max_groups": 0,
      # GPU kernel's dK/dV backward: programs per key tile (1: one walks the tile's whole query
      # range; S > 1: S equal shares, f32 partials summed; 0: pallas_gpu.auto_kv_splits).
      # 2: H200, bench_train at T 16k (B 2, H 8, D 128): step 193.2 ms against 215.1 with 1
      # (docs/benchmarks.md); both passed the GPU check.
      "kv_splits": 2,
      "interpret": False,
  }
  OPS = ("grouped_softmax",)
  SUPPORTS = ("head_dim",)  # MHA only; blocks, not a sliding window, bound the keys
  CAUSAL_ONLY = True
  RANGES = {"block_len": POSITIVE_INT, "top_k": POSITIVE_INT, "forward_top_k": NON_NEGATIVE_INT,
            "query_chunk": NON_NEGATIVE_INT,
            "max_groups": NON_NEGATIVE_INT, "tile": NON_NEGATIVE_INT,
            "kv_splits": NON_NEGATIVE_INT}  # tile: power of 2
  # Several blocks in T = 32, every block retrieved (decode equals the forward pass).
  TINY = {"block_len": 4, "top_k": 8, "query_chunk": 8, "tile": 16}

  @classmethod
  def check(cls, opts, sizes):
    if opts.tile:
      base.check_power_of_two("model.attention.landmark.tile", opts.tile, 16)
    if opts.tile and opts.tile <= opts.block_len:
      raise ConfigError(f"model.attention.landmark.tile={opts.tile} must exceed block_len="
                        f"{opts.block_len} (a tile holds a block and its landmark key); set "
                        f"tile={1 << opts.block_len.bit_length()}")
    if opts.max_groups and sizes.seq_len and opts.max_groups < -(-sizes.seq_len // opts.block_len):
      raise ConfigError(f"model.attention.landmark.max_groups={opts.max_groups} holds fewer "
                        f"block tiles than one sequence of data.seq_len={sizes.seq_len} has "
                        f"({-(-sizes.seq_len // opts.block_len)}): the kernel could never run; "
                        "raise it or set 0 (default)")

  @classmethod
  def op_shapes(cls, opts, sizes):
    return dict(super().op_shapes(opts, sizes), block_len=opts.block_len, tile=kernel_tile(opts))

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(  # H_kv = H
        d_model, num_heads, num_heads, self.head_dim, rngs=rngs, dtype=self.dtype)
    self.landmark = nnx.Param(jax.random.normal(rngs.params(), (d_model,), jnp.float32) * 0.02)

  def _rope(self, x, positions):
    return x if self.rope_theta is None else base.apply_rope(x, positions, self.rope_theta)

  def _landmark_key_base(self):
    """Key projection of the learned landmark embedding: [H, D] (before the block mean)."""
    return base.split_heads(self.k_proj(self.landmark[...].astype(self.dtype)[None]),
                            self.num_heads)[0]

  def landmark_keys(self, k_raw, positions, gid):
    """Landmark key per group, [B, G=T, H, D]: k(e) + mean of the block's keys (k is linear),
    rotated to the group's last position. Segment sums, O(T) (groups are contiguous and at
    most T)."""
    b, t = gid.shape
    seg_sum = jax.vmap(lambda x, g, op: op(x, g, num_segments=t), in_axes=(0, 0, None))
    count = jnp.maximum(seg_sum(jnp.ones((b, t), jnp.float32), gid, jax.ops.segment_sum), 1.0)
    mean = (seg_sum(k_raw.astype(jnp.float32), gid, jax.ops.segment_sum)
            / count[..., None, None])  # [B, G=T, H, D]
    last_pos = seg_sum(positions, gid, jax.ops.segment_max)  # [B, G]; empty groups: int min
    return self._rope((mean + self._landmark_key_base()).astype(k_raw.dtype),
                      jnp.maximum(last_pos, 0))

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    if not causal:
      raise ValueError("landmark attention is causal by construction; use causal=True")
    if self.opts.forward_top_k and not train:
      return self.retrieve(x, positions=positions, segment_ids=segment_ids,
                           top_k=self.opts.forward_top_k), {}
    b, t, _ = x.shape
    h = self.num_heads
    q = self._rope(base.split_heads(self.q_proj(x), h), positions)
    k_raw = base.split_heads(self.k_proj(x), h)
    v = base.split_heads(self.v_proj(x), h)
    seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
    gid = block_groups(positions, segment_ids, self.opts.block_len)
    k_land = self.landmark_keys(k_raw, positions, gid)
    k, scale = self._rope(k_raw, positions), self.head_dim ** -0.5
    o, frac = grouped_softmax.grouped_softmax(
        q, k, v, k_land, gid, seg, scale=scale, block_len=self.opts.block_len,
        impl=self.op_impl("grouped_softmax"), chunk=self.opts.query_chunk,
        tile=kernel_tile(self.opts),
        max_groups=self.opts.max_groups or None, kv_splits=self.opts.kv_splits,
        interpret=self.opts.interpret, return_fallback_frac=True)
    return self.o_proj(base.merge_heads(o)), base.fallback_aux("grouped_softmax", frac)

  # -- decoding with retrieval ---------------------------------------------------------------

  def retrieve(self, x, *, positions, segment_ids=None, top_k: int):
    """The forward pass by top-k retrieval: x [B, T, d_model] decoded from an empty cache,
    `query_chunk` tokens a step (a scan), each query attending to its top_k blocks and its own.
    Each row must be one sequence from index 0 (positions 0..n-1, padding after it); a row of
    several segments gets NaN."""
    b, t, _ = x.shape
    chunk = min(self.opts.query_chunk or t, t)
    pad = -t % chunk
    n = (t + pad) // chunk
    steps = lambda a: jnp.moveaxis(  # noqa: E731  [B, T, ...] -> [N, B, chunk, ...]
        jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(b, n, chunk,
                                                                          *a.shape[2:]), 1, 0)

    def step(cache, xs):
      y, cache = self.decode(xs[0], positions=xs[1], cache=cache, top_k=top_k)
      return cache, y

    _, y = jax.lax.scan(step, self.init_cache(b, t + pad, x.dtype), (steps(x), steps(positions)))
    y = jnp.moveaxis(y, 0, 1).reshape(b, t + pad, -1)[:, :t]
    if segment_ids is None:
      return y
    real = segment_ids > 0
    first = jnp.max(jnp.where(real, segment_ids, 0), axis=1, keepdims=True)
    packed = jnp.any(real & (segment_ids != first), axis=1) | jnp.any(
        real[:, 1:] & ~real[:, :-1], axis=1)  # two ids, or a real token after padding
    return jnp.where(packed[:, None, None], jnp.nan, y)

  def init_cache(self, batch, max_len, dtype=None):
    """k, v: [B, H, N * l, D], N = ceil(max_len / l) blocks of l = block_len tokens (keys
    rotated), head-major so a block is one contiguous [l, D] slice per head (read through the
    free view [B, H, N, l, D]); k_land: [B, H, N, D], the landmark key of each completed block
    (written when its last token arrives); k_sum: [B, H, D] f32, the raw keys of the current
    block summed so far."""
    dtype = dtype or self.dtype
    h, d, blen = self.num_heads, self.head_dim, self.opts.block_len
    n_blocks = -(-max_len // blen)
    return {"k": jnp.zeros((batch, h, n_blocks * blen, d), dtype),
            "v": jnp.zeros((batch, h, n_blocks * blen, d), dtype),
            "k_land": jnp.zeros((batch, h, n_blocks, d), dtype),
            "k_sum": jnp.zeros((batch, h, d), jnp.float32),
            "index": jnp.zeros((), jnp.int32)}

  def decode(self, x, *, positions, cache, top_k: int | None = None):
    """New tokens x [B, T, d_model] after the cached ones (positions = cache index + offset);
    top_k: blocks retrieved per query (default: the top_k option). Reads the N landmark keys
    and (top_k + 1) blocks per query and head, never the whole cache."""
    b, t, _ = x.shape
    h, d, blen = self.num_heads, self.head_dim, self.opts.block_len
    q = self._rope(base.split_heads(self.q_proj(x), h), positions)
    k_raw = base.split_heads(self.k_proj(x), h)
    v = base.split_heads(self.v_proj(x), h)
    start = cache["index"]

    def write(c, new):  # [B, T, H, D] into the tokens [start, start + T) of c [B, H, N * l, D]
      # (on c itself, not a [B, H, N, l, D] view: XLA copies a reshaped buffer it updates)
      return jax.lax.dynamic_update_slice(c, jnp.swapaxes(new, 1, 2).astype(c.dtype),
                                          (0, 0, start, 0))

    # Raw key sums of the blocks this call touches (first = the current block: the carried sum
    # plus its new tokens), then their landmark keys: final for each block completed here; a
    # block still open is rewritten by the call that completes it and is never read before.
    first = start // blen
    n_touched = (t + blen - 2) // blen + 1  # static: most blocks T tokens can touch
    rel = (start % blen + jnp.arange(t)) // blen  # [T] touched block of each new token
    sums = jnp.zeros((b, n_touched, h, d), jnp.float32).at[:, rel].add(
        k_raw.astype(jnp.float32))
    sums = sums.at[:, 0].add(cache["k_sum"])
    touched = first + jnp.arange(n_touched)
    k_land = self._rope((sums / blen + self._landmark_key_base()).astype(q.dtype),
                        jnp.broadcast_to((touched + 1) * blen - 1, (b, n_touched)))
    end = start + t
    new = {
        "k": write(cache["k"], self._rope(k_raw, positions)),
        "v": write(cache["v"], v),
        "k_land": cache["k_land"].at[:, :, touched].set(
            jnp.swapaxes(k_land, 1, 2).astype(cache["k_land"].dtype), mode="drop"),
        # The block of token `end`: empty when `end` starts a block.
        "k_sum": jnp.where(end % blen == 0, 0.0, sums[:, (end - 1) // blen - first]),
        "index": end,
    }
    top_k = self.opts.top_k if top_k is None else top_k
    o = jax.vmap(lambda qi, i: self._decode_one(qi, i, new, top_k), in_axes=(1, 0),
                 out_axes=1)(q, start + jnp.arange(t))
    return self.o_proj(base.merge_heads(o.astype(q.dtype))), new

  def _decode_one(self, q, i, cache, top_k):
    """One query q [B, H, D] at token index i: top-k blocks by landmark score + own block.
    Sums in f32, no f32 copy of the cache; one gather of [B, H, k + 1, l, D]."""
    blen, scale = self.opts.block_len, self.head_dim ** -0.5
    n_blocks = cache["k_land"].shape[2]
    own = i // blen
    f32 = jnp.float32
    dot = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=f32)  # noqa: E731
    s_land = dot("bhd,bhgd->bhg", q, cache["k_land"]) * scale
    visible = jnp.arange(n_blocks) < own  # completed earlier blocks
    k_top = min(top_k, n_blocks)
    ranked = jnp.where(visible[None, None], s_land, _NEG)
    _, chosen = jax.lax.top_k(ranked, k_top)  # [B, H, k]
    chosen_ok = visible[chosen]
    s_l = jnp.where(chosen_ok, jnp.take_along_axis(s_land, chosen, -1), _NEG)  # [B, H, k]
    # The chosen blocks and the own block (last), each one [l, D] slice per head.
    blocks = jnp.concatenate([chosen, jnp.broadcast_to(own, chosen.shape[:2] + (1,))], -1)
    gather = lambda c: jnp.take_along_axis(  # noqa: E731
        c.reshape(*c.shape[:2], n_blocks, blen, -1), blocks[..., None, None], axis=2)
    kb, vb = gather(cache["k"]), gather(cache["v"])  # [B, H, k + 1, l, D]
    s_blk = dot("bhd,bhkld->bhkl", q, kb) * scale
    s_own = jnp.where(own * blen + jnp.arange(blen) <= i, s_blk[:, :, -1], _NEG)  # tokens <= i
    s_blk = s_blk[:, :, :-1]
    lse_blk = jax.nn.logsumexp(s_blk, axis=-1)  # within-block normalizers
    p_blk = jnp.exp(s_blk - lse_blk[..., None])
    m = jnp.maximum(s_own.max(-1), s_l.max(-1))[..., None]
    p_own = jnp.where(s_own > _NEG / 2, jnp.exp(s_own - m), 0.0)
    p_l = jnp.where(s_l > _NEG / 2, jnp.exp(s_l - m), 0.0)
    denom = p_own.sum(-1, keepdims=True) + p_l.sum(-1, keepdims=True)
    # Each retrieved token's weight: within-block softmax x its landmark's outer weight.
    p = jnp.concatenate([p_blk * p_l[..., None], p_own[:, :, None]], axis=2)  # [B, H, k + 1, l]
    return dot("bhkl,bhkld->bhd", p, vb) / denom
