"""fsa-train: long-context GPT pretraining with Native Sparse Attention on Triton kernels."""

__version__ = "0.1.0"
