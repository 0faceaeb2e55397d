"""Naive ``select_blocks`` (docs/nsa.md steps 4-5): block scores from the compressed attention's
probabilities, forced blocks, a stable sort for the top-k."""

from __future__ import annotations

import torch

from fsa_train.kernels import naive_attention as na
from fsa_train.kernels.utils import check_selection
from fsa_train.kernels.varlen import block_rows


def overlap_weights(kernel: int, stride: int, block: int) -> list[int]:
    """Weights (overlap length / s) of the compressed tokens ``(B/s)·b - (l/s - 1) + m`` on block b.

    The histogram of ``a + c`` for ``a < l/s``, ``c < B/s``; for l=32, s=16, B=64: [1, 2, 2, 2, 1].
    """
    if kernel % stride or block % stride:
        raise ValueError(f"stride={stride} must divide kernel={kernel} and block={block}")
    a, c = kernel // stride, block // stride
    weights = [0] * (a + c - 1)
    for i in range(a):
        for j in range(c):
            weights[i + j] += 1
    return weights


def block_scores(
    p: torch.Tensor, kernel: int, stride: int, block: int, n_blocks: int
) -> torch.Tensor:
    """Map compressed-token scores ``p [..., n_c]`` onto selection blocks: ``[..., n_blocks]``.

    Block b sums ``w_m · p[(B/s)·b - (l/s - 1) + m]`` over the weights of :func:`overlap_weights`;
    indices outside ``0..n_c-1`` are dropped. The terms are added in order of m, elementwise, so
    equal inputs give bit-equal scores (ties stay ties).
    """
    weights = overlap_weights(kernel, stride, block)
    per_block = block // stride
    offset = kernel // stride - 1
    width = len(weights)
    padded_len = (n_blocks - 1) * per_block + width
    padded = p.new_zeros(*p.shape[:-1], padded_len)
    keep = max(0, min(p.shape[-1], padded_len - offset))
    padded[..., offset : offset + keep] = p[..., :keep]
    windows = padded.unfold(-1, width, per_block)  # [..., n_blocks, width]
    scores = windows[..., 0] * weights[0]
    for m in range(1, width):
        scores = scores + windows[..., m] * weights[m]
    return scores


def _top_blocks(scores: torch.Tensor, own: torch.Tensor, topk: int, init_blocks: int,
                local_blocks: int) -> torch.Tensor:
    """Top-``topk`` block ids ``[h, rows, <=topk]`` of ``scores [h, rows, n_blocks]`` for rows
    whose own block is ``own [rows]``: forced blocks +inf, blocks after ``own`` never valid, ties
    to the lower id (a stable sort), valid ids ascending, then -1."""
    n_blocks = scores.shape[-1]
    b = torch.arange(n_blocks, device=scores.device)[None, :]
    own = own[:, None]
    valid = b <= own  # [rows, n_blocks]
    forced = valid & ((b < init_blocks) | (b > own - local_blocks))
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen_valid = valid.expand(scores.shape[0], *valid.shape).gather(-1, order)
    order = torch.where(chosen_valid, order, n_blocks).sort(dim=-1).values
    return torch.where(order == n_blocks, -1, order).to(torch.int32)


def _token_scores(q, k_c, lse, b0, t0, t1, c0, m, G, scale, cdt, kernel, stride, block):
    """Per-token block scores ``[h, t1 - t0, n_blocks]`` of document tokens ``t0 .. t1`` (packed
    from ``b0``), over the first ``m`` compressed tokens of the document (from ``c0``)."""
    n = t1 - t0
    h = k_c.shape[1]
    n_blocks = (t1 - 1) // block + 1
    if m == 0:
        return torch.zeros(h, n, n_blocks, dtype=cdt, device=q.device)
    qh = q[b0 + t0 : b0 + t1].to(cdt).reshape(n, h, G, -1).permute(1, 2, 0, 3)
    kh = k_c[c0 : c0 + m].to(cdt).permute(1, 2, 0).unsqueeze(1)
    logits = torch.matmul(qh, kh) * scale  # [h, G, n, m]
    row_lse = lse[:, b0 + t0 : b0 + t1].to(cdt).reshape(h, G, n, 1)
    visible = na.compressed_mask(t0, t1, m, kernel, stride, q.device)
    visible = visible & torch.isfinite(row_lse)
    p = torch.where(visible, torch.exp(logits - row_lse), 0.0).sum(dim=1)
    return block_scores(p, kernel, stride, block, n_blocks)


