"""``compress`` for the GPU path: torch ops, no host synchronisation.

The reference sizes its output with ``int(cu_seqlens_c[-1])``, a host synchronisation. Here the
output has a static number of rows, ``total // stride`` — never fewer than the compressed tokens,
since a document of length L ≥ l has ``(L - l)//s + 1 ≤ L // s`` of them — and the rows past
``cu_seqlens_c[-1]`` are zeros that every consumer ignores (they index compressed tokens through
``cu_seqlens_c``). The gather and the per-head matrix product are already single large torch
operations, so a Triton kernel would save little here; the point is the static shape, which lets
the whole NSA core run without a host synchronisation (and under CUDA-graph capture).
"""

from __future__ import annotations

import torch

from fsa_train.kernels.reference import check_compress_args, compress_windows, compressed_lengths


def compress(
    x: torch.Tensor,
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    kernel: int,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`fsa_train.kernels.reference.compress`, except that ``x_c`` has
    ``total // stride`` rows, of which the first ``cu_seqlens_c[-1]`` are the compressed tokens
    and the rest are zeros (their gradients are dropped)."""
    check_compress_args(x, weight, pe, kernel, stride)
    total = x.shape[0]
    cu_c = compressed_lengths(cu_seqlens, kernel, stride)
    rows_out = total // stride
    cu_c64 = cu_c.to(torch.int64)
    slot = torch.arange(rows_out, device=x.device)
    doc = torch.searchsorted(cu_c64[1:].contiguous(), slot, right=True)
    valid = doc < cu_c.numel() - 1
    doc = doc.clamp(max=cu_c.numel() - 2)
    start = cu_seqlens.to(torch.int64)[doc] + (slot - cu_c64[doc]) * stride
    rows = start[:, None] + torch.arange(kernel, device=x.device)[None, :]  # [rows_out, l]
    rows = torch.where(valid[:, None], rows, 0).clamp(max=max(total - 1, 0))
    out = compress_windows(x, weight, pe, rows)  # [rows_out, h, d_out]
    # where, not a product: the gradient of padding rows is dropped even if it is not finite.
    out = torch.where(valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=x.device))
    return out.contiguous(), cu_c
