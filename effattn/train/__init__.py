"""Training: state, optimizer, the jit-compiled step, checkpoints, metrics, sharding, the loop."""
