"""The ground truth: every NSA op's naive PyTorch implementation, in one namespace.

Each op's naive module lives beside its kernels (``ops/<op>/naive.py``); this module gathers them
so that tests and benchmarks can write ``reference.selected_attention(...)``. It imports no
Triton and no kernel module, and no fast path imports it. The shared building block (chunked,
masked, checkpointed softmax attention) is :mod:`fsa_train.kernels.naive_attention`.
"""

from __future__ import annotations

from fsa_train.kernels.ops.compress.naive import compress
from fsa_train.kernels.ops.compressed_attention.naive import compressed_attention
from fsa_train.kernels.ops.gate_mix.naive import gate_mix, gated_projection
from fsa_train.kernels.ops.select_blocks.naive import block_scores, overlap_weights, select_blocks
from fsa_train.kernels.ops.selected_attention.naive import selected_attention
from fsa_train.kernels.ops.window_attention.naive import window_attention
from fsa_train.kernels.varlen import compressed_lengths

__all__ = [
    "block_scores",
    "compress",
    "compressed_attention",
    "compressed_lengths",
    "gate_mix",
    "gated_projection",
    "overlap_weights",
    "select_blocks",
    "selected_attention",
    "window_attention",
]
