"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2024) and its three architectures.

The memory M (an MLP of `depth` layers; depth 1 is a matrix) learns at test time: per token
k, v, q = L2norm(SiLU(conv(x W_K))), SiLU(conv(x W_V)), L2norm(SiLU(conv(x W_Q))) (short
depthwise causal convolutions), data-dependent gates theta, alpha, eta = sigmoid(x W_g + b) per
head, and

  S_t = eta_t S_{t-1} - theta_t grad ||M_{t-1}(k_t) - v_t||^2     (surprise with momentum)
  M_t = (1 - alpha_t) M_{t-1} + S_t                                 (forgetting)
  r_t = M_t(q_t)                                                    (retrieval)

trained in the chunk-parallel form (gradients of a chunk of `chunk_size` tokens at the chunk's
starting weights, kernels/memory_chunk). The paper's ablations switch the two gates off:
`momentum=False` sets eta = 0 (S_t = -theta_t grad: plain gradient steps), `weight_decay=False`
sets alpha = 0 (M_t = M_{t-1} + S_t: no forgetting); `depth` 1 against 2+ is its linear against
deep memory. Architectures (`variant`), each with `num_persistent`
learnable persistent key/value pairs that every query sees:

  mag  memory as a gate:  o = W_o (norm(SWA(x)) * sigmoid(norm(r(x))))
  mal  memory as a layer: o = SWA(LMM(x))
  mac  memory as context: per segment of `segment_len` tokens, h = M_prev(q) is retrieved with
       the memory before the segment, attention runs over [persistent || h || segment] (causal in
       both h and the segment), its output y updates the memory, o = W_o (norm(y) * sigmoid(norm
       (M(y))))
  lmm  the memory alone:   o = W_o (norm(r(x)) * sigmoid(x W_g))

SWA is sliding-window softmax attention with the common `window` (None: full causal), over the
persistent pairs and the sequence without a [T, T] mask (kernels/softmax/persistent.py).
Memory carries across calls through the decode cache: it holds the memory at the last chunk boundary
plus the tokens of the unfinished chunk, so decoding in any split equals the forward pass exactly.
Its attention KV cache is every token so far (MAG / MAL without a window), a ring of `window`
slots (with one: kv_cache.py), or MAC's current segment; decode steps attend to the persistent pairs
and the cache without concatenating them, reading the cache once as it lies (no copy of it:
over_cache in kernels/softmax/persistent.py). Packed segments restart the
memory (depth 1: at zero; deeper: at the learned initial weights) and attention stays inside each
segment. docs/mechanisms_memory.md has the choices the paper leaves open.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import logical_axes
from effattn.attention import base, kv_cache
from effattn.attention.registry import register
from effattn.kernels.memory_chunk import common, deep, deep_memory_update, memory_update, xla
from effattn.kernels.short_conv import short_conv
from effattn.kernels.softmax import softmax_attention
from effattn.kernels.softmax.persistent import over_cache, persistent_attention
from effattn.ranges import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, ConfigError, Range

VARIANTS = ("mac", "mag", "mal", "lmm")
# memory_remat_chunks' default: chunks per rematerialized piece of the linear memory (1,024
# tokens at chunk 16).
REMAT_CHUNKS = 64
# memory_forward's and memory_backward's defaults: the Triton kernel's chunk loops
# (kernels/memory_chunk/pallas_gpu.py). Split, measured (H200, B 2, H 8, D 128, chunk 16,
# T 16k, block_v 32): the op's fwd+bwd 12.56 ms against the fused loops' 23.97.
MEMORY_LOOPS = {"forward": "split", "backward": "split"}


