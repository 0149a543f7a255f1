"""Lightning attention in TransNormerLLM's gated block (Qin et al. 2023/2024; official code
OpenNLPLab/lightning-attention and the TransNormerLLM model's NormLinearAttention).

    q, k = silu(x W_q), silu(x W_k);  v = x W_v;  u = x W_u
    o_t  = sum_{s<=t} lambda_h^{t-s} (q_t . k_s) v_s          (no softmax, no 1/sqrt(D))
    y    = W_o (SRMSNorm(o) * u),   SRMSNorm(x) = x / sqrt(mean(x^2) + eps)   (no learned scale)

Recurrent form: S_t = lambda_h S_{t-1} + k_t^T v_t, o_t = q_t S_t, so decoding keeps S only.
The attention itself is one call of the linear_scan kernel (Lightning Attention-2's layout:
intra-chunk masked matmuls with the decay matrix, inter-chunk through the carried state), with
log-decay g_h = log(lambda_h). SRMSNorm runs over the whole hidden width H*D, as the official
model does.

Decay schedules (option `decay`):
- "tnl" (default, official): g_h = -s_h (1 - l / (L - 1) + 1e-5), s_h the ALiBi slopes
  (2^(-8h/H), h = 1..H, for power-of-two H; interleaved otherwise), l the layer index and L the
  number of layers. With one layer (L - 1 = 0, where the official formula divides by zero) the
  factor is 1 + 1e-5.
- "fla": fla's chunk_lightning_attn schedule g_h = -(8/H)(1 - l/L) h, h = 0..H-1 (head 0 has
  no decay), for comparisons with fla.
- "none": no decay (plain unnormalized linear attention inside the same block).
`log_decay` (a tuple of H numbers <= 0) overrides the schedule. The decays are fixed, as in the
paper: they are static numbers, passed to the op under stop_gradient.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.linear_scan import decode_impl, linear_scan
from effattn.ranges import POSITIVE, ConfigError

ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "elu+1": lambda x: jax.nn.elu(x) + 1.0,
               "identity": lambda x: x}


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi slopes, as in lightning-attention's _build_slope_tensor."""
  def power_of_two(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
    return [start ** (i + 1) for i in range(n)]
  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


def decay_schedule(name: str, num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
  """Per-head log-decays g_h <= 0 of a named schedule ("tnl" | "fla" | "none")."""
  if name == "tnl":
    factor = 1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5
    return -np.asarray(alibi_slopes(num_heads)) * factor
  if name == "fla":
    return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * np.arange(num_heads)
  if name == "none":
    return np.zeros(num_heads)
  raise ValueError(f"model.attention.lightning.decay={name!r} must be one of 'tnl', 'fla', 'none'")


def srms_norm(x, eps: float):
  """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


@register("lightning")
class LightningAttention(base.Attention):
  """TransNormerLLM's gated lightning attention block with an O(1)-state decode."""

  DEFAULTS = {
      "decay": "tnl",  # tnl (official per-head, per-layer) | fla | none
      "log_decay": (),  # H explicit log-decays g_h <= 0; overrides `decay` when given
      "act": "silu",  # activation of q and k (official: silu)
      "norm_eps": 1e-6,  # SRMSNorm epsilon
      "scale": 1.0,  # score scale; the official op has none (fla defaults to D^-0.5)
  }
  OPS = ("linear_scan",)
  CONTEXT_PARALLEL = "causal"
  SUPPORTS = ("num_kv_heads", "head_dim")  # the decay, not a window, forgets the past
  CHOICES = {"decay": ("tnl", "fla", "none"), "act": tuple(ACTIVATIONS)}
  RANGES = {"norm_eps": POSITIVE, "scale": POSITIVE}

  @classmethod
  def check(cls, opts, sizes):
    if opts.log_decay:
      log_decay = np.asarray(opts.log_decay, np.float64)
      if log_decay.shape != (sizes.num_heads,) or np.any(log_decay > 0):
        raise ConfigError(f"model.attention.lightning.log_decay needs {sizes.num_heads} values "
                          f"<= 0 (one per head); got {opts.log_decay}")

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    opts = self.opts
    if opts.log_decay:
      log_decay = np.asarray(opts.log_decay, np.float64)
    else:
      log_decay = decay_schedule(opts.decay, num_heads, self.layer_idx, self.num_layers)
    self.log_decay = tuple(float(g) for g in log_decay)  # static and hashable
    d, h, h_kv = self.head_dim, num_heads, self.num_kv_heads
    cols = dict(rngs=rngs, dtype=self.dtype, head_dim=d)
    self.q_proj = base.dense(d_model, h * d, axes=base.COLUMNS, **cols)
    self.k_proj = base.dense(d_model, h_kv * d, axes=base.KV_COLUMNS, **cols)
    self.v_proj = base.dense(d_model, h_kv * d, axes=base.KV_COLUMNS, **cols)
    self.u_proj = base.dense(d_model, h * d, axes=base.COLUMNS, **cols)
    self.o_proj = base.dense(h * d, d_model, axes=base.ROWS, **cols)

  def forward(self, x, *, causal, segment_ids=None, state=None, impl=None):
    act = ACTIVATIONS[self.opts.act]
    q = act(base.split_heads(self.q_proj(x), self.num_heads))
    k = base.repeat_kv(act(base.split_heads(self.k_proj(x), self.num_kv_heads)), self.num_heads)
    v = base.repeat_kv(base.split_heads(self.v_proj(x), self.num_kv_heads), self.num_heads)
    # The paper fixes the decays (a schedule, not parameters); the op would differentiate them.
    log_decay = jax.lax.stop_gradient(jnp.asarray(self.log_decay, jnp.float32))
    o, state = linear_scan(q, k, v, log_decay, causal=causal, initial_state=state,
                           segment_ids=segment_ids, scale=self.opts.scale,
                           impl=impl or self.op_impl("linear_scan"), out_dtype=jnp.float32)
    o = srms_norm(base.merge_heads(o), self.opts.norm_eps) * self.u_proj(x).astype(jnp.float32)
    return self.o_proj(o.astype(x.dtype)), state

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    del positions, train  # the decay is the positional signal
    return self.forward(x, causal=causal, segment_ids=segment_ids)[0], {}

  def init_cache(self, batch, max_len, dtype=None):
    del max_len, dtype
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)

  def decode(self, x, *, positions, cache):
    del positions
    return self.forward(x, causal=True, state=cache,
                        impl=decode_impl(self.op_impl("linear_scan"), x.shape[1]))
