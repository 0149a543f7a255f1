"""The Mosaic GPU (Hopper) block-sparse kernels on CPU: they lower for cuda, refuse what they
cannot run, and their row-pair lists are right. Numbers need the GPU (no wgmma interpreter):
scripts/check_block_sparse_mosaic.py compares them with reference.py there."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effattn.kernels.block_sparse.common import (Aux, block_mask_from_lists, causal_block_mask,
                                                 lists_from_block_mask, transpose_lists)

mgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu",
                           reason="this jax has no Pallas Mosaic GPU")
if not hasattr(mgpu, "LoweringSemantics") or not hasattr(mgpu.LoweringSemantics, "Warpgroup"):
  pytest.skip("this jax's Mosaic GPU has no warpgroup lowering semantics", allow_module_level=True)

from effattn.kernels.block_sparse import pallas_mosaic_gpu  # noqa: E402


def _inputs(b, t, h, h_kv, d, bq, bk, features):
  n_q, n_k = t // bq, t // bk
  idx, cnt = lists_from_block_mask(jax.random.bernoulli(jax.random.key(0), 0.5,
                                                        (b, h, n_q, n_k)))
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, h_kv, d), jnp.bfloat16)
  aux = Aux()
  if "bias" in features:
    aux = aux._replace(kv_bias=jnp.zeros((b, h_kv, t)))
  if "segments" in features:
    # per key head on the keys, as dynamic_mask's chunk-sorted layout gives them
    kv_heads = h_kv if "threshold" in features else 1
    aux = aux._replace(q_seg=jnp.zeros((b, 1, t), jnp.int32),
                       kv_seg=jnp.zeros((b, kv_heads, t), jnp.int32))
  if "threshold" in features:
    aux = aux._replace(q_thr=jnp.zeros((b, h_kv, t)), q_thr_pos=jnp.zeros((b, h_kv, t), jnp.int32),
                       q_pos=jnp.zeros((b, h, t), jnp.int32),
                       kv_pos=jnp.zeros((b, h_kv, t), jnp.int32))
  return q, kv, idx, cnt, aux


CONFIGS = {
    "causal-gqa-d128": ((1, 256, 4, 2, 128, 128, 128), (), True),  # consumers share one list
    "b64-features": ((1, 192, 4, 2, 64, 64, 64), ("bias", "segments", "threshold"), True),
    "b64x128-segments": ((2, 256, 2, 2, 64, 64, 128), ("segments",), False),
    # window=40 (under a tile); without causality it still needs the default positions
    "causal-window-d128": ((1, 256, 4, 2, 128, 128, 128), ("window",), True),
    "window-b64-segments": ((1, 192, 4, 2, 64, 64, 64), ("segments", "window"), False),
}
# The default backward on every config; the others (slower on the H200 so far, see
# docs/mosaic_gpu.md) once or twice: "fused" splits dQ columns between the consumers at head
# dim 128 and adds per consumer ("keys") at 64.
LOWERINGS = ([(c, "split") for c in CONFIGS]
             + [("causal-gqa-d128", "fused"), ("b64-features", "fused"),
                ("causal-gqa-d128", "fused_keys"), ("b64x128-segments", "staged"),
                ("causal-window-d128", "fused"), ("window-b64-segments", "staged"),
                ("window-b64-segments", "fused_keys")])


def _kernel_hashes(text: str) -> list[str]:
  return re.findall(r'kernel_hash = "((?:[^"\\]|\\.)*)"', text)


@pytest.mark.parametrize("config,bwd", LOWERINGS)
def test_forward_and_backward_lower_for_cuda(config, bwd):
  dims, features, causal = CONFIGS[config]
  b, t, h, h_kv, d, bq, bk = dims
  q, kv, idx, cnt, aux = _inputs(*dims, features)
  q_idx, q_cnt = transpose_lists(idx, cnt, t // bk)
  window = 40 if "window" in features else None

  def lowered_text(window):
    static = dict(causal=causal, scale=d ** -0.5, block_q=bq, block_k=bk, window=window)

    def fwd_bwd(q, k, v):
      o, lse = pallas_mosaic_gpu.forward(q, k, v, idx, cnt, aux, **static)
      delta = jnp.zeros(lse.shape, jnp.float32)
      return o, lse, pallas_mosaic_gpu.backward(q, k, v, lse, o, delta, idx, cnt, q_idx, q_cnt,
                                                aux, **static, bwd=bwd)

    return fwd_bwd, jax.jit(fwd_bwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()

  fwd_bwd, text = lowered_text(window)
  kernels = 2 if bwd.startswith("fused") else 3
  assert text.count("custom_call @mosaic_gpu") == kernels, text[:2000]
  if window is not None:  # the window reaches every kernel: none is the windowless one
    hashes, plain = _kernel_hashes(text), _kernel_hashes(lowered_text(None)[1])
    assert len(hashes) == len(plain) == kernels and not set(hashes) & set(plain)
  if bwd.startswith("fused"):  # dQ is added into a zeroed float32 buffer the kernel aliases
    assert "output_operand_aliases" in text
  out = jax.eval_shape(fwd_bwd, q, kv, kv)
  dq, dk, dv, dbias = out[2]
  assert (dq.shape, dk.shape, dv.shape) == (q.shape, kv.shape, kv.shape)
  assert (dbias is None) == ("bias" not in features)
  if dbias is not None:
    assert dbias.shape == (b, h_kv, t) and dbias.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": jnp.float32}, r"q.dtype=float32 is not bfloat16 or float16 .*impl='pallas_gpu'"),
    ({"d": 96}, r"head_dim=96 is not one of \(64, 128\); use impl='xla'"),
    ({"block_q": 32}, r"block_q=32 is not one of \(64, 128\); set block_q .*impl='pallas_gpu'"),
    ({"interpret": True}, "interpret=True cannot run .*impl='pallas_gpu' with interpret=True"),
])
def test_refuses_with_a_value_error_naming_the_fix(kwargs, match):
  d, dtype = kwargs.pop("d", 64), kwargs.pop("dtype", jnp.bfloat16)
  block_q = kwargs.pop("block_q", 64)
  q = jnp.zeros((1, 128, 1, d), dtype)
  idx, cnt = lists_from_block_mask(jnp.ones((1, 1, 128 // block_q, 2), bool))
  with pytest.raises(ValueError, match=match):
    pallas_mosaic_gpu.forward(q, q, q, idx, cnt, Aux(), causal=True, scale=0.1,
                              block_q=block_q, block_k=64, **kwargs)


def test_row_pair_lists_are_the_union_with_membership():
  mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 3, 5, 7))  # odd row count
  mask = mask.at[:, :, 1].set(False)
  idx, cnt = lists_from_block_mask(mask)
  u_idx, u_cnt, member = jax.jit(pallas_mosaic_gpu._cta_lists, static_argnums=(2, 3))(
      idx, cnt, 7, 64)
  padded = np.concatenate([np.asarray(mask), np.zeros((2, 3, 1, 7), bool)], axis=2)
  pairs = padded.reshape(2, 3, 3, 2, 7)
  np.testing.assert_array_equal(np.asarray(block_mask_from_lists(u_idx, u_cnt, 7)),
                                pairs.any(axis=3))
  valid = np.arange(u_idx.shape[-1]) < np.asarray(u_cnt)[..., None]
  for w in range(2):
    got = np.take_along_axis(pairs[:, :, :, w], np.asarray(u_idx), axis=-1)
    np.testing.assert_array_equal(np.asarray(member[:, :, :, w]) * valid, got * valid)
  # Lists made at tile 128 pass through untouched.
  c_idx, c_cnt = lists_from_block_mask(causal_block_mask(4, 4, 128, 128)[None, None])
  same = pallas_mosaic_gpu._cta_lists(c_idx, c_cnt, 4, 128)
  assert same[0] is c_idx and same[1] is c_cnt and same[2] is None


def test_unknown_backward_variant_is_named():
  q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  idx, cnt = lists_from_block_mask(jnp.ones((1, 1, 1, 1), bool))
  lse = jnp.zeros((1, 1, 128), jnp.float32)
  with pytest.raises(ValueError, match="bwd='nope'"):
    pallas_mosaic_gpu.backward(q, q, q, lse, q, lse, idx, cnt, idx, cnt, Aux(), causal=True,
                               scale=0.1, block_q=128, block_k=128, bwd="nope")


@pytest.mark.parametrize("d,dq_mode,most,want", [
    (128, None, 2, 3),  # 64-query stages are half the split kernel's: one more fits
    (128, "cols", 2, 2),  # dS and dQ staging take the room of a third stage
    (128, "keys", 2, 2),
    (64, "keys", 2, 3),
    (64, None, 5, 5),
])
def test_staged_kernel_gets_the_stages_that_fit(d, dq_mode, most, want):
  assert pallas_mosaic_gpu._staged_stages(most, d, jnp.bfloat16, [], dq_mode) == want


def test_backward_register_split_reaches_both_backward_kernels_only():
  """registers=(240, 24) (FlashAttention-3's split) rebuilds the dQ and dK/dV kernels; the
  forward is untouched; a split setmaxnreg cannot hold is refused by name."""
  dims, features, causal = CONFIGS["causal-gqa-d128"]
  b, t, h, h_kv, d, bq, bk = dims
  q, kv, idx, cnt, aux = _inputs(*dims, features)
  q_idx, q_cnt = transpose_lists(idx, cnt, t // bk)
  static = dict(causal=causal, scale=d ** -0.5, block_q=bq, block_k=bk)

  def hashes(**kw):
    def fwd_bwd(q, k, v):
      o, lse = pallas_mosaic_gpu.forward(q, k, v, idx, cnt, aux, **static)
      return o, pallas_mosaic_gpu.backward(q, k, v, lse, o, jnp.zeros(lse.shape, jnp.float32),
                                           idx, cnt, q_idx, q_cnt, aux, **static, **kw)
    return _kernel_hashes(jax.jit(fwd_bwd).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",)).as_text())

  default, fa3 = hashes(), hashes(registers=(240, 24))
  assert len(default) == len(fa3) == 3
  assert default[0] == fa3[0] and not set(default[1:]) & set(fa3[1:])
  with pytest.raises(ValueError, match=r"registers=\(248, 24\) must be .*<= 512"):
    hashes(registers=(248, 24))
