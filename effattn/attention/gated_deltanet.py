"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR 2025; official NVlabs/GatedDeltaNet, and fla's GatedDeltaNet layer, whose defaults
these are).

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))    short causal depthwise
    q, k    = L2norm(q), L2norm(k)                                         convs of `conv_size`
    b_t     = sigmoid(x_t W_b)                      (x2 with allow_neg_eigval: b_t in (0, 2))
    g_t     = -exp(A_log_h) softplus(x_t W_a + dt_bias_h),   a_t = exp(g_t)   (Mamba-2 decay)
    S_t     = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = D_k^-1/2 q_t S_t
    y       = W_o (RMSNorm(o) * SiLU(x W_g))     per-head RMSNorm with a learned scale (fla's
                                                 FusedRMSNormGated); without use_gate, RMSNorm(o)

Heads: model.num_heads; key head dim D_k = model.attention.head_dim (default d_model / heads;
fla's default is 256) and value head dim D_v = expand_v * D_k. The delta rule runs on
kernels/delta_rule (chunked WY form; Pallas on GPU/TPU). Initialization as fla: A ~ U(0, 16),
A_log = log A; dt ~ logU(1e-3, 1e-1) and dt_bias = softplus^-1(dt); conv taps
U(-1/sqrt(K), 1/sqrt(K)) (PyTorch's Conv1d default), no conv bias.

Decoding keeps O(1) state per sequence: the last conv_size - 1 projected inputs (the convs'
memory) and the [H, D_k, D_v] delta-rule state. Packed segments: the convs never reach into
another segment and the state restarts at each one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import logical_axes
from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.delta_rule import delta_rule, delta_rule_step
from effattn.kernels.short_conv import short_conv
from effattn.ranges import POSITIVE, POSITIVE_INT, ConfigError


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis (fla's l2norm), in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("widths", "heads", "beta_max"))
def _streams(mixed, gates, taps, a_log, dt_bias, tail, segment_ids, *, widths, heads, beta_max):
  """Projections [B, T, sum(widths)] and [B, T, 2H] -> (q, k, v, log_gate, beta, conv tail)."""
  mixed, tail = short_conv(mixed, taps, tail, segment_ids)
  q, k, v = jnp.split(jax.nn.silu(mixed), [widths[0], widths[0] + widths[1]], axis=-1)
  q, k = (l2_normalize(base.split_heads(z, heads)) for z in (q, k))
  a, b = jnp.split(gates.astype(jnp.float32), 2, axis=-1)
  log_gate = -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
  return q, k, base.split_heads(v, heads), log_gate, beta_max * jax.nn.sigmoid(b), tail


@functools.partial(jax.jit, static_argnames="eps")
def gated_rms_norm(o, gate, scale, *, eps: float):
  """RMSNorm(o) * scale * SiLU(gate) over the last axis, in float32 (gate None: no gate)."""
  o = o.astype(jnp.float32)
  o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + eps) * scale
  return o if gate is None else o * jax.nn.silu(gate.astype(jnp.float32))


@register("gated_deltanet")
class GatedDeltaNet(base.Attention):
  """Gated DeltaNet: the gated delta rule behind short convolutions and a gated RMSNorm."""

  DEFAULTS = {
      "expand_v": 2.0,  # value head dim = expand_v * key head dim (fla: 2)
      "conv_size": 4,  # short causal depthwise conv on q, k, v (fla: 4)
      "use_gate": True,  # output gate SiLU(x W_g) after the norm (fla: True)
      "allow_neg_eigval": False,  # b_t = 2 sigmoid(.) in (0, 2) (fla's option; default off)
      "norm_eps": 1e-5,  # RMSNorm epsilon of the output norm (fla: 1e-5)
      "chunk_size": 64,  # tokens per chunk of the delta-rule kernel
  }
  OPS = ("delta_rule",)
  SUPPORTS = ("head_dim",)  # one key per value head; the decay, not a window, forgets the past
  CAUSAL_ONLY = True
  RANGES = {"expand_v": POSITIVE, "conv_size": POSITIVE_INT, "norm_eps": POSITIVE,
            "chunk_size": POSITIVE_INT}

  @classmethod
  def check(cls, opts, sizes):
    value_dim = opts.expand_v * sizes.head_dim
    if value_dim != int(value_dim):
      raise ConfigError(f"model.attention.gated_deltanet.expand_v={opts.expand_v} times "
                        f"head_dim={sizes.head_dim} must be a whole number (the value head dim); "
                        "pick expand_v so that it is")

  @classmethod
  def op_shapes(cls, opts, sizes):
    return dict(super().op_shapes(opts, sizes), Dv=int(opts.expand_v * sizes.head_dim))

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    o = self.opts
    value_dim = o.expand_v * self.head_dim
    h, dk, dt = num_heads, self.head_dim, self.dtype
    self.value_dim = dv = int(value_dim)
    self.widths = (h * dk, h * dk, h * dv)  # q | k | v channels of the fused projection
    self.qkv_proj = base.dense(d_model, sum(self.widths), rngs=rngs, dtype=dt, axes=base.FUSED)
    bound = o.conv_size ** -0.5
    self.conv = nnx.Param(jax.random.uniform(rngs.params(), (o.conv_size, sum(self.widths)),
                                             jnp.float32, -bound, bound))
    self.gate_proj = base.dense(d_model, 2 * h, rngs=rngs, dtype=dt,  # a | b, per head
                                axes=base.FUSED)
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, 0., 16.)))
    dt_init = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32, jnp.log(1e-3),
                                         jnp.log(1e-1)))
    dt_init = jnp.maximum(dt_init, 1e-4)
    self.dt_bias = nnx.Param(dt_init + jnp.log(-jnp.expm1(-dt_init)))    # softplus^-1
    if o.use_gate:
      self.out_gate_proj = base.dense(d_model, h * dv, rngs=rngs, dtype=dt, axes=base.COLUMNS,
                                      head_dim=dv)
    self.norm_scale = logical_axes.param(jnp.ones((dv,), jnp.float32), ("norm",))
    self.o_proj = base.dense(h * dv, d_model, rngs=rngs, dtype=dt, axes=base.ROWS, head_dim=dv)

  # -- pieces ----------------------------------------------------------------------------------

  def streams(self, x, segment_ids=None, conv_tail=None):
    """x [B, T, d_model] -> (q, k [B, T, H, Dk], v [B, T, H, Dv], log_gate, beta [B, T, H],
    the convs' new tail)."""
    return _streams(self.qkv_proj(x), self.gate_proj(x), self.conv.value, self.A_log.value,
                    self.dt_bias.value, conv_tail, segment_ids, widths=self.widths,
                    heads=self.num_heads, beta_max=2.0 if self.opts.allow_neg_eigval else 1.0)

  def output(self, x, o):
    """Per-head gated RMSNorm of o [B, T, H, Dv], heads merged and projected."""
    gate = (base.split_heads(self.out_gate_proj(x), self.num_heads) if self.opts.use_gate
            else None)
    o = gated_rms_norm(o, gate, self.norm_scale.value, eps=self.opts.norm_eps)
    return self.o_proj(base.merge_heads(o).astype(x.dtype))

  def _delta(self, q, k, v, log_gate, beta, segment_ids=None, state=None):
    return delta_rule(q, k, v, log_gate, beta, initial_state=state, segment_ids=segment_ids,
                      impl=self.op_impl("delta_rule"), chunk_size=self.opts.chunk_size)

  # -- full sequence ---------------------------------------------------------------------------

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    del positions, train  # the decay is the positional signal
    if not causal:
      raise ValueError("gated_deltanet is causal (a state written left to right); use "
                       "model.causal=True")
    q, k, v, log_gate, beta, _ = self.streams(x, segment_ids)
    o, _ = self._delta(q, k, v, log_gate, beta, segment_ids)
    return self.output(x, o), {"delta_write": jnp.mean(beta), "delta_log_decay": jnp.mean(log_gate)}

  # -- decoding --------------------------------------------------------------------------------

  def init_cache(self, batch, max_len, dtype=None):
    del max_len  # O(1) in the length
    h, dk, dv = self.num_heads, self.head_dim, self.value_dim
    return {"conv": jnp.zeros((batch, self.opts.conv_size - 1, sum(self.widths)),
                              dtype or self.dtype),
            "state": jnp.zeros((batch, h, dk, dv), jnp.float32)}

  def decode(self, x, *, positions, cache):
    del positions
    q, k, v, log_gate, beta, tail = self.streams(x, conv_tail=cache["conv"])
    if x.shape[1] == 1:  # one token: the recurrence itself, no chunking
      o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], log_gate[:, 0], beta[:, 0],
                                 cache["state"])
      o = o[:, None]
    else:
      o, state = self._delta(q, k, v, log_gate, beta, state=cache["state"])
    return self.output(x, o), {"conv": tail.astype(cache["conv"].dtype), "state": state}
