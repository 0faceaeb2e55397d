"""Naive ``selected_attention`` (docs/nsa.md step 6): a boolean mask of each query's selected
blocks over its whole document, chunked masked softmax."""

from __future__ import annotations

from functools import partial

import torch

from fsa_train.kernels import naive_attention as na
from fsa_train.kernels.utils import check_partials


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block: int,
    scale: float | None = None,
    partials: str = "fp32",
) -> torch.Tensor:
    """Attention over the union of the keys of each query's selected blocks, causal per token.

    Query head j at local position t attends keys in the blocks ``idx[j // G, t, :]`` (document-
    local ids; -1 and ids past the query are ignored, duplicates count once) with key position
    ``<= t``. Returns ``o [total, H, d]`` in q's dtype; 0 where nothing is selected.

    ``partials`` ("fp32" or "half") is the Triton kernels' precision for their per-(token, slot)
    partial outputs and dQ (a run setting, ``model.config.nsa.selected_partials``); the naive op
    has no partials and only checks the value.
    """
    check_partials(partials)
    H, h = na.check_heads(q, k, v)
    scale = na.softmax_scale(scale, q.shape[-1])
    parts = []
    for b0, b1 in na.documents(cu_seqlens):
        for t0, t1 in na.chunks(b1 - b0, H, b1 - b0):
            mask_fn = partial(na.selected_mask, idx[:, b0 + t0 : b0 + t1], t0, t1, block)
            o, _ = na.attention(
                q[b0 + t0 : b0 + t1], k[b0 : b0 + t1], v[b0 : b0 + t1], mask_fn, scale
            )
            parts.append(o)
    return na.cat(parts, 0, q.new_zeros(0, H, v.shape[-1]))
