"""Pre-norm decoder-only transformer whose attention comes from the registry.

    tokens [B, T] -> embed (+ learned positions) -> L x Block -> RMSNorm -> head
    head "lm": logits [B, T, V] (tied or separate projection)
    head "classifier": mean over real tokens -> logits [B, C]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effattn import attention, logical_axes
from effattn.kernels import context_parallel
from effattn.model import pattern
from effattn.model.layers import Embed, GatedMLP, RMSNorm, default_mlp_hidden

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); returns the block's aux dict too.

  `attention_cfg` is this layer's attention config (model.pattern's entry); default
  cfg.attention."""

  def __init__(self, cfg: Any, layer_idx: int, *, rngs: nnx.Rngs, attention_cfg: Any = None):
    dtype = compute_dtype(cfg.dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attn = attention.build(
        cfg.attention if attention_cfg is None else attention_cfg, d_model=cfg.d_model,
        num_heads=cfg.num_heads, rngs=rngs,
        layer_idx=layer_idx, num_layers=cfg.num_layers, dtype=dtype,
        rope_theta=cfg.rope_theta if cfg.position == "rope" else None)
    if cfg.mlp == "gated":
      self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
      self.mlp = GatedMLP(cfg.d_model, cfg.mlp_hidden or default_mlp_hidden(cfg.d_model),
                          dtype=dtype, rngs=rngs)
    else:
      self.mlp = None

  def __call__(self, x, *, positions, segment_ids, causal, train):
    # Tokens split over mesh.sequence reach only mechanisms built for it (config-time check too).
    self.attn.check_context_parallel(self.attn.opts, self.attn.sizes, causal,
                                     context_parallel.sequence_size())
    # The residual stream [B, T, d] is whole over the tensor axis at each boundary: the
    # row-parallel attention output and MLP down projection are summed there (Megatron's two
    # all-reduces per block); a no-op without the trainer's mesh rules (logical_axes).
    x = logical_axes.constrain(x, logical_axes.RESIDUAL)
    y, aux = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                       causal=causal, train=train)
    x = logical_axes.constrain(x + y, logical_axes.RESIDUAL)
    if self.mlp is not None:
      x = logical_axes.constrain(x + self.mlp(self.mlp_norm(x)), logical_axes.RESIDUAL)
    return x, aux

  def decode(self, x, *, positions, cache):
    y, cache = self.attn.decode(self.attn_norm(x), positions=positions, cache=cache)
    x = x + y
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return x, cache


class Transformer(nnx.Module):
  """The shared model. `cfg` is `config.model` with vocab_size (and num_classes) filled in."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    if not cfg.vocab_size:
      raise ValueError("model.vocab_size is unset; the trainer fills it from the task, or set it")
    # Plain fields only: a ConfigDict attribute would make the GraphDef unhashable.
    self.head, self.causal, self.remat = cfg.head, cfg.causal, cfg.remat
    self.position, self.max_len = cfg.position, cfg.max_len
    self.tie_embeddings = cfg.tie_embeddings
    self.dtype = compute_dtype(cfg.dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, rngs=rngs)
    if cfg.position == "learned":
      self.pos_embed = Embed(cfg.max_len, cfg.d_model, dtype=self.dtype, rngs=rngs, rows=None)
    # One attention config per layer: model.pattern's entries, or model.attention for all.
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs, attention_cfg=att)
                            for i, att in enumerate(pattern.layer_attention(cfg))])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)
    init = nnx.initializers.lecun_normal()  # nnx.Linear's default, named
    if cfg.head == "classifier":
      if not cfg.num_classes:
        raise ValueError("model.head='classifier' needs model.num_classes")
      self.classifier = nnx.Linear(cfg.d_model, cfg.num_classes,
                                   kernel_init=logical_axes.init(init, ("embed", None)), **kw)
    elif not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size,
                                kernel_init=logical_axes.init(init, ("embed", "vocab")), **kw)

  def embed_tokens(self, tokens, positions):
    x = self.embed(tokens)
    if self.position == "learned":
      x = x + self.pos_embed(jnp.minimum(positions, self.max_len - 1))
    return x

  def logits(self, x):
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.tie_embeddings else self.lm_head(x)
    return logical_axes.constrain(logits.astype(jnp.float32), logical_axes.LOGITS)

  def __call__(self, tokens, *, positions=None, segment_ids=None, train=False):
    """tokens [B, T] -> (logits [B, T, V] or [B, C], aux: each term's mean over the layers
    that report it, so in a hybrid stack every mechanism's terms appear, each at its scale)."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens, positions)
    aux_terms: dict[str, list] = {}

    def run_block(block, x):
      return block(x, positions=positions, segment_ids=segment_ids, causal=self.causal,
                   train=train)

    if self.remat:  # recompute block activations in the backward pass to save memory
      run_block = nnx.remat(run_block)
    for block in self.blocks:
      x, aux = run_block(block, x)
      for k, v in aux.items():
        aux_terms.setdefault(k, []).append(v)
    aux = {k: jnp.mean(jnp.stack(v)) for k, v in aux_terms.items()}
    if self.head == "classifier":
      h = self.final_norm(x).astype(jnp.float32)
      real = (segment_ids > 0) if segment_ids is not None else jnp.ones((b, t), bool)
      pooled = jnp.sum(h * real[..., None], 1) / jnp.maximum(real.sum(1, keepdims=True), 1)
      return self.classifier(pooled.astype(self.dtype)).astype(jnp.float32), aux
    return self.logits(x), aux

  def attention_weights(self, tokens, *, positions=None, segment_ids=None,
                        layers=None) -> list:
    """The attention weights (Attention.attention_weights: a_ij with o_i = sum_j a_ij v_j),
    float32 [B, H, T, T], of each layer in `layers` (default: all), on the inputs the forward
    pass gives that layer. For analysis at small T; a mechanism without such weights raises."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layers = range(len(self.blocks)) if layers is None else layers
    x = self.embed_tokens(tokens, positions)
    weights = []
    for i, block in enumerate(self.blocks):
      if i > max(layers):
        break
      if i in layers:
        weights.append(block.attn.attention_weights(
            block.attn_norm(x), positions=positions, segment_ids=segment_ids, causal=self.causal))
      x, _ = block(x, positions=positions, segment_ids=segment_ids, causal=self.causal,
                   train=False)
    return weights

  def init_cache(self, batch: int, max_len: int) -> list:
    """One cache per layer, each its mechanism's own structure (mixed in a hybrid stack)."""
    return [block.attn.init_cache(batch, max_len, self.dtype) for block in self.blocks]

  def decode(self, tokens, *, positions, cache):
    """Appends tokens [B, T] after the cached ones: (logits [B, T, V], new cache)."""
    if self.head != "lm":
      raise ValueError("decode needs model.head='lm'")
    x = self.embed_tokens(tokens, positions)
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, positions=positions, cache=c)
      new_cache.append(c)
    return self.logits(x), new_cache
