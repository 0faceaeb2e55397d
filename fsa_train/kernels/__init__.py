"""NSA attention ops on the packed layout, each with a ``backend`` argument.

``backend="reference"`` runs the pure-PyTorch ground truth in :mod:`fsa_train.kernels.reference`;
``backend="triton"`` runs the Triton kernels (an error if the op has none or the tensors are not
on a CUDA device); ``backend="auto"`` picks Triton for CUDA tensors when the op has a Triton
implementation and the reference otherwise.

Triton implementations live in :mod:`fsa_train.kernels.triton`, one module per op, each exposing
a function with the op's name and signature; this file finds them, so adding a kernel needs no
change here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Literal

import torch

from fsa_train.kernels import reference

Backend = Literal["auto", "reference", "triton"]

OPS = (
    "compress",
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "gate_mix",
)
_TRITON_MODULE = {
    "compress": "fsa_train.kernels.triton.compress",
    "compressed_attention": "fsa_train.kernels.triton.compressed_attention",
    "select_blocks": "fsa_train.kernels.triton.topk",
    "selected_attention": "fsa_train.kernels.triton.selected_attention",
    "window_attention": "fsa_train.kernels.triton.window_attention",
    "gate_mix": "fsa_train.kernels.triton.gate_mix",
}


@cache
def triton_impl(op: str) -> Callable | None:
    """The Triton implementation of ``op``, or None when the project has none (or no Triton)."""
    try:
        module = importlib.import_module(_TRITON_MODULE[op])
    except ModuleNotFoundError as error:
        if error.name in (_TRITON_MODULE[op], "triton"):
            return None
        raise
    return getattr(module, op, None)


def resolve(op: str, backend: str, tensor: torch.Tensor) -> Callable:
    """The function that runs ``op`` for ``backend`` on tensors living where ``tensor`` lives."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        impl = triton_impl(op)
        if impl is None:
            raise NotImplementedError(f"{op} has no Triton kernel yet; use backend='reference'")
        if not tensor.is_cuda and not _interpreting():
            raise ValueError(f"{op} with backend='triton' needs CUDA tensors, got {tensor.device}")
        return impl
    if tensor.is_cuda and (impl := triton_impl(op)) is not None:
        return impl
    return getattr(reference, op)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compress(
    x, weight, pe, cu_seqlens, kernel, stride, backend: Backend = "auto", cu_seqlens_c=None
):
    """Compress each document's windows of ``kernel`` tokens (step ``stride``) into one token.

    ``cu_seqlens_c`` (``reference.compressed_lengths``) may be passed when already known."""
    fn = resolve("compress", backend, x)
    return fn(x, weight, pe, cu_seqlens, kernel, stride, cu_seqlens_c=cu_seqlens_c)


def compressed_attention(
    q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride, scale=None, backend: Backend = "auto"
):
    """Attention over compressed tokens whose whole window is in the query's past."""
    fn = resolve("compressed_attention", backend, q)
    return fn(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride, scale)


def select_blocks(
    q,
    k_c,
    lse,
    cu_seqlens,
    cu_seqlens_c,
    kernel,
    stride,
    block,
    topk,
    init_blocks,
    local_blocks,
    scale=None,
    backend: Backend = "auto",
):
    """Top-k selection blocks per (KV head, token): ``[h, total, topk]`` int32, -1 padded."""
    fn = resolve("select_blocks", backend, q)
    return fn(
        q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block, topk,
        init_blocks, local_blocks, scale,
    )


def selected_attention(
    q, k, v, idx, cu_seqlens, block, scale=None, backend: Backend = "auto", partials: str = "fp32"
):
    """Attention over the union of each query's selected blocks (causal in its own block).

    ``partials`` ("fp32" or "half") is the Triton kernels' precision for their per-slot partial
    outputs and dQ; the reference has no partials and only checks the value."""
    fn = resolve("selected_attention", backend, q)
    if fn is reference.selected_attention:
        if partials not in ("fp32", "half"):
            raise ValueError(f"selected-attention partials must be 'fp32' or 'half', "
                             f"got {partials!r}")
        return fn(q, k, v, idx, cu_seqlens, block, scale)
    return fn(q, k, v, idx, cu_seqlens, block, scale, partials=partials)


def window_attention(q, k, v, cu_seqlens, window=None, scale=None, backend: Backend = "auto"):
    """Causal attention within each document over the last ``window`` keys (None: all)."""
    fn = resolve("window_attention", backend, q)
    return fn(q, k, v, cu_seqlens, window, scale)


def gate_mix(o_cmp, o_sel, o_win, gates, backend: Backend = "auto"):
    """Gated sum of the three branch outputs, ``Σ_x gates[..., x]·o_x``, in o_cmp's dtype."""
    fn = resolve("gate_mix", backend, o_cmp)
    return fn(o_cmp, o_sel, o_win, gates)


from fsa_train.kernels.nsa import (  # noqa: E402
    CompressionParams,
    NSAVarlen,
    nsa_attention,
    nsa_varlen,
)

__all__ = [
    "Backend",
    "CompressionParams",
    "NSAVarlen",
    "compress",
    "compressed_attention",
    "gate_mix",
    "nsa_attention",
    "nsa_varlen",
    "resolve",
    "select_blocks",
    "selected_attention",
    "triton_impl",
    "window_attention",
]
