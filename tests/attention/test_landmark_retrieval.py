"""landmark's forward pass by top-k retrieval at inference (forward_top_k): with every block
retrieved it is the grouped softmax, with fewer it is decoding with that top_k, training ignores
it, and a packed row is refused with NaN."""

import jax.numpy as jnp
import numpy as np

from effattn.testing import assert_close
from effattn.testing.inputs import random_inputs, two_segments
from effattn.testing.mechanisms import Jitted, build

T = 30  # 8 blocks of 4, the last one short; query chunks of 8 leave 2 padded tokens


def _landmark(forward_top_k, **options):
  return Jitted(build("landmark", impl="xla", landmark={
      "block_len": 4, "query_chunk": 8, "forward_top_k": forward_top_k, **options}))


def test_every_block_retrieved_is_the_grouped_softmax():
  x, pos = random_inputs(length=T)
  want, _ = _landmark(0)(x, positions=pos)
  got, _ = _landmark(8)(x, positions=pos, segment_ids=jnp.ones((2, T), jnp.int32))
  assert_close("y", want, got, reduction=T)


def test_fewer_blocks_equal_decoding_with_that_top_k_and_training_ignores_it():
  x, pos = random_inputs(length=T)
  attn = _landmark(2, top_k=2)
  got, _ = attn(x, positions=pos)
  cache = attn.init_cache(2, T, x.dtype)
  steps = []
  for i in range(T):  # one token at a time
    y, cache = attn.decode(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache)
    steps.append(y)
  assert_close("y", jnp.concatenate(steps, 1), got, reduction=T)
  full, _ = _landmark(0)(x, positions=pos)
  assert not np.allclose(got[:, 12:], full[:, 12:], atol=1e-4)  # far queries lost blocks
  trained, _ = attn(x, positions=pos, train=True)
  assert_close("train=True", full, trained, reduction=T)


def test_padding_after_a_row_is_fine_and_packed_rows_are_nan():
  x, pos = random_inputs(length=T)
  seg = np.asarray(two_segments(2, T, 20)).copy()  # row 0 packs two segments
  seg[1, 25:] = 0  # row 1: one sequence, then padding
  y, _ = _landmark(2)(x, positions=pos, segment_ids=jnp.asarray(seg))
  assert np.all(np.isnan(np.asarray(y[0])))
  want, _ = _landmark(2)(x, positions=pos)
  assert_close("row 1", want[1, :25], y[1, :25], reduction=T)
