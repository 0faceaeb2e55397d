"""Naive ``compressed_attention`` (docs/nsa.md step 3): per document, chunked, masked softmax."""

from __future__ import annotations

from functools import partial

import torch

from fsa_train.kernels import naive_attention as na


def compressed_attention(
    q: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_c: torch.Tensor,
    kernel: int,
    stride: int,
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the compressed tokens whose whole window is in the query's past.

    Query at local position t sees compressed token i of its document iff ``t >= i·s + l - 1``.
    ``max_seqlen``: the longest document as a host integer, if known (library kernels size their
    grid with it; the result does not depend on it).

    Returns:
        ``o [total, H, d]`` in q's dtype (0 for queries that see nothing) and the natural-log
        ``lse [H, total]``: fp32 (fp64 for fp64 inputs), ``-inf`` where no key is visible.
    """
    H, h = na.check_heads(q, k_c, v_c)
    scale = na.softmax_scale(scale, q.shape[-1])
    o_parts, lse_parts = [], []
    docs = zip(na.documents(cu_seqlens), na.documents(cu_seqlens_c), strict=True)
    for (b0, b1), (c0, c1) in docs:
        for t0, t1 in na.chunks(b1 - b0, H, c1 - c0):
            m = na.visible_compressed(t1, c1 - c0, kernel, stride)
            mask_fn = partial(na.compressed_mask, t0, t1, m, kernel, stride, q.device)
            o, lse = na.attention(
                q[b0 + t0 : b0 + t1], k_c[c0 : c0 + m], v_c[c0 : c0 + m], mask_fn, scale
            )
            o_parts.append(o)
            lse_parts.append(lse)
    empty_lse = torch.empty(H, 0, dtype=na.stat_dtype(q.dtype), device=q.device)
    return (
        na.cat(o_parts, 0, q.new_zeros(0, H, v_c.shape[-1])),
        na.cat(lse_parts, 1, empty_lse),
    )
