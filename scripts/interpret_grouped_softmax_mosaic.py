"""The Mosaic GPU backward kernels of the landmark grouped softmax in jax's Mosaic GPU
interpreter, on CPU.

    python scripts/interpret_grouped_softmax_mosaic.py [--d 64] [--groups 7]
    python scripts/interpret_grouped_softmax_mosaic.py --case test --d 128 --groups 10

A development check, not a test (it leans on jax 0.10.2's private interpreter, with the rules
scripts/interpret_block_sparse_mosaic.py's `_patched_interpreter` adds). It runs
pallas_mosaic_gpu.backward(bwd="mosaic") (the dQ and dK/dV kernels: TMA streams, barriers,
the two consumers' walks and roles, the landmark key's gradient in dK's last row) one
warpgroup per Python thread on a tiny case (B 1, H 1, two packed segments with ragged
groups) and compares its dq, dk, dv with the Triton backward (pallas_gpu.backward, interpret
mode) on the same residuals (o, lse of the Triton forward). wgmma there is synchronous, so
it says nothing about the wgmma waits or speed. The forward kernel (run_state) is beyond the
interpreter. --case test takes the CPU suite's inputs instead
(tests/kernels/test_grouped_softmax_pallas_mosaic_gpu.py `_backward_inputs`: B 2, H 2, one row
of three packed segments and padding, one row of one segment starting mid-block; about two
minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interpret_block_sparse_mosaic import _patched_interpreter  # noqa: E402
from effattn.attention.landmark import block_groups  # noqa: E402
from effattn.kernels.grouped_softmax import api, pallas_gpu, pallas_mosaic_gpu  # noqa: E402

LT = 64
REL_TOL = 2e-2  # bf16 P and dS (both backwards round them); max |err| / max |want|


def inputs(d: int, groups: int, block_len: int = 50):
  """Backward arguments of a [1, T, 1, d] bfloat16 row of two segments of 113 and 124 tokens
  (groups 0-2 and 3-5 at block_len 50: ragged, the second segment starting on an odd group,
  mid-CTA), laid out in `groups` tiles (odd: a padded last CTA group; absent groups past 5)."""
  cut = 2 * block_len + 13
  t = 4 * block_len + 37
  seg = np.ones((1, t), np.int32)
  seg[0, cut:] = 2
  pos = np.concatenate([np.arange(cut), np.arange(t - cut)])
  seg, pos = jnp.asarray(seg), jnp.asarray(pos[None])
  gid = block_groups(pos, seg, block_len)
  lay = api.relayout(gid, seg, max_groups=groups, tile=LT)
  assert bool(lay["ok"]), "the case does not fit the layout; raise --groups"
  q, k, v, kl, do = (jax.random.normal(kk, (1, t, 1, d)).astype(jnp.bfloat16)
                     for kk in jax.random.split(jax.random.key(0), 5))
  mask = lay["valid"][:, :, None, None]
  take = jax.vmap(lambda x, i: x[i])
  qg, kg, vg, dog = (jnp.where(mask, take(x, lay["slot_tok"]), 0) for x in (q, k, v, do))
  kg = kg.reshape(1, groups, LT, 1, d).at[:, :, -1].set(
      kl[:, :groups].astype(kg.dtype)).reshape(qg.shape)
  scale = d ** -0.5
  o, lse = pallas_gpu.forward(qg, kg, vg, lay["glen"], lay["gfirst"], lt=LT, scale=scale,
                              interpret=True)
  delta = jnp.moveaxis(jnp.sum(o.astype(jnp.float32) * dog.astype(jnp.float32), -1), 1, 2)
  return (qg, kg, vg, lse, dog, delta, lay["glen"], lay["gfirst"], lay["glast"]), scale


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d", type=int, default=64)
  parser.add_argument("--groups", type=int, default=7)
  parser.add_argument("--case", default="tiny", choices=("tiny", "test"))
  args = parser.parse_args()
  params = _patched_interpreter()
  if args.case == "test":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests", "kernels"))
    import test_grouped_softmax_pallas_mosaic_gpu as suite  # noqa: PLC0415
    bwd_args, scale = suite._backward_inputs(args.d, args.groups)  # noqa: SLF001
  else:
    bwd_args, scale = inputs(args.d, args.groups)
  want = pallas_gpu.backward(*bwd_args, lt=LT, scale=scale, interpret=True)
  start = time.time()
  with params.force_gpu_interpret_mode(params.InterpretGPUParams()):
    got = jax.block_until_ready(pallas_mosaic_gpu.backward(*bwd_args, lt=LT, scale=scale,
                                                           bwd="mosaic"))
  seconds = time.time() - start
  failed = 0
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    g, w = (np.asarray(x.astype(jnp.float32)) for x in (g, w))
    err = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
    extra = ""
    if name == "dk":  # the landmark keys' gradients: each tile's last row
      land = lambda x: x.reshape(x.shape[0], args.groups, LT, -1)[:, :, -1]  # noqa: E731
      extra = (f" (landmark rows {np.max(np.abs(land(g) - land(w))) / np.max(np.abs(w)):.1e},"
               f" max |want| there {np.max(np.abs(land(w))):.2f})")
    ok = err <= REL_TOL and np.isfinite(g).all()
    failed += not ok
    print(f"interpret {args.case} d{args.d} G{args.groups} {name}: {'ok' if ok else 'FAIL'} "
          f"rel_err={err:.1e}{extra}", flush=True)
  print(f"({seconds:.0f} s in the interpreter)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
