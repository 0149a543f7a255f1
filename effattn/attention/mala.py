"""Magnitude-aware linear attention, MALA (Fan et al., ICCV 2025, "Rectifying Magnitude Neglect
in Linear Attention"; official code qhfan/MALA, classfication_release/model.py, AddLinearAttention).

Linear attention divides by phi(q_i) . sum_j phi(k_j), which cancels ||phi(q_i)||: scaling a query
cannot sharpen its scores. MALA replaces the division by a scale and an offset:

    s_ij = phi(q_i) . phi(k_j) * D^-0.5 / N          (the official kernel scale)
    z_i  = sum_j s_ij,   beta_i = 1 + 1 / z_i,   gamma_i = z_i / N
    score(i, j) = beta_i s_ij - gamma_i              (sums to 1 over j, may be negative)
    o_i  = beta_i sum_j s_ij v_j - z_i * mean_j v_j

phi = elu + 1; the official code adds eps = 1e-6 to z inside 1 / z. Causal form (ours; the paper
is bidirectional vision): j runs over the tokens of the segment up to i and N becomes their count
N_i (derivation in docs/mechanisms_linear.md). Every piece is a prefix sum: the numerator
sum_j phi(k_j)^T v_j and the key sum come from the linear_scan kernel family (scale D^-0.5), the
value sum and the count are cumulative sums, so decoding carries an O(1) state
(kv, k_sum, v_sum, count).

Options from the official layer, off by default for sequence models (the issue/spec asks so):
`rope` rotates phi(q), phi(k) for the numerator only, after z is computed, as the official code
does (z then stays RoPE-free, so scores no longer sum exactly to 1); `lepe_kernel` > 0 adds a
depthwise convolution of v over the last `lepe_kernel` tokens (causal; centred when
bidirectional; the official one is 5x5 over the image); `output_gate` multiplies by a linear
projection of x before the output projection (the official `res * o`, no activation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import logical_axes
from effattn.attention import base
from effattn.attention.registry import register
from effattn.kernels.linear_scan import (decode_impl, linear_scan, linear_scan_normalizer,
                                          segment_runs)
from effattn.ranges import NON_NEGATIVE, NON_NEGATIVE_INT, ConfigError


class MalaState(NamedTuple):
  """Recurrent state of causal MALA; float32."""

  kv: jax.Array      # [B, H, Dk, Dv]  sum of phi(k)^T v   (RoPE'd features when rope=True)
  k_sum: jax.Array   # [B, H, Dk]      sum of phi(k)
  v_sum: jax.Array   # [B, H, Dv]      sum of v
  count: jax.Array   # [B]             tokens so far
  v_tail: jax.Array  # [B, K-1, H, Dv] last values for the lepe convolution (K-1 = 0 when off)


def segment_cumsum(x, runs, *, reverse: bool = False):
  """Inclusive cumulative sum of x [B, T, ...] along T, restarting at each new run.

  runs: [B, T] run ids (kernels.linear_scan.segment_runs) or None. A segmented associative scan,
  not a difference of global prefix sums, so other segments never cost precision.
  """
  if runs is None:
    return jax.lax.cumsum(x, axis=1, reverse=reverse)
  # A token starts a run where the run id differs from its predecessor in scan order.
  if reverse:
    starts = jnp.concatenate([runs[:, :-1] != runs[:, 1:], jnp.ones_like(runs[:, :1], bool)], 1)
  else:
    starts = jnp.concatenate([jnp.ones_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], 1)
  starts = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    (a_sum, a_start), (b_sum, b_start) = a, b
    return jnp.where(b_start, b_sum, a_sum + b_sum), a_start | b_start

  return jax.lax.associative_scan(combine, (x, starts), reverse=reverse, axis=1)[0]


def mala_attention(phi_q, phi_k, v, *, causal: bool = True, segment_ids=None, eps: float = 1e-6,
                   rope_q=None, rope_k=None, state: MalaState | None = None,
                   impl: str = "auto"):
  """MALA on feature-mapped queries and keys (formula in the module docstring).

  Args:
    phi_q, phi_k: [B, T, H, Dk] non-negative features; v: [B, T, H, Dv].
    causal: the causal form (sums and N over tokens up to i); else the paper's over the segment.
    segment_ids: [B, T] packed sequences.
    eps: added to z in 1 / z (official 1e-6).
    rope_q, rope_k: RoPE-rotated features for the numerator (None: phi_q, phi_k).
    state: MalaState carried in (causal only); its v_tail is ignored here.
    impl: linear_scan impl.

  Returns:
    (o [B, T, H, Dv] float32, MalaState after the last token; v_tail left as given / empty).
  """
  b, t, h, dk = phi_q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5
  kw = dict(causal=causal, segment_ids=segment_ids, scale=scale, impl=impl)
  num, kv = linear_scan(phi_q if rope_q is None else rope_q, phi_k if rope_k is None else rope_k,
                        v, initial_state=None if state is None else state.kv,
                        out_dtype=jnp.float32, **kw)
  zk, k_sum = linear_scan_normalizer(phi_q, phi_k,
                                     initial_state=None if state is None else state.k_sum, **kw)
  runs = None if segment_ids is None else segment_runs(segment_ids)
  v32 = v.astype(jnp.float32)
  ones = jnp.ones((b, t, 1), jnp.float32)
  v_sum = segment_cumsum(v32, runs)
  count = segment_cumsum(ones, runs)                                         # [B, T, 1]
  if not causal:  # totals over the segment: forward + backward inclusive sums - self
    v_sum = v_sum + segment_cumsum(v32, runs, reverse=True) - v32
    count = count + segment_cumsum(ones, runs, reverse=True) - ones
  if state is not None:  # the carried prefix belongs to the first segment only
    first = (jnp.ones((b, t), bool) if runs is None else runs == runs[:, :1])[..., None]
    v_sum = v_sum + jnp.where(first[..., None], state.v_sum[:, None], 0.)
    count = count + jnp.where(first, state.count[:, None, None], 0.)
  n = count[..., None]                                                       # [B, T, 1, 1]
  z = zk[..., None] / n
  o = num / n * (1.0 + 1.0 / (z + eps)) - z * v_sum / n
  new_state = MalaState(kv, k_sum, v_sum[:, -1], count[:, -1, 0],
                        jnp.zeros((b, 0, h, dv), jnp.float32) if state is None else state.v_tail)
  return o, new_state


def mala_scores(phi_q, phi_k, *, causal: bool = True, eps: float = 0.0, segment_ids=None,
                rope_q=None, rope_k=None):
  """The explicit [B, H, T, T] score matrix beta_i s_ij - gamma_i (zero where masked), float32,
  so that mala_attention's o_i = sum_j score(i, j) v_j.

  The keys visible to query i are those of its segment (up to i when causal), N_i their count.
  rope_q, rope_k: the RoPE-rotated features of the numerator (z stays unrotated, as in
  mala_attention). For analysis and tests (O(T^2)).
  """
  b, t, _, dk = phi_q.shape
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  idx = base.sequence_index(b, t)
  mask = base.attention_mask(idx, idx, causal=causal, q_segment_ids=segment_ids,
                             k_segment_ids=segment_ids)                  # [B, 1, T, T]
  n = jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32)          # [B, 1, T, 1]
  scores = lambda a, c: jnp.where(  # noqa: E731
      mask, jnp.einsum("bihd,bjhd->bhij", f32(a), f32(c)) * dk ** -0.5 / n, 0.)
  s = scores(phi_q, phi_k)
  z = jnp.sum(s, axis=-1, keepdims=True)
  if rope_q is not None:
    s = scores(rope_q, rope_k)
  return jnp.where(mask, (1.0 + 1.0 / (z + eps)) * s - z / n, 0.)


@register("mala")
class MalaAttention(base.Attention):
  """Magnitude-aware linear attention with an O(1)-state decode."""

  DEFAULTS = {
      "eps": 1e-6,  # added to z in 1 / z (official value)
      "rope": False,  # official: RoPE on phi(q), phi(k) in the numerator only
      "lepe_kernel": 0,  # official: depthwise conv of v (5x5 in 2D); 0 = off
      "output_gate": False,  # official: multiply by a linear projection of x before W_o
  }
  OPS = ("linear_scan",)
  SUPPORTS = ("num_kv_heads", "head_dim")  # the state holds every past token: no window
  RANGES = {"eps": NON_NEGATIVE, "lepe_kernel": NON_NEGATIVE_INT}

  @classmethod
  def check(cls, opts, sizes):
    if opts.rope and sizes.head_dim % 2:
      raise ConfigError(f"model.attention.mala.rope needs an even head_dim, got {sizes.head_dim}")

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    d, h, h_kv = self.head_dim, num_heads, self.num_kv_heads
    cols = dict(rngs=rngs, dtype=self.dtype, head_dim=d)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, h, h_kv, d, rngs=rngs, dtype=self.dtype)
    self.gate_proj = (base.dense(d_model, h * d, axes=base.COLUMNS, **cols)
                      if self.opts.output_gate else None)
    k = self.opts.lepe_kernel
    self.lepe = (logical_axes.param(jax.random.normal(rngs.params(), (k, h * d)) * k ** -0.5,
                                    (None, "heads"), head_dim=d) if k else None)

  def _lepe(self, v, tail, causal, runs):
    """Depthwise conv of v [B, T, H, D] over time within segments; tail: [B, K-1, H, D] before."""
    k = self.opts.lepe_kernel
    w = self.lepe.value.reshape(k, self.num_heads, self.head_dim)
    left = k - 1 if causal else (k - 1) // 2
    padded = jnp.concatenate([tail.astype(v.dtype), v], 1) if causal else jnp.pad(
        v, ((0, 0), (left, k - 1 - left), (0, 0), (0, 0)))
    b, t = v.shape[:2]
    r = None
    if runs is not None:  # -1 marks the tail / padding: never equal to a real run
      r = jnp.pad(runs, ((0, 0), (left, k - 1 - left)), constant_values=-1) if not causal else (
          jnp.concatenate([jnp.full((b, k - 1), -1, runs.dtype), runs], 1))
    out = jnp.zeros(v.shape, jnp.float32)
    for j in range(k):  # tap j looks back k-1-j tokens (causal)
      tap = padded[:, j:j + t].astype(jnp.float32) * w[k - 1 - j if causal else j]
      if r is not None:
        tap = jnp.where((r[:, j:j + t] == runs)[..., None, None], tap, 0.)
      out = out + tap
    return out

  def features(self, x, positions):
    """x [B, T, d_model] -> phi(q), phi(k) [B, T, H, D] and their RoPE-rotated copies for the
    numerator (None without the rope option)."""
    phi = lambda y: jax.nn.elu(y) + 1.0  # noqa: E731
    q = phi(base.split_heads(self.q_proj(x), self.num_heads))
    k = base.repeat_kv(phi(base.split_heads(self.k_proj(x), self.num_kv_heads)), self.num_heads)
    if not self.opts.rope:
      return q, k, None, None
    theta = self.rope_theta or 10000.0
    return q, k, base.apply_rope(q, positions, theta), base.apply_rope(k, positions, theta)

  def forward(self, x, *, positions, causal, segment_ids=None, state=None, impl=None):
    q, k, rope_q, rope_k = self.features(x, positions)
    v = base.repeat_kv(base.split_heads(self.v_proj(x), self.num_kv_heads), self.num_heads)
    o, new_state = mala_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                  eps=self.opts.eps, rope_q=rope_q, rope_k=rope_k, state=state,
                                  impl=impl or self.op_impl("linear_scan"))
    if self.lepe is not None:
      runs = None if segment_ids is None else segment_runs(segment_ids)
      tail = (jnp.zeros((x.shape[0], self.opts.lepe_kernel - 1) + v.shape[2:], v.dtype)
              if state is None else state.v_tail)
      o = o + self._lepe(v, tail, causal, runs)
      keep = self.opts.lepe_kernel - 1
      new_state = new_state._replace(
          v_tail=jnp.concatenate([tail.astype(jnp.float32), v.astype(jnp.float32)], 1)[
              :, tail.shape[1] + v.shape[1] - keep:])
    o = base.merge_heads(o)
    if self.gate_proj is not None:
      o = o * self.gate_proj(x).astype(jnp.float32)
    return self.o_proj(o.astype(x.dtype)), new_state

  def __call__(self, x, *, positions, segment_ids=None, causal=True, train=False):
    del train
    return self.forward(x, positions=positions, causal=causal, segment_ids=segment_ids)[0], {}

  def attention_weights(self, x, *, positions, segment_ids=None, causal=True):
    """mala_scores of this layer's features (the lepe convolution and the output gate act
    outside the scores): [B, H, T, T]."""
    q, k, rope_q, rope_k = self.features(x, positions)
    return mala_scores(q, k, causal=causal, eps=self.opts.eps, segment_ids=segment_ids,
                       rope_q=rope_q, rope_k=rope_k)

  def init_cache(self, batch, max_len, dtype=None):
    del max_len, dtype
    h, d = self.num_heads, self.head_dim
    tail = max(self.opts.lepe_kernel - 1, 0)
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    return MalaState(zeros(batch, h, d, d), zeros(batch, h, d), zeros(batch, h, d), zeros(batch),
                     zeros(batch, tail, h, d))

  def decode(self, x, *, positions, cache):
    return self.forward(x, positions=positions, causal=True, state=cache,
                        impl=decode_impl(self.op_impl("linear_scan"), x.shape[1]))
