"""effattn: efficient-attention mechanisms, kernels and a shared trainer in JAX/Flax NNX."""

__version__ = "0.1.0"
