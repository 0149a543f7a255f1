"""The argument checks the recurrent ops' api.py share (linear_scan, delta_rule, memory_chunk):
one ValueError per mistake, naming the argument, the layout it must have and what it got.

    checks.qkv(q, k, v)                       # q, k [B, T, H, Dk]; v [B, T, H, Dv]; T > 0
    checks.per_token("beta", beta, q)         # [B, T, H]
    checks.state("initial_state", s0, q, v)   # [B, H, Dk, Dv] (None passes)
    checks.segments(segment_ids, q)           # [B, T] (None passes)
    checks.chunk_size(chunk_size)             # >= 1
"""

from __future__ import annotations


def qkv(q, k, v, *, one_dtype: bool = True) -> None:
  """q and k [B, T, H, Dk] of one shape, v [B, T, H, Dv] on their [B, T, H], T > 0, and (with
  one_dtype) a single dtype for the three."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [B, T, H, Dk]; got {q.shape=} {k.shape=}")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must be [B, T, H, Dv] matching q's [B, T, H]; got {v.shape=} {q.shape=}")
  if one_dtype and not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.shape[1] == 0:
    raise ValueError("the sequence is empty (T=0)")


def per_token(name: str, x, q) -> None:
  """x [B, T, H] on q's [B, T, H] (a gate or rate per token and head)."""
  if x.shape != q.shape[:3]:
    raise ValueError(f"{name} must be [B, T, H]={q.shape[:3]}; got {x.shape}")


def state(name: str, x, q, v) -> None:
  """x [B, H, Dk, Dv] for q [B, T, H, Dk] and v [B, T, H, Dv], or None."""
  want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
  if x is not None and x.shape != want:
    raise ValueError(f"{name} must be [B, H, Dk, Dv]={want}; got {x.shape}")


def segments(segment_ids, q) -> None:
  """segment_ids [B, T] on q's [B, T], or None."""
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must be [B, T]={q.shape[:2]}; got {segment_ids.shape}")


def chunk_size(value: int) -> None:
  if value < 1:
    raise ValueError(f"chunk_size={value} must be >= 1")