@torch.no_grad()
def select_blocks(
    q: torch.Tensor,
    k_c: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_c: torch.Tensor,
    kernel: int,
    stride: int,
    block: int,
    topk: int,
    init_blocks: int,
    local_blocks: int,
    scale: float | None = None,
    selection: str = "token",
) -> torch.Tensor:
    """Top-``topk`` selection blocks per (KV head, token) or per (KV head, query block), nsa.md
    step 5 and its block-shared variant; no gradient.

    Score of block b for query t and KV head: the sum over the group's G query heads and over the
    visible compressed tokens i of ``exp(σ q·k̃_i - lse[t]) ·`` overlap weight. Blocks
    ``< init_blocks`` and the ``local_blocks`` ending at the own block are forced (+inf), blocks
    after the own block are never valid, ties go to the lower block id. Scores are fp32 (fp64
    for fp64 inputs).

    ``selection="token"`` (exact NSA): one selection per token, own block ``floor(t/B)``.
    ``selection="block"``: the tokens of query block j share one selection, scored by the sum of
    their per-token scores, own block j.

    Returns:
        token: ``idx [h, total, topk]`` int32; block: ``idx [h, total // B + n_docs, topk]``,
        document d's query block j in row ``cu[d] // B + d + j`` (rows no block owns are -1;
        :func:`fsa_train.kernels.varlen.block_rows`). Document-local block ids, valid ones
        ascending, then -1.
    """
    check_selection(selection)
    total, H, _ = q.shape
    h = k_c.shape[1]
    if H % h:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({h})")
    G = H // h
    scale = na.softmax_scale(scale, q.shape[-1])
    cdt = na.stat_dtype(q.dtype)
    overlap_weights(kernel, stride, block)  # validates the divisibility
    by_block = selection == "block"
    n_docs = cu_seqlens.numel() - 1
    rows = block_rows(total, n_docs, block) if by_block else total
    idx = torch.full((h, rows, topk), -1, dtype=torch.int32, device=q.device)
    docs = zip(na.documents(cu_seqlens), na.documents(cu_seqlens_c), strict=True)
    for d, ((b0, b1), (c0, c1)) in enumerate(docs):
        length = b1 - b0
        if by_block and length:
            n_blocks = (length - 1) // block + 1
            shared = torch.zeros(h, n_blocks, n_blocks, dtype=cdt, device=q.device)
        for t0, t1 in na.chunks(length, H, max(c1 - c0, length // block + 1)):
            m = na.visible_compressed(t1, c1 - c0, kernel, stride)
            scores = _token_scores(q, k_c, lse, b0, t0, t1, c0, m, G, scale, cdt, kernel,
                                   stride, block)
            own = torch.arange(t0, t1, device=q.device) // block
            if by_block:  # each token's scores added onto its own block's row
                shared[:, :, : scores.shape[-1]].index_add_(1, own, scores)
                continue
            order = _top_blocks(scores, own, topk, init_blocks, local_blocks)
            idx[:, b0 + t0 : b0 + t1, : order.shape[-1]] = order
        if by_block and length:
            own = torch.arange(n_blocks, device=q.device)
            order = _top_blocks(shared, own, topk, init_blocks, local_blocks)
            row0 = b0 // block + d
            idx[:, row0 : row0 + n_blocks, : order.shape[-1]] = order
    return idx
