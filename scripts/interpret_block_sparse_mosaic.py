"""Mosaic GPU block-sparse backward kernels in jax's Mosaic GPU interpreter, on CPU.

    python scripts/interpret_block_sparse_mosaic.py --check 'fused:causal-d128-b128'
    python scripts/interpret_block_sparse_mosaic.py --check 'fused_keys:core;fused:features'
    python scripts/interpret_block_sparse_mosaic.py --check 'fused:window40-mqa-b64-bias'

A development check, not a test: minutes per case, and it leans on private modules of jax
0.10.2's interpreter (jax._src.pallas.mosaic_gpu.interpret), which `_patched_interpreter` extends
where our kernels go beyond it. It runs the kernels' logic (indexing, masks, TMA slices, the
two consumers' hand-offs through shared memory, the dQ reduce-add) one warpgroup per Python
thread; wgmma there is synchronous, so it says nothing about the wgmma waits or speed. It
found the race fixed in the "fused" backward (a consumer overwrote its K half with dK while
the other still read it for dQ). The forward kernel (run_state) and the dQ kernel of the
"split" / "staged" backwards are beyond the interpreter: the forward here is reference.py's,
so only the "fused" / "fused_keys" backwards run. Cases and the check are those of
check_block_sparse_mosaic.py (same inputs, tolerance and report).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_block_sparse_mosaic as chk  # noqa: E402
from effattn.kernels import dispatch  # noqa: E402
from effattn.kernels.block_sparse import api, pallas_mosaic_gpu, reference  # noqa: E402

INTERPRETABLE = ("fused", "fused_keys")


def _patched_interpreter():
  """The interpreter's module with the rules our kernels need added, or SystemExit naming why.

  Added: plgpu.load (a plain ref read), layout_cast (no-op off the GPU), wgmma with transposed
  operands or A in registers, TMA reduce-add, mutable-Ref kernel arguments (global memory),
  and no complaint when a producer leaves the last stages' "free" phases unobserved."""
  try:
    from jax._src import callback
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu import primitives as gpu_prims
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as cb
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret as ji
    from jax._src.pallas.mosaic_gpu.interpret import params
    from jax._src.pallas.mosaic_gpu.interpret import shared_memory as shm
    from jax._src.state import primitives as state_prims
    from jax._src.state import types as state_types
    interp = ji.JaxprInterpreter
    originals = (interp.interpret, cb.copy_smem_to_gmem, cb.is_gmem_memory_space)
  except (ImportError, AttributeError) as e:
    raise SystemExit(f"this jax ({jax.__version__}) has no Mosaic GPU interpreter like 0.10.2's "
                     f"(update _patched_interpreter): {e}") from e
  if getattr(interp, "_effattn_patched", False):
    return params
  run_jaxpr, copy_out, is_gmem = originals

  def interpret(self, jaxpr, token, *args):
    if any(e.primitive is gpu_prims.load_p for e in jaxpr.eqns):
      jaxpr = jaxpr.replace(eqns=[
          e.replace(primitive=state_prims.get_p, params={"tree": e.params["tree"]})
          if e.primitive is gpu_prims.load_p else e for e in jaxpr.eqns])
    return run_jaxpr(self, jaxpr, token, *args)

  def place(device_id, grid_point_coords, thread_id, source_info):
    memory = cb._get_shared_memory()
    info = cb.interpret_utils.GPULoggingInfo(
        device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=int(thread_id), source_info=source_info)
    return memory, memory.get_global_thread_id(int(device_id), int(thread_id)), info

  def read(memory, key, transforms, gid, info):
    """(value, key, range) of a buffer through its indexers, then its transposes."""
    transforms, perm = list(cb._remove_noop_transforms(transforms)), None
    while transforms and not hasattr(transforms[-1], "indices"):
      p = tuple(transforms.pop().permutation)
      perm = p if perm is None else tuple(perm[i] for i in p)
    key = cb.HostAllocationKey.from_array(key)
    rng = cb.interpret_utils.to_range(jax.tree.map(int, tuple(transforms)))
    val = memory.get_buffer_content(key, rng, gid, logging_info=info)[0]
    return (val if perm is None else np.transpose(val, perm)), key, rng

  def wgmma_callback(*, token, device_id, grid_point_coords, thread_id, acc, acc_transforms,
                     a, a_transforms, b, b_transforms, acc_dtype, a_is_ref, source_info):
    memory, gid, info = place(device_id, grid_point_coords, thread_id, source_info)
    a = read(memory, a, a_transforms, gid, info)[0] if a_is_ref else np.asarray(a)
    b = read(memory, b, b_transforms, gid, info)[0]
    val, key, rng = read(memory, acc, acc_transforms, gid, info)
    out = val + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    memory.store_buffer_content(key, rng, out, gid, logging_info=info)
    return token

  def wgmma(self, eqn, token, get_invals):
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = [eqn.params[f"{n}_transforms_tree"] or empty for n in ("acc", "a", "b")]
    acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
    fn = functools.partial(wgmma_callback, acc_dtype=eqn.invars[0].aval.dtype,
                           a_is_ref=isinstance(eqn.invars[1].aval, state_types.AbstractRef),
                           source_info=eqn.source_info)
    return callback.io_callback(
        fn, cb.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc,
        acc_transforms=acc_t, a=a, a_transforms=a_t, b=b, b_transforms=b_t, ordered=True), []

  reduce_lock = threading.Lock()

  def copy_smem_to_gmem(*, reduction_op, **kw):
    if reduction_op is None:
      return copy_out(reduction_op=None, **kw)
    if reduction_op != "add":
      raise NotImplementedError(f"TMA reduction {reduction_op}")
    memory, gid, info = place(kw["device_id"], kw["grid_point_coords"], kw["thread_id"],
                              kw["source_info"])
    src = read(memory, kw["src_allocation_key_as_array"], kw["src_transforms"], gid, info)[0]
    with reduce_lock:  # the hardware's reduce-add is atomic; warpgroups here are threads
      dst, key, rng = read(memory, kw["dst_allocation_key_as_array"], kw["dst_transforms"],
                           gid, info)
      memory.store_buffer_content(key, rng, dst + src.reshape(dst.shape), gid,
                                  logging_info=info)
    return kw["token"]

  def deallocate(self):
    with self.cv:
      self.ref_count -= 1

  interp.interpret, interp._interpret_wgmma_ref_p = interpret, wgmma
  cb.copy_smem_to_gmem = copy_smem_to_gmem
  cb.is_gmem_memory_space = lambda space: space is None or is_gmem(space)
  shm.Barrier.deallocate = deallocate
  mlir.register_lowering(gpu_core.layout_cast_p, lambda ctx, x, **_: [x], platform="cpu")
  interp._effattn_patched = True
  return params


