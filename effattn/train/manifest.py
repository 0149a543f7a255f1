"""Checksums of a finished checkpoint step, written after orbax commits it and checked on restore.

orbax writes a step to a temporary folder and renames it when complete, so a step folder is
whole or absent; it does not notice a byte flipped, a file truncated or deleted later. This
module adds that: `seal(step_dir)` hashes every file orbax wrote (sha256), flushes them to disk
and then writes `step_dir/MANIFEST` (atomically: temp file, fsync, rename, fsync of the
folder). `problem(step_dir)` re-hashes and says what differs. A step is reported saved only
once sealed, so "saved" means complete, durable and checkable.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

MANIFEST = "effattn_manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST and not rel.startswith(MANIFEST):
        out.append(rel)
  return sorted(out)


def _digest(path: str, *, sync: bool = False) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)  # hashlib releases the GIL on large chunks: training goes on meanwhile
    if sync:
      os.fsync(f.fileno())
  return h.hexdigest()


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def seal(step_dir: str) -> dict:
  """Hashes and flushes every file of a committed step, then writes its manifest.

  Returns {"files": n, "bytes": total, "seconds": spent}.
  """
  start = time.perf_counter()
  files = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {"bytes": os.path.getsize(path), "sha256": _digest(path, sync=True)}
  for root, _, _ in os.walk(step_dir):
    _fsync_dir(root)
  path = os.path.join(step_dir, MANIFEST)
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump({"format": _FORMAT, "files": files}, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(step_dir)
  return {"files": len(files), "bytes": sum(v["bytes"] for v in files.values()),
          "seconds": time.perf_counter() - start}


def is_sealed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def problem(step_dir: str, items: tuple[str, ...] | None = None) -> str | None:
  """None when every file matches the manifest, else what is wrong (one short phrase).

  items: check only the files of these items (sub-folders) and the step's own files, e.g.
  evaluation reads params and model_state, so a damaged optimizer state does not matter to it.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return ("has no checksum manifest (written by an older effattn, or cut off before it was "
            "sealed)")
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"has an unreadable manifest ({type(e).__name__})"
  for rel, want in sorted(files.items()):
    top = rel.split(os.sep, 1)[0] if os.sep in rel else None
    if items is not None and top is not None and top not in items:
      continue
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"is missing {rel}"
    size = os.path.getsize(full)
    if size != want["bytes"]:
      return f"has {rel} at {size} bytes where {want['bytes']} were written"
    if _digest(full) != want["sha256"]:
      return f"has {rel} changed since it was written (checksum differs)"
  return None
