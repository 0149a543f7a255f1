"""Chunk-parallel test-time update of the linear Titans memory (the kernel family behind
attention/neural_memory.py). Public entry point: api.memory_update; reference.py is the oracle."""

from effattn.kernels.memory_chunk.api import IMPLS, choose_path, memory_update

__all__ = ["IMPLS", "choose_path", "memory_update"]
