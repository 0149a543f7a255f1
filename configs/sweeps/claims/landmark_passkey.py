"""Claim 5 (Landmark Attention, Mohtashami & Jaggi 2023, its passkey-retrieval experiment):
trained at T = 512, landmark attention retrieves the passkey at 4x, 8x and 16x the training
length, where softmax with RoPE fails.

    python scripts/sweep.py --config configs/sweeps/claims/landmark_passkey.py --per_device 8

At configs/sweeps/claims/passkey_512.py's size: softmax MHA (RoPE) and landmark (blocks of 50).
The paper retrieves the top-k blocks while decoding; our passkey grid runs the full forward pass
(landmark's grouped softmax over every block), so the k of the retrieval is not an axis here
(docs/claims.md: TODO). 18 variants (MHA's shared with dma_passkey.py), estimated ~20 minutes of
an H200 (not measured).
"""

from configs.sweeps.claims import passkey_512


def get_sweep():
  return passkey_512.subset(["mha", "landmark"])
