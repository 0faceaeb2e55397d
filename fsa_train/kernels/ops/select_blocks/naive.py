"""Naive ``select_blocks`` (docs/nsa.md steps 4-5): block scores from the compressed attention's
probabilities, forced blocks, a stable sort for the top-k."""

from __future__ import annotations

import torch

from fsa_train.kernels import naive_attention as na


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
) -> torch.Tensor:
    """Top-``topk`` selection blocks per (KV head, token), nsa.md step 5; no gradient.

    Score of block b for query t and KV head: the sum over the group's G query heads and over the
    visible compressed tokens i of ``exp(σ q·k̃_i - lse[t]) ·`` overlap weight. Blocks
    ``< init_blocks`` and the ``local_blocks`` ending at ``floor(t/B)`` are forced (+inf), blocks
    after ``floor(t/B)`` are never valid, ties go to the lower block id. Scores are fp32 (fp64 for
    fp64 inputs).

    Returns:
        ``idx [h, total, topk]`` int32: document-local block ids, valid ones ascending, then -1.
    """
    total, H, _ = q.shape
    h = k_c.shape[1]
    if H % h:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({h})")
    G = H // h
    scale = na.softmax_scale(scale, q.shape[-1])
    cdt = na.stat_dtype(q.dtype)
    idx = torch.full((h, total, topk), -1, dtype=torch.int32, device=q.device)
    overlap_weights(kernel, stride, block)  # validates the divisibility
    docs = zip(na.documents(cu_seqlens), na.documents(cu_seqlens_c), strict=True)
    for (b0, b1), (c0, c1) in docs:
        for t0, t1 in na.chunks(b1 - b0, H, max(c1 - c0, (b1 - b0) // block + 1)):
            n = t1 - t0
            n_blocks = (t1 - 1) // block + 1
            m = na.visible_compressed(t1, c1 - c0, kernel, stride)
            if m > 0:
                qh = q[b0 + t0 : b0 + t1].to(cdt).reshape(n, h, G, -1).permute(1, 2, 0, 3)
                kh = k_c[c0 : c0 + m].to(cdt).permute(1, 2, 0).unsqueeze(1)
                logits = torch.matmul(qh, kh) * scale  # [h, G, n, m]
                row_lse = lse[:, b0 + t0 : b0 + t1].to(cdt).reshape(h, G, n, 1)
                visible = na.compressed_mask(t0, t1, m, kernel, stride, q.device)
                visible = visible & torch.isfinite(row_lse)
                p = torch.where(visible, torch.exp(logits - row_lse), 0.0).sum(dim=1)
                scores = block_scores(p, kernel, stride, block, n_blocks)  # [h, n, n_blocks]
            else:
                scores = torch.zeros(h, n, n_blocks, dtype=cdt, device=q.device)
            own = (torch.arange(t0, t1, device=q.device) // block)[:, None]
            b = torch.arange(n_blocks, device=q.device)[None, :]
            valid = b <= own  # [n, n_blocks]
            forced = valid & ((b < init_blocks) | (b > own - local_blocks))
            scores = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
            chosen_valid = valid.expand(h, n, n_blocks).gather(-1, order)
            order = torch.where(chosen_valid, order, n_blocks).sort(dim=-1).values
            order = torch.where(order == n_blocks, -1, order)
            idx[:, b0 + t0 : b0 + t1, : order.shape[-1]] = order.to(torch.int32)
    return idx