def _rms(x, scale, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def _l2(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


class _Memory(nnx.Module):
  """The long-term memory layer: q/k/v streams, gates, the memory MLP and its updates."""

  def __init__(self, d_model, num_heads, head_dim, *, depth, expansion, conv_size, max_lr,
               chunk_size, impl, dtype, rngs, momentum=True, weight_decay=True, block_v=None,
               forward=None, backward=None, remat_chunks=None):
    h, d = num_heads, head_dim
    self.num_heads, self.head_dim, self.depth = h, d, depth
    self.chunk_size, self.conv_size, self.max_lr = chunk_size, conv_size, max_lr
    self.momentum, self.weight_decay = momentum, weight_decay
    self.impl, self.dtype, self.block_v, self.remat_chunks = impl, dtype, block_v, remat_chunks
    self.forward, self.backward = forward, backward
    self.qkv_proj = base.dense(d_model, 3 * h * d, rngs=rngs, dtype=dtype, axes=base.FUSED)
    # Depthwise causal conv taps [K, 3, H*D]; starts as the identity (last tap = current token).
    self.conv = nnx.Param(jnp.zeros((conv_size, 3, h * d), jnp.float32).at[-1].set(1.0))
    self.gate_proj = base.dense(d_model, 3 * h, rngs=rngs, dtype=dtype, scale=0.1,
                                axes=base.FUSED)
    # theta, alpha, eta start at sigmoid(0, -4, 0): half steps, slow forgetting, some momentum.
    self.gate_bias = nnx.Param(jnp.array([0.0, -4.0, 0.0], jnp.float32)[:, None]
                               * jnp.ones((3, h), jnp.float32))
    self.norm_scale = logical_axes.param(jnp.ones((d,), jnp.float32), ("norm",))
    if depth > 1:
      hidden = expansion * d
      dims = [d] + [hidden] * (depth - 1) + [d]
      self.init_weights = nnx.List([
          nnx.Param(jax.random.normal(rngs.params(), (h, a, b), jnp.float32) * a ** -0.5)
          for a, b in zip(dims[:-1], dims[1:])])

  # -- streams ---------------------------------------------------------------------------------

  def streams(self, x, seg, conv_tail=None):
    """x [B, T, d_model] -> (q, k, v [B, T, H, D], (theta, alpha, eta) [B, T, H], new tail).

    conv_tail: [B, K-1, 3, H*D] projections of the tokens before x (decoding), else zeros.
    seg: [B, T] segment ids (the conv never reaches into another segment) or None.
    """
    b, t, _ = x.shape
    h, d = self.num_heads, self.head_dim
    proj = self.qkv_proj(x)  # [B, T, 3 H D]: q | k | v, each conv channel on its own
    taps = self.conv.value.reshape(self.conv_size, 3 * h * d)
    if conv_tail is not None:
      conv_tail = conv_tail.reshape(b, self.conv_size - 1, 3 * h * d)
    out, tail = short_conv(proj, taps, conv_tail, seg)
    out, tail = out.reshape(b, t, 3, h * d), tail.reshape(b, self.conv_size - 1, 3, h * d)
    q, k, v = (base.split_heads(out[:, :, i], h) for i in range(3))
    q, k, v = _l2(jax.nn.silu(q)), _l2(jax.nn.silu(k)), jax.nn.silu(v)
    g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32).reshape(b, t, 3, h)
                       + self.gate_bias.value)
    # The ablations: alpha = 0 (no forgetting), eta = 0 (no momentum).
    alpha = g[:, :, 1] if self.weight_decay else jnp.zeros_like(g[:, :, 1])
    eta = g[:, :, 2] if self.momentum else jnp.zeros_like(g[:, :, 2])
    return q, k, v, (self.max_lr * g[:, :, 0], alpha, eta), tail

  # -- memory ----------------------------------------------------------------------------------

  def initial_state(self, batch):
    """(weights, momentum) at the start of a sequence; every leaf [B, H, ...] float32."""
    if self.depth == 1:
      zeros = jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
      return (zeros,), (zeros,)
    weights = tuple(jnp.broadcast_to(w.value, (batch,) + w.value.shape)
                    for w in self.init_weights)
    return weights, jax.tree.map(jnp.zeros_like, weights)

  def update(self, q, k, v, gates, seg, state):
    """Chunk-parallel update over the whole of q, k, v from `state`: (r [B, T, H, D], state)."""
    theta, alpha, eta = gates
    (w, s) = state
    if self.depth == 1:
      r, (w1, s1) = memory_update(q, k, v, theta, alpha, eta, initial_memory=w[0],
                                  initial_momentum=s[0], segment_ids=seg,
                                  chunk_size=self.chunk_size, impl=self.impl,
                                  block_v=self.block_v, forward=self.forward,
                                  backward=self.backward, remat_chunks=self.remat_chunks)
      return r, ((w1,), (s1,))
    reset_to, _ = self.initial_state(q.shape[0])
    return deep_memory_update(w, s, q, k, v, theta, alpha, eta, seg, reset_to,
                              chunk_size=self.chunk_size, impl=self.impl)

  def retrieve(self, weights, q):
    """M(q) without an update: weights leaves [B, H, ...], q [B, T, H, D] -> [B, T, H, D]."""
    per_head = jax.vmap(deep.mlp, in_axes=(0, 1), out_axes=1)  # over H
    return jax.vmap(per_head)(weights, q.astype(jnp.float32))

  def output(self, r):
    """Per-head RMS norm of the retrieval, heads merged: [B, T, H, D] -> [B, T, H*D]."""
    return base.merge_heads(_rms(r, self.norm_scale.value)).astype(self.dtype)

  # -- decoding --------------------------------------------------------------------------------

  def init_cache(self, batch):
    c, h, d = self.chunk_size, self.num_heads, self.head_dim
    weights, momentum = self.initial_state(batch)
    vec = jnp.zeros((batch, c, h, d), jnp.float32)
    gate = jnp.zeros((batch, c, h), jnp.float32)
    return {"weights": weights, "momentum": momentum, "k": vec, "v": vec, "theta": gate,
            "lb": gate, "le": gate, "fill": jnp.zeros((), jnp.int32),
            "conv": jnp.zeros((batch, self.conv_size - 1, 3, h * d), self.dtype)}

  def step(self, cache, q, k, v, gates):
    """One token (q, k, v [B, H, D], gates [B, H] each) through the unfinished chunk.

    The chunk's buffered tokens are recomputed from the memory at the chunk start (exactly
    what the chunked forward computes for them); a full chunk is committed to the memory.
    """
    c, p = self.chunk_size, cache["fill"]
    theta, alpha, eta = gates
    lb, le = common.log_gates(alpha, eta)
    put = lambda buf, x: buf.at[:, p].set(x.astype(jnp.float32))
    new = dict(cache)
    for name, x in (("k", k), ("v", v), ("theta", theta), ("lb", lb), ("le", le)):
      new[name] = put(cache[name], x)
    q_buf = put(jnp.zeros_like(cache["k"]), q)
    lb_c, le_c = jnp.cumsum(new["lb"], axis=1), jnp.cumsum(new["le"], axis=1)
    ones = jnp.ones((c,), jnp.float32)
    end = (jnp.arange(c) == p).astype(jnp.float32)
    masks = (jnp.ones((c,), jnp.int32), ones, end)
    tokens = [jnp.moveaxis(a, 1, 2)  # [B, H, C, ...]
              for a in (q_buf, new["k"], new["v"], new["theta"], lb_c, le_c)]
    if self.depth == 1:
      fn = lambda q_, k_, v_, th, lb_, le_, w, s: xla.chunk_forward(q_, k_, v_, th, lb_, le_,
                                                                     *masks, w, s)
      y, w_end, s_end = jax.vmap(jax.vmap(fn))(*tokens, cache["weights"][0],
                                               cache["momentum"][0])
      w_end, s_end = (w_end,), (s_end,)
    else:
      reset_to, _ = self.initial_state(k.shape[0])
      fn = lambda w, s, r, *tok: deep.chunk_forward(w, s, r, *tok, *masks)
      y, w_end, s_end = jax.vmap(jax.vmap(fn))(cache["weights"], cache["momentum"], reset_to,
                                               *tokens)
    full = p == c - 1
    pick = lambda a, b: jax.tree.map(lambda x, y_: jnp.where(full, x, y_), a, b)
    new["weights"] = pick(w_end, cache["weights"])
    new["momentum"] = pick(s_end, cache["momentum"])
    new["fill"] = jnp.where(full, 0, p + 1)
    return jnp.take(y, p, axis=2), new