def _reference_forward(q, k, v, kv_indices, kv_counts, aux, *, causal, scale, block_q, block_k,
                       window=None, **_):
  o, lse = reference.block_sparse_attention(q, k, v, kv_indices, kv_counts, aux, causal=causal,
                                            scale=scale, block_q=block_q, block_k=block_k,
                                            window=window)
  return o.astype(q.dtype), lse


@contextlib.contextmanager
def interpreted_backward(bwd: str):
  """impl='pallas_gpu' with reference.py's forward and the Mosaic backward `bwd` interpreted
  (chosen as on a GPU, lower_for: the dispatcher refuses a GPU path on CPU otherwise)."""
  params = _patched_interpreter()
  saved = api._kernel_module
  module = types.SimpleNamespace(
      forward=_reference_forward,
      backward=functools.partial(pallas_mosaic_gpu.backward, bwd=bwd))
  api._kernel_module = lambda platform: module
  try:
    with params.force_gpu_interpret_mode(params.InterpretGPUParams()), dispatch.lower_for("gpu"):
      yield
  finally:
    api._kernel_module = saved


def check_case(case, bwd: str) -> dict:
  """{ok, rel_err, seconds} of the interpreted gradients against the reference's."""
  args, idx, cnt, kw, cot = chk._case_inputs(*case[:6])
  up = [None if x is None else x.astype(jnp.float32) for x in args]
  want = chk._vjp_fn("reference", idx, cnt, kw)(*up, *cot)[1]
  start = time.time()
  with interpreted_backward(bwd):
    got = jax.block_until_ready(chk._vjp_fn("triton", idx, cnt, kw)(*args, *cot))[1]
  row = {"rel_err": {}, "seconds": time.time() - start}
  notes = []
  for name, w, g in zip(("dq", "dk", "dv", "dbias"), want, got):
    if w is not None:
      row["rel_err"][name], note = chk._rel_err(name, w, g)
      notes += [note] if note else []
  row["ok"] = not notes and all(e <= chk.REL_TOL for e in row["rel_err"].values())
  if notes:
    row["notes"] = notes
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", default="fused:causal-d128-b128",
                      help="plan as in check_block_sparse_mosaic.py: 'bwd:case+case;bwd:core'; "
                      f"bwd in {INTERPRETABLE}")
  args = parser.parse_args()
  plan = chk._plan(chk.CASES, "all", [], args.check)
  failed = 0
  for case, bwds in plan:
    for bwd in bwds:
      if bwd not in INTERPRETABLE:
        raise SystemExit(f"--check: {bwd} needs the dQ kernel, which the interpreter cannot run "
                         f"(run_state); interpretable: {INTERPRETABLE}")
      row = check_case(case, bwd)
      failed += not row["ok"]
      errs = " ".join(f"{k}={v:.1e}" for k, v in row["rel_err"].items())
      print(f"interpret {case[0]}:{bwd:12s} {'ok' if row['ok'] else 'FAIL'} {errs} "
            f"{row.get('notes', '')} ({row['seconds']:.0f} s)", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
