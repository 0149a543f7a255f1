"""Claim 9, retrieval (Titans, Behrouz et al. 2025, table 2, S-NIAH of RULER): single-needle
retrieval at 2k-16k after training at a shorter length, with number and word needles, Titans
MAC / MAG / MAL against softmax and a sliding window.

    python scripts/sweep.py --config configs/sweeps/claims/titans_passkey.py --per_device 6

At configs/sweeps/claims/passkey_1024.py's size: softmax MHA (RoPE), a sliding window of 256 and
Titans MAC (segments of 64), MAG and MAL (attention window 256), each trained and probed with the
5-digit number needle and with a word needle (passkey_1024.NEEDLES; S-NIAH's uuid needle is not
in our data). 5 mechanisms x 2 needles x 2 rates x 3 seeds = 60 variants, estimated ~1.5 hours
of an H200 (not measured).
"""

from configs.sweeps.claims import passkey_1024


def get_sweep():
  return passkey_1024.subset(["mha", "swa256", "titans-mac", "titans-mag", "titans-mal"],
                             needles=["number", "word"])
