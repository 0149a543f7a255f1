"""Chunked linear scan with per-head decay: the kernel family behind linear, MALA and lightning.

o_t = scale * sum_{s <= t} exp(g_h (t - s)) (q_t . k_s) v_s, causal or bidirectional, with the
state in and out. api.py holds the op; context_parallel.py runs it with T split over
mesh.sequence (the linear_scan and linear_scan_normalizer exported here: api's on one device);
reference.py is the oracle.
"""

from effattn.kernels.linear_scan.api import FAMILY, decode_impl
from effattn.kernels.linear_scan.context_parallel import linear_scan, linear_scan_normalizer
from effattn.kernels.linear_scan.reference import segment_runs

__all__ = ["FAMILY", "decode_impl", "linear_scan", "linear_scan_normalizer", "segment_runs"]
