"""Chunk-parallel test-time update of the linear Titans memory (the kernel family behind
attention/neural_memory.py). Public entry point: api.memory_update; reference.py is the oracle."""

from effattn.kernels.memory_chunk.api import FAMILY, deep_memory_update, memory_update

__all__ = ["FAMILY", "deep_memory_update", "memory_update"]
