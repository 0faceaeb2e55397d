"""Naive ``selected_attention`` (docs/nsa.md step 6): a boolean mask of each query's selected
blocks over its whole document, chunked masked softmax."""

from __future__ import annotations

from functools import partial

import torch

from fsa_train.kernels import naive_attention as na
from fsa_train.kernels.utils import check_forced_blocks, check_partials, check_selection
from fsa_train.kernels.varlen import block_rows, token_block_rows


def expand_block_selection(idx: torch.Tensor, cu_seqlens: torch.Tensor, total: int,
                           block: int) -> torch.Tensor:
    """Per-block selections ``[h, total // B + n_docs, T]`` as per-token ones ``[h, total, T]``
    (each token gets its query block's row)."""
    rows = block_rows(total, cu_seqlens.numel() - 1, block)
    if idx.dim() != 3 or idx.shape[1] != rows:
        raise ValueError(f"block selections must be [h, {rows}, T] (total // block + n_docs "
                         f"rows), got {tuple(idx.shape)}")
    return idx[:, token_block_rows(cu_seqlens, total, block)]


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block: int,
    scale: float | None = None,
    partials: str = "fp32",
    selection: str = "token",
    forced_blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention over the union of the keys of each query's selected blocks, causal per token.

    Query head j at local position t attends keys in the blocks ``idx[j // G, t, :]`` (document-
    local ids; -1 and ids past the query are ignored, duplicates count once) with key position
    ``<= t``. Returns ``o [total, H, d]`` in q's dtype; 0 where nothing is selected.

    ``selection="block"``: ``idx [h, total // B + n_docs, T]`` holds one selection per query
    block (the layout of :func:`~fsa_train.kernels.api.select_blocks` in block mode), and every
    token uses its block's row.

    ``partials`` ("fp32" or "half") is the Triton kernels' precision for their per-(token, slot)
    partial outputs and dQ (a run setting, ``model.config.nsa.selected_partials``); the naive op
    has no partials and only checks the value.

    ``forced_blocks=(init, local)`` (token mode): the caller's promise that every token's
    selection holds the first ``init`` blocks and the ``local`` blocks ending at its own (as
    :func:`~fsa_train.kernels.api.select_blocks` makes them), so the Triton path may run those
    as block-sparse tiles (``KernelSettings.selected_forced``); the result is the same, and the
    naive op only checks the value's form.
    """
    check_partials(partials)
    check_forced_blocks(forced_blocks)
    check_selection(selection)
    H, h = na.check_heads(q, k, v)
    if selection == "block":
        idx = expand_block_selection(idx, cu_seqlens, q.shape[0], block)
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
