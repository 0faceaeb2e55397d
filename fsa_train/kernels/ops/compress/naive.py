"""Naive ``compress`` (docs/nsa.md step 2): gather each window's tokens, one batched matmul."""

from __future__ import annotations

import torch

from fsa_train.kernels.ops.compress.windows import check_compress_args, compress_windows
from fsa_train.kernels.varlen import compressed_lengths, document_ids


def compress(
    x: torch.Tensor,
    weight: torch.Tensor,
    pe: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    kernel: int,
    stride: int,
    cu_seqlens_c: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress every window of ``kernel`` tokens (step ``stride``, inside one document).

    ``x̃_i = concat_j(x_{i·s+j} + pe_j) @ weight[head]`` (nsa.md step 2), computed in ``x``'s dtype.

    Args:
        x: un-rotated keys or values ``[total, h, d]``.
        weight: ``[h, kernel·d, d_out]``; the concatenation is token-major (index ``j·d + c``).
        pe: intra-window position embedding ``[h, kernel, d]``, or None (values).
        cu_seqlens: document boundaries ``[n_docs + 1]``.
        cu_seqlens_c: :func:`compressed_lengths` of ``cu_seqlens``, if the caller has it.

    Returns:
        ``x_c [total_c, h, d_out]`` and ``cu_seqlens_c`` (int32, ``[n_docs + 1]``).
    """
    check_compress_args(x, weight, pe, kernel, stride)
    cu_c = compressed_lengths(cu_seqlens, kernel, stride) if cu_seqlens_c is None \
        else cu_seqlens_c
    total_c = int(cu_c[-1])  # host synchronisation: sizes the output
    doc = document_ids(cu_c.to(torch.int64), total_c)
    local = torch.arange(total_c, device=x.device) - cu_c.to(torch.int64)[doc]
    start = cu_seqlens.to(torch.int64)[doc] + local * stride
    rows = start[:, None] + torch.arange(kernel, device=x.device)[None, :]  # [total_c, l]
    return compress_windows(x, weight, pe, rows).contiguous(), cu_c
