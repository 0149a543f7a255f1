"""Claim 5 (Landmark Attention, Mohtashami & Jaggi 2023, its passkey-retrieval experiment):
trained at T = 512, landmark attention retrieves the passkey at 4x, 8x and 16x the training
length by top-k block retrieval, where softmax with RoPE fails; the k of the retrieval as an
axis.

    python scripts/sweep.py --config configs/sweeps/claims/landmark_passkey.py --per_device 8

At configs/sweeps/claims/passkey_512.py's size: softmax MHA (RoPE) and landmark (blocks of 50).
Training attends to every block (the paper's grouped softmax); the k of the retrieval is an
inference-time field (model.attention.landmark.forward_top_k: the forward pass at inference
retrieves each query's top k blocks plus its own, as the paper's inference does), so it is no
training axis: each landmark checkpoint's passkey eval runs the grid with every block (k = 0,
the grouped softmax) and again at each k of TOP_K (eval.passkey.vary), all in its
eval_passkey.json (`varied`) and in the results table (eval_passkey_beyond@forward_top_k=k:
mean retrieval past the training length). 18 variants (MHA's shared with dma_passkey.py),
estimated ~25 minutes of an H200 (not measured).
"""

from configs.sweeps.claims import passkey_512

TOP_K = (1, 2, 4, 8)  # the paper retrieves 2-4 blocks


def get_sweep():
  return passkey_512.subset(["mha", "landmark"], extra={"landmark": {
      "eval.passkey.vary": "model.attention.landmark.forward_top_k",
      "eval.passkey.values": TOP_K}})
