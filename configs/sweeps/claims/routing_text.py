"""Claim 2 (Routing Transformer, Roy et al. 2021): content-based clusters beat a local window of
the same budget on byte-level text at T >= 2,048 (the paper's enwik8 / PG-19 tables), and one
cluster equals causal softmax.

    python scripts/sweep.py --config configs/sweeps/claims/routing_text.py --per_device 8

At configs/sweeps/claims/text_2048.py's size and budget W = 512: softmax MHA, a sliding window
of 512, routing as the paper runs it (2 local heads of window 512 + 2 routing heads, 4
clusters), every head routed (4 clusters), and one cluster. The identity "one cluster = causal
softmax" (with routing's shared query-key projection) is exact and tested
(tests/attention/test_routing.py::test_one_cluster_is_causal_softmax); the routing-c1 row
measures what the shared projection costs against MHA. 5 mechanisms x 3 rates x 3 seeds = 45
variants, estimated ~30 minutes of an H200 with --per_device 8 (not measured).
"""

from configs.sweeps.claims import text_2048


def get_sweep():
  return text_2048.subset(["mha", "swa512", "routing", "routing-all", "routing-c1"])
