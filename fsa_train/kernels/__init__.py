"""NSA attention ops on the packed layout, and the whole NSA core.

Each op is defined once (:func:`fsa_train.kernels.registry.define_op`): its signature and
docstring are those of its naive reference in ``ops/<op>/naive.py``, and its ``backend``
keyword picks the naive op or the Triton kernels of ``ops/<op>/triton.py`` ("auto": Triton for
CUDA tensors). ``settings`` passes the kernels' launch switches
(:class:`~fsa_train.kernels.settings.KernelSettings`). See docs/architecture.md for the layout
and docs/nsa.md for what each op computes.
"""

from __future__ import annotations

from fsa_train.kernels.api import (
    OPS,
    compress,
    compressed_attention,
    gate_mix,
    gated_projection,
    select_blocks,
    selected_attention,
    window_attention,
)
from fsa_train.kernels.nsa import (
    CompressionParams,
    NSABranchInputs,
    NSAVarlen,
    nsa_attention,
    nsa_branch_inputs,
    nsa_sparse_branches,
    nsa_varlen,
    nsa_window_branch,
)
from fsa_train.kernels.registry import Backend, triton_impl
from fsa_train.kernels.settings import KernelSettings, default_settings

__all__ = [
    "OPS",
    "Backend",
    "CompressionParams",
    "KernelSettings",
    "NSABranchInputs",
    "NSAVarlen",
    "compress",
    "compressed_attention",
    "default_settings",
    "gate_mix",
    "gated_projection",
    "nsa_attention",
    "nsa_branch_inputs",
    "nsa_sparse_branches",
    "nsa_varlen",
    "nsa_window_branch",
    "select_blocks",
    "selected_attention",
    "triton_impl",
    "window_attention",
]
