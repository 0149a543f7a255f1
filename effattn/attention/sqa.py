"""Sparse Query Attention (Filipek, Reactive AI 2025; RxAI-dev/RxNN SparseQueryAttention).

SQA cuts the number of *query* heads instead of key/value heads: H_q < H query heads of the
baseline's head dim D = d_model / H, H_kv <= H_q key/value heads shared by groups of H_q / H_kv
queries (GQA grouping, no repeated K/V), and an output projection from H_q * D back to d_model.
Attention FLOPs scale with H_q / H; the KV cache with H_kv / H.

Variants (option `variant`), with H the model's `num_heads`:
  sqa     H_q = H / 2, H_kv = H / 4
  ssqa    symmetric: H_q = H_kv = H / 2
  xsqa    extreme:   H_q = H_kv = H / 4
  xsmqa   extreme multi-query: H_q = H / 4, H_kv = 1
  general H_q = `num_query_heads` (None: H), H_kv = the shared `num_kv_heads` (None: H_q).
With H_q = H the general form is exactly GQA (the softmax mechanism with the same weights).

Everything past the head counts is the softmax mechanism: the same projections, RoPE, cuDNN /
XLA path, segments, sliding window and KV cache; this module only changes the shapes.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from effattn.attention import base
from effattn.attention.registry import register
from effattn.attention.softmax import SoftmaxAttention
from effattn.ranges import ConfigError, Range

# variant -> (query heads, kv heads) as fractions of H; None for kv heads means 1 (MQA).
VARIANTS = {"sqa": (2, 4), "ssqa": (2, 2), "xsqa": (4, 4), "xsmqa": (4, None)}


def head_counts(variant: str, num_heads: int, num_query_heads: int | None,
                num_kv_heads: int | None) -> tuple[int, int]:
  """(H_q, H_kv) of a variant for a baseline of `num_heads` heads; raises on impossible ones."""
  if variant == "general":
    h_q = num_heads if num_query_heads is None else int(num_query_heads)
    h_kv = h_q if num_kv_heads is None else int(num_kv_heads)
  elif variant in VARIANTS:
    q_div, kv_div = VARIANTS[variant]
    if num_heads % q_div or (kv_div and num_heads % kv_div):
      raise ConfigError(f"model.attention.sqa.variant={variant!r} needs model.num_heads="
                        f"{num_heads} divisible by {kv_div or q_div}; use variant='general'")
    if num_query_heads is not None or num_kv_heads is not None:
      raise ConfigError(f"model.attention.sqa.variant={variant!r} sets the head counts itself; "
                        "set num_query_heads / num_kv_heads only with variant='general'")
    h_q, h_kv = num_heads // q_div, (num_heads // kv_div if kv_div else 1)
  else:
    raise ConfigError(f"model.attention.sqa.variant={variant!r} must be one of "
                      f"{sorted(VARIANTS) + ['general']}")
  if not 0 < h_q <= num_heads:
    raise ConfigError(f"model.attention.sqa.num_query_heads={h_q} must be in [1, num_heads="
                      f"{num_heads}]")
  if h_kv <= 0 or h_q % h_kv:
    raise ConfigError(f"model.attention.num_kv_heads={h_kv} must divide the {h_q} query heads "
                      "of SQA")
  return h_q, h_kv


@register("sqa")
class SparseQueryAttention(SoftmaxAttention):
  """Softmax attention with H_q < H query heads of dim d_model / H, projected back from H_q * D.

  Attributes: `num_heads` is the number of *query* heads H_q (what the attention computes),
  `baseline_heads` the model's H that fixes the head dim, `num_kv_heads` is H_kv.
  """

  DEFAULTS = {
      "variant": "sqa",  # sqa | ssqa | xsqa | xsmqa | general
      "num_query_heads": None,  # H_q for variant='general' (None: num_heads, i.e. GQA)
  }
  CHOICES = {"variant": tuple(VARIANTS) + ("general",)}
  RANGES = {"num_query_heads": Range(1, integer=True, none_ok=True)}

  @classmethod
  def query_heads(cls, opts, num_heads, num_kv_heads):
    return head_counts(opts.variant, num_heads, opts.num_query_heads, num_kv_heads)[0]

  @classmethod
  def check(cls, opts, sizes):
    head_counts(opts.variant, sizes.num_heads, opts.num_query_heads, sizes.num_kv_heads)

  def __init__(self, cfg: Any, *, d_model: int, num_heads: int, rngs: nnx.Rngs, **kwargs):
    # base.Attention fixes head_dim = d_model / H from the baseline head count.
    base.Attention.__init__(self, cfg, d_model=d_model, num_heads=num_heads, rngs=rngs, **kwargs)
    h_q, h_kv = head_counts(self.opts.variant, num_heads, self.opts.num_query_heads,
                            self.sizes.num_kv_heads)
    self.baseline_heads = num_heads
    self.num_heads = h_q
    self.num_kv_heads = h_kv
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.qkvo_projections(
        d_model, h_q, h_kv, self.head_dim, rngs=rngs, dtype=self.dtype)