@register("neural_memory")
class NeuralMemory(base.Attention):
  """Titans: long-term neural memory + sliding-window attention (MAC / MAG / MAL) or alone."""

  DEFAULTS = {
      "variant": "mag",       # mac | mag | mal | lmm
      "depth": 1,             # memory MLP layers L_M (1 = linear memory, the Pallas kernel)
      "expansion": 2,         # hidden width of a deep memory, in head dims
      "chunk_size": 16,       # mini-batch of the inner loop (1 = the token recurrence)
      "segment_len": 64,      # MAC segment length (a multiple of chunk_size)
      "num_persistent": 4,    # N_p persistent memory tokens
      "conv_size": 4,         # short depthwise causal conv on the memory's q, k, v
      "max_lr": 0.1,          # theta = max_lr * sigmoid(.) (larger steps make deep memories diverge)
      # The paper's ablations: False sets the momentum gate eta (resp. the forgetting gate
      # alpha, its weight decay) to 0.
      "momentum": True,
      "weight_decay": True,
      # MAC only: the memory reads rms(y), not the raw y of the paper (cuts the segment loop
      # that diverged at lr 1e-3; docs/mechanisms_memory.md). Other variants ignore it.
      "store_norm": True,
      # MAG / MAL attention branch: "fused" keeps the persistent pairs out of any [T, T] mask
      # (cuDNN on GPU with them laid in front of each segment, else query chunks; exact, memory
      # flat in T at equal tokens: kernels/softmax/persistent.py); "dense" builds the
      # [T, N_p + T] mask (the oracle; O(T^2) memory on the XLA path it forces).
      "swa_impl": "fused",
      # The memory's Triton kernel: value columns per program. None: halved from head_dim
      # while the grid is short of the GPU's SMs (kernels/memory_chunk/pallas_gpu.py); a power
      # of two >= 16 dividing head_dim fixes it (head_dim: one program per row and head). A
      # launch setting; other paths ignore it.
      "memory_block_v": None,
      # The memory's Triton chunk loops: "fused" computes y (forward) or every gradient
      # (backward) inside the loop; "split" keeps only the states (forward) or the state
      # cotangents (backward) in the loop and computes the per-token rest of every chunk at
      # once (kernels/memory_chunk/pallas_gpu.py); "hoisted" is "split" with the loops'
      # state-independent terms computed for all chunks first. Same math. "auto":
      # MEMORY_LOOPS, the measured choice. Launch settings; other paths ignore them.
      "memory_forward": "auto",
      "memory_backward": "auto",
      # The memory's backward keeps its state at every chunk start (2 D^2 f32 per chunk, row and
      # head); n keeps them for n chunks at a time and recomputes the rest (one more forward of
      # the memory; kernels/memory_chunk/api.py); 0 keeps all of them. None: 64. With the
      # value split, H200 at T = 16k: step 396 -> 242 ms, memory 25.9 -> 17.8 GiB
      # (docs/benchmarks.md).
      "memory_remat_chunks": None,
  }
  OPS = ("softmax", "memory_chunk")  # attention branch, memory
  CAUSAL_ONLY = True
  # MAG, MAL and LMM with the linear memory: the convs take a halo (kernels/short_conv.py), the
  # memory a cross-device scan of chunk maps, the attention the softmax ring.
  CONTEXT_PARALLEL = True
  CHOICES = {"variant": VARIANTS, "swa_impl": ("fused", "dense"),
             "memory_forward": ("auto", "fused", "split", "hoisted"),
             "memory_backward": ("auto", "fused", "split", "hoisted")}
  RANGES = {"depth": POSITIVE_INT, "expansion": POSITIVE_INT, "chunk_size": POSITIVE_INT,
            "memory_block_v": Range(0, integer=True, none_ok=True),
            "memory_remat_chunks": Range(0, integer=True, none_ok=True),
            "segment_len": POSITIVE_INT, "num_persistent": NON_NEGATIVE_INT,
            "conv_size": POSITIVE_INT, "max_lr": POSITIVE}

  @classmethod
  def supports(cls, field, opts):
    if field == "window":  # MAG's and MAL's sliding-window branch; MAC attends per segment
      return opts.variant in ("mag", "mal")
    if field == "num_kv_heads":  # the memory alone has no attention
      return opts.variant != "lmm"
    # MAG and MAC gate the d_model-wide attention output by the H * D-wide memory output.
    return field == "head_dim" and opts.variant in ("mal", "lmm")

  @classmethod
  def check(cls, opts, sizes):
    for field in ("memory_block_v", "memory_forward", "memory_backward", "memory_remat_chunks"):
      default = cls.DEFAULTS[field]
      if opts.depth > 1 and getattr(opts, field) != default:
        raise ConfigError(f"model.attention.neural_memory.{field} applies to the linear memory's "
                          f"op (depth 1), not depth={opts.depth}; leave it {default!r}")
    bv = opts.memory_block_v
    if bv is not None and (bv < 16 or bv & (bv - 1) or sizes.head_dim % bv):
      raise ConfigError(f"model.attention.neural_memory.memory_block_v={bv} must be a power of "
                        f"two >= 16 dividing head_dim={sizes.head_dim}, or None (chosen from "
                        "the grid)")
    if opts.variant == "mac" and opts.segment_len % opts.chunk_size:
      raise ConfigError(f"model.attention.neural_memory.segment_len={opts.segment_len} must be "
                        f"a multiple of chunk_size={opts.chunk_size} (MAC updates whole chunks)")

  @staticmethod
  def memory_launch(opts) -> dict:
    """memory_update's block_v, forward, backward and remat_chunks from the options (None or
    "auto": the measured defaults; the deep memory's op has none of them)."""
    if opts.depth > 1:
      return {"block_v": None, "forward": None, "backward": None, "remat_chunks": None}
    remat = REMAT_CHUNKS if opts.memory_remat_chunks is None else opts.memory_remat_chunks
    return {"block_v": 0 if opts.memory_block_v is None else opts.memory_block_v,
            "forward": MEMORY_LOOPS["forward"] if opts.memory_forward == "auto"
            else opts.memory_forward,
            "backward": MEMORY_LOOPS["backward"] if opts.memory_backward == "auto"
            else opts.memory_backward,
            "remat_chunks": remat or None}

  @classmethod
  def context_parallel(cls, opts, sizes, causal):
    if opts.variant == "mac":
      return ("MAC runs its attention and its memory in turn, one segment after another "
              "(each segment attends to what the memory retrieves after the last)")
    if opts.depth > 1:
      return f"depth={opts.depth}: a deep memory is not affine in its weights (depth 1 is)"
    if opts.variant != "lmm" and opts.swa_impl == "dense":
      return "swa_impl='dense' builds the [T, N_p + T] mask; swa_impl='fused' runs the ring"
    if opts.variant != "lmm" and sizes.window is not None:
      return "a sliding window has no ring path"
    return ""

  @classmethod
  def check_context_parallel(cls, opts, sizes, causal, sequence):
    super().check_context_parallel(opts, sizes, causal, sequence)
    chunk = None if sizes.seq_len is None or sequence < 2 else sizes.seq_len // (2 * sequence)
    if chunk is not None and chunk % opts.chunk_size:
      raise ConfigError(f"mesh.sequence={sequence}: the {chunk} tokens of a context-parallel "
                        f"chunk (data.seq_len / 2 x mesh.sequence) must be a multiple of "
                        f"model.attention.neural_memory.chunk_size={opts.chunk_size}, whose "
                        "mini-batches may not straddle devices")

  @classmethod
  def op_shapes(cls, opts, sizes):
    return dict(super().op_shapes(opts, sizes), chunk_size=opts.chunk_size, depth=opts.depth)

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    o = self.opts
    self.variant = o.variant
    h, d, h_kv, dt = num_heads, self.head_dim, self.num_kv_heads, self.dtype
    self.memory = _Memory(d_model, h, d, depth=o.depth, expansion=o.expansion,
                          conv_size=o.conv_size, max_lr=o.max_lr, chunk_size=o.chunk_size,
                          impl=self.op_impl("memory_chunk"), dtype=dt, rngs=rngs,
                          momentum=o.momentum, weight_decay=o.weight_decay,
                          **self.memory_launch(o))
    width = h * d
    cols = dict(rngs=rngs, dtype=dt, head_dim=d)
    self.out_proj = base.dense(width, d_model, axes=base.ROWS, **cols)
    if self.variant in ("lmm", "mal"):
      self.gate_proj = base.dense(d_model, width, axes=base.COLUMNS, **cols)
    if self.variant == "lmm":
      return
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, h, h_kv, d, rngs=rngs, dtype=dt)
    shape, names = (o.num_persistent, h_kv, d), (None, "kv_heads", None)
    self.persistent_k = logical_axes.param(jax.random.normal(rngs.params(), shape, jnp.float32),
                                           names)
    self.persistent_v = logical_axes.param(
        jax.random.normal(rngs.params(), shape, jnp.float32) * 0.1, names)
    if self.variant in ("mag", "mac"):
      self.y_scale = logical_axes.param(jnp.ones((d_model,), jnp.float32), ("norm",))
    if self.variant == "mac" and o.store_norm:
      self.store_scale = logical_axes.param(jnp.ones((d_model,), jnp.float32), ("norm",))

  # -- pieces ----------------------------------------------------------------------------------

  def _rope(self, x, positions):
    return x if self.rope_theta is None else base.apply_rope(x, positions, self.rope_theta)

  def _kv(self, z, positions):
    k = base.split_heads(self.k_proj(z), self.num_kv_heads)
    return self._rope(k, positions), base.split_heads(self.v_proj(z), self.num_kv_heads)

  def _attend(self, q, k, v, mask):
    """q [B, Tq, H, D] over [persistent || k] (k, v [B, Tk, H_kv, D]); mask [B, 1, Tq, Tk]."""
    b, tq = q.shape[:2]
    n_p = self.opts.num_persistent
    per = lambda p: jnp.broadcast_to(p.value.astype(q.dtype), (b,) + p.value.shape)
    k = jnp.concatenate([per(self.persistent_k), k.astype(q.dtype)], axis=1)
    v = jnp.concatenate([per(self.persistent_v), v.astype(q.dtype)], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1, tq, n_p), bool), mask], axis=-1)
    o = softmax_attention(q, k, v, causal=False, mask=mask, impl=self.op_impl("softmax"))
    return self.o_proj(base.merge_heads(o))

  def _swa(self, z, positions, segment_ids):
    """Sliding-window causal attention over [persistent || z] (MAG's and MAL's branch)."""
    b, t, _ = z.shape
    q = self._rope(base.split_heads(self.q_proj(z), self.num_heads), positions)
    k, v = self._kv(z, positions)
    if self.opts.swa_impl == "dense":
      idx = base.sequence_index(b, t)
      mask = base.attention_mask(idx, idx, causal=True, q_segment_ids=segment_ids,
                                 k_segment_ids=segment_ids, window=self.window)
      return self._attend(q, k, v, mask)
    o = persistent_attention(q, k, v, self.persistent_k.value, self.persistent_v.value,
                             segment_ids=segment_ids, window=self.window,
                             impl=self.op_impl("softmax"))
    return self.o_proj(base.merge_heads(o))

  def _gate(self, y, r):
    """The paper's ⊗: normalized attention output gated by the normalized memory output."""
    return self.out_proj(_rms(y, self.y_scale.value) * jax.nn.sigmoid(self.memory.output(r)))

  def _mac_memory_input(self, y):
    """What MAC's memory reads and writes: rms(y) with `store_norm` (default), or the raw
    attention output y as in the paper. The next segment attends to what the memory returns, so with raw y any gain
    of the attention's projections compounds from segment to segment; the norm cuts that loop
    (MAG and MAL write the block's normalized input and have none)."""
    return _rms(y, self.store_scale.value) if self.opts.store_norm else y

  def _lmm(self, x, r):
    return self.out_proj(self.memory.output(r) * jax.nn.sigmoid(self.gate_proj(x)))

  def _memory_pass(self, x, seg):
    q, k, v, gates, _ = self.memory.streams(x, seg)
    r, _ = self.memory.update(q, k, v, gates, seg, self.memory.initial_state(x.shape[0]))
    return r, gates

  # -- full sequence ---------------------------------------------------------------------------

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    if not causal:
      raise ValueError("neural_memory is causal (a memory written left to right); use "
                       "model.causal=True")
    if self.variant == "mac":
      o, gates = self._mac(x, positions, segment_ids)
    else:
      z = x
      r, gates = self._memory_pass(x, segment_ids)
      if self.variant == "mag":
        o = self._gate(self._swa(x, positions, segment_ids), r)
      elif self.variant == "lmm":
        o = self._lmm(x, r)
      else:  # mal
        z = self._lmm(x, r)
        o = self._swa(z, positions, segment_ids)
    theta, alpha, _ = gates
    return o, {"memory_lr": jnp.mean(theta), "memory_forget": jnp.mean(alpha)}

  def _mac(self, x, positions, segment_ids):
    """Memory as context, one segment of L tokens after another (lax.scan)."""
    b, t, dm = x.shape
    seg_len = self.opts.segment_len
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = -t % seg_len
    # Padding is its own segment at the end: causality keeps it out of real tokens.
    xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    pos = jnp.pad(positions, ((0, 0), (0, pad)))
    segp = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    n = xp.shape[1] // seg_len
    q_mem, _, _, _, _ = self.memory.streams(xp, segp)  # h's queries come from x
    q_att = self._rope(base.split_heads(self.q_proj(xp), self.num_heads), pos)
    k_att, v_att = self._kv(xp, pos)
    to_segments = lambda a: jnp.moveaxis(a.reshape(b, n, seg_len, *a.shape[2:]), 1, 0)
    xs = [to_segments(a) for a in (q_mem, q_att, k_att, v_att, pos, segp)]
    prev_seg = jnp.concatenate([segp[:, :1], segp[:, seg_len - 1:-1:seg_len]], axis=1)
    init = self.memory.initial_state(b)
    tail = jnp.zeros((b, self.opts.conv_size - 1, 3, self.num_heads * self.head_dim), xp.dtype)
    gate_sums = jnp.zeros((3,), jnp.float32)

    def segment(carry, inputs):
      state, tail, sums = carry
      q_m, q_a, k_a, v_a, pos_s, seg_s, before = inputs
      # A packed sequence starting at this segment's first token restarts the memory.
      fresh = seg_s[:, 0] != before
      state = jax.tree.map(lambda s, i: jnp.where(fresh[(...,) + (None,) * (s.ndim - 1)], i, s),
                           state, init)
      tail = jnp.where(fresh[:, None, None, None], 0, tail)
      y = self._mac_attention(state, init, q_m, q_a, k_a, v_a, pos_s, seg_s)
      q, k, v, gates, tail = self.memory.streams(self._mac_memory_input(y), seg_s, tail)
      r, state = self.memory.update(q, k, v, gates, seg_s, state)
      sums = sums + jnp.stack([jnp.sum(g) for g in gates])
      return (state, tail, sums), self._gate(y, r)

    (_, _, gate_sums), o = jax.lax.scan(
        segment, (init, tail, gate_sums), xs + [jnp.moveaxis(prev_seg, 1, 0)])
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * seg_len, dm)[:, :t]
    count = b * n * seg_len * self.num_heads
    return o, tuple(gate_sums / count)

  def _mac_attention(self, state, init, q_m, q_a, k_a, v_a, pos_s, seg_s):
    """Attention of one segment over [persistent || h || segment]; returns y [B, L, d_model]."""
    b, length = seg_s.shape
    # h: retrieval with the memory before the segment (the initial one for tokens of a packed
    # sequence that began inside the segment).
    carried = (seg_s == seg_s[:, :1])[..., None, None]
    h = jnp.where(carried, self.memory.retrieve(state[0], q_m),
                  self.memory.retrieve(init[0], q_m))
    # h enters as retrieved (the paper's h_t): normalizing a near-zero retrieval would scale its
    # gradient by 1/|h| at every segment boundary, compounding over the segments.
    k_h, v_h = self._kv(base.merge_heads(h).astype(self.dtype), pos_s)
    idx = base.sequence_index(b, length)
    mask = base.attention_mask(idx, idx, causal=True, q_segment_ids=seg_s, k_segment_ids=seg_s)
    return self._attend(q_a, jnp.concatenate([k_h, k_a], 1), jnp.concatenate([v_h, v_a], 1),
                        jnp.concatenate([mask, mask], -1))

  # -- decoding --------------------------------------------------------------------------------

  def init_cache(self, batch, max_len, dtype=None):
    dtype = dtype or self.dtype
    cache = {"memory": self.memory.init_cache(batch), "index": jnp.zeros((), jnp.int32)}
    if self.variant == "lmm":
      return cache
    # MAC: the current segment. MAG / MAL: every token, or with a window a ring of `window`
    # slots (kv_cache.py), whatever max_len.
    length = (self.opts.segment_len if self.variant == "mac" else
              max_len if self.window is None else self.window)
    kv = jnp.zeros((batch, length, self.num_kv_heads, self.head_dim), dtype)
    cache.update(k=kv, v=kv)
    if self.variant == "mal":
      return cache
    if self.variant == "mac":
      cache.update(k_h=kv, v_h=kv, segment_start=self.memory.initial_state(batch)[0],
                   x_conv=jnp.zeros_like(cache["memory"]["conv"]))
    return cache

  def decode(self, x, *, positions, cache):
    if self.variant in ("mag", "mal"):  # the tokens fit the cache (one error line, not a clamp)
      kv_cache.check(cache, (*x.shape[:2], self.num_kv_heads, self.head_dim),
                     what="neural_memory", window=self.window)
    if x.shape[1] == 1:
      cache, o = self._decode_token(cache, x, positions)
      return o, cache

    def token(cache, inputs):
      x_t, pos_t = inputs
      return self._decode_token(cache, x_t[:, None], pos_t[:, None])

    cache, o = jax.lax.scan(token, cache, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(positions, 1, 0)))
    return jnp.moveaxis(o[:, :, 0], 0, 1), cache

  def _memory_token(self, mem, z):
    """z [B, 1, d_model] through the memory's streams and one decode step -> r [B, 1, H, D]."""
    q, k, v, gates, tail = self.memory.streams(z, None, mem["conv"])
    r, mem = self.memory.step(mem, q[:, 0], k[:, 0], v[:, 0], tuple(g[:, 0] for g in gates))
    mem["conv"] = tail
    return r[:, None], mem

  def _qkv(self, z, pos_t):
    """The attention's q [B, 1, H, D] and k, v [B, 1, H_kv, D] of z [B, 1, d_model]."""
    q = self._rope(base.split_heads(self.q_proj(z), self.num_heads), pos_t)
    return (q, *self._kv(z, pos_t))

  @staticmethod
  def _put(cache, slot, **new):
    """Writes each new [B, 1, H_kv, D] at `slot` of its buffer in `cache` (a dict of this step)."""
    for name, x in new.items():
      cache[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype),
                                                        slot, axis=1)

  def _attend_cache(self, q, k, v, mask):
    """_attend's math over a cache: q [B, Tq, H, D] over the persistent pairs and k, v
    [B, S, H_kv, D] under mask [B, 1, Tq, S], without concatenating them (over_cache), so no
    decode step copies the cache."""
    o = over_cache(q, k, v, self.persistent_k.value, self.persistent_v.value, mask)
    return self.o_proj(base.merge_heads(o))

  def _decode_token(self, cache, x, pos_t):
    b = x.shape[0]
    i = cache["index"]
    cache = dict(cache, index=i + 1)
    if self.variant in ("mag", "mal", "lmm"):
      r, cache["memory"] = self._memory_token(cache["memory"], x)
      if self.variant == "lmm":
        return cache, self._lmm(x, r)
      z = self._lmm(x, r) if self.variant == "mal" else x
      q, k, v = self._qkv(z, pos_t)
      if self.window is None:  # every token so far, in slots 0 .. i
        self._put(cache, i, k=k, v=v)
        visible = jnp.arange(cache["k"].shape[1]) <= i
        y = self._attend_cache(q, cache["k"], cache["v"],
                               jnp.broadcast_to(visible, (b, 1, 1, visible.shape[0])))
      else:  # the ring of the last W tokens
        ring = {"k": cache["k"], "v": cache["v"], "index": i}
        y, ring = kv_cache.window_attend(q, k, v, ring, window=self.window,
                                         attend=self._attend_cache, what="neural_memory")
        cache.update(k=ring["k"], v=ring["v"])
      return cache, (self._gate(y, r) if self.variant == "mag" else y)
    # MAC: slot j of the current segment; at j = 0 the memory (chunk-aligned) starts a segment.
    j = i % self.opts.segment_len
    mem = cache["memory"]
    cache["segment_start"] = jax.tree.map(lambda new, old: jnp.where(j == 0, new, old),
                                          mem["weights"], cache["segment_start"])
    q_m, _, _, _, cache["x_conv"] = self.memory.streams(x, None, cache["x_conv"])
    h = self.memory.retrieve(cache["segment_start"], q_m)
    k_h, v_h = self._kv(base.merge_heads(h).astype(self.dtype), pos_t)
    q, k, v = self._qkv(x, pos_t)
    self._put(cache, j, k_h=k_h, v_h=v_h, k=k, v=v)
    slots = jnp.arange(self.opts.segment_len)
    visible = jnp.tile(slots <= j, 2)
    mask = jnp.broadcast_to(visible, (b, 1, 1, visible.shape[0]))
    y = self._attend_cache(q, jnp.concatenate([cache["k_h"], cache["k"]], 1),
                           jnp.concatenate([cache["v_h"], cache["v"]], 1), mask)
    r, cache["memory"] = self._memory_token(mem, self._mac_memory_input(y))
    return cache, self._gate(y, r)
