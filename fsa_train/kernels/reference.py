"""Pure-PyTorch ground truth of every NSA op (docs/nsa.md), on the packed layout.

Every Triton kernel is tested against these functions, so they favour being obviously right over
being fast: each document is processed on its own (packing can never leak between documents) and
in chunks of queries, with an explicit boolean mask of the keys each query may see and a masked
softmax whose statistics are fp32 (fp64 for fp64 inputs). Memory stays bounded by the chunk size:
no ``[H, total, total]`` matrix is ever built, and when a gradient is needed each chunk is
recomputed in the backward pass (activation checkpointing) instead of keeping its probabilities.

Conventions shared by all ops (see docs/architecture.md):

* ``q [total, H, d]``, ``k, v [total, h, d]``; query head j uses KV head ``j // G``, ``G = H/h``.
* ``cu_seqlens [n_docs + 1]`` (int32 or int64); positions and block ids are local to a document.
* A query that sees no key gets output 0 and log-sum-exp ``-inf``, with finite (zero) gradients.
* The documents' boundaries are read on the host (one synchronisation per call): fine here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from fsa_train.kernels.varlen import document_ids

_SCORE_BUDGET = 1 << 27
"""Largest number of attention scores (heads x queries x keys) materialised at once per chunk."""
_MIN_CHUNK = 16
_MAX_CHUNK = 4096

MaskFn = Callable[[], torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of softmax statistics and scores: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of every document (host synchronisation)."""
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _chunks(length: int, heads: int, keys: int) -> Iterator[tuple[int, int]]:
    """Query ranges ``[t0, t1)`` covering ``0..length`` so that heads·chunk·keys fits the budget."""
    size = _SCORE_BUDGET // max(1, heads * keys)
    size = max(_MIN_CHUNK, min(_MAX_CHUNK, size))
    for t0 in range(0, length, size):
        yield t0, min(length, t0 + size)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """``(H, h)`` after checking that the query heads are a multiple of the KV heads."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim]: {q.shape}, {k.shape}, {v.shape}")
    H, h = q.shape[1], k.shape[1]
    if v.shape[1] != h or H % h != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({h}, {v.shape[1]})")
    return H, h


def _visible_compressed(t_end: int, n_c: int, kernel: int, stride: int) -> int:
    """Compressed tokens visible to a query at position ``t_end - 1``: ``i·s + l - 1 <= t``."""
    if t_end < kernel:
        return 0
    return min(n_c, (t_end - kernel) // stride + 1)


def _attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: MaskFn, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention of one query chunk: ``o [n, H, dv]`` (q dtype), ``lse [H, n]``.

    ``mask_fn()`` returns a boolean mask broadcastable to ``[h, G, n, m]`` (True = visible); it is
    built here, not passed in, so checkpointing never keeps it alive. Rows without any visible key
    give ``o = 0`` and ``lse = -inf``; every operation on them has a zero derivative (no NaN).
    """
    n, H, d = q.shape
    m, h, dv = v.shape
    G = H // h
    cdt = _stat_dtype(q.dtype)
    qh = q.to(cdt).reshape(n, h, G, d).permute(1, 2, 0, 3)  # [h, G, n, d]
    kh = k.to(cdt).permute(1, 2, 0).unsqueeze(1)  # [h, 1, d, m]
    vh = v.to(cdt).permute(1, 0, 2).unsqueeze(1)  # [h, 1, m, dv]
    scores = torch.matmul(qh, kh) * scale  # [h, G, n, m]
    scores = scores.masked_fill(~mask_fn(), float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(~torch.isfinite(row_max), 0.0)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    seen = denom > 0
    denom = torch.where(seen, denom, torch.ones_like(denom))
    o = torch.matmul(p, vh) / denom  # [h, G, n, dv]
    lse = torch.where(seen, row_max + torch.log(denom), torch.full_like(denom, float("-inf")))
    o = o.permute(2, 0, 1, 3).reshape(n, H, dv).to(q.dtype)
    return o, lse.reshape(H, n)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: MaskFn, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attention_core`, recomputed in backward when a gradient is needed (less memory)."""
    if q.shape[0] == 0 or k.shape[0] == 0:
        H, dv = q.shape[1], v.shape[2]
        o = q.new_zeros(q.shape[0], H, dv)
        lse = q.new_full((H, q.shape[0]), float("-inf"), dtype=_stat_dtype(q.dtype))
        return o, lse
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return checkpoint(
            _attention_core, q, k, v, mask_fn, scale, use_reentrant=False, preserve_rng_state=False
        )
    return _attention_core(q, k, v, mask_fn, scale)


def _cat(parts: list[torch.Tensor], dim: int, empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=dim) if parts else empty


# --------------------------------------------------------------------------------------------
# masks (built inside the checkpointed chunk)
# --------------------------------------------------------------------------------------------


def _compressed_mask(
    t0: int, t1: int, n_keys: int, kernel: int, stride: int, device: torch.device
) -> torch.Tensor:
    """``[n, m]``: query t sees compressed token i iff its window ends at or before t."""
    t = torch.arange(t0, t1, device=device)[:, None]
    i = torch.arange(n_keys, device=device)[None, :]
    return i * stride + kernel - 1 <= t


def _window_mask(
    t0: int, t1: int, lo: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """``[n, m]`` over keys ``lo..t1-1``: causal, at most ``window`` keys back (itself included)."""
    t = torch.arange(t0, t1, device=device)[:, None]
    j = torch.arange(lo, t1, device=device)[None, :]
    mask = j <= t
    if window is not None:
        mask = mask & (j > t - window)
    return mask


def _selected_mask(idx: torch.Tensor, t0: int, t1: int, block: int) -> torch.Tensor:
    """``[h, 1, n, t1]``: keys of the blocks in ``idx [h, n, T]`` (-1 and out of range ignored),
    token-level causal."""
    device = idx.device
    h, n, _ = idx.shape
    n_blocks = -(-t1 // block)
    ids = idx.long()
    ids = torch.where((ids >= 0) & (ids < n_blocks), ids, n_blocks)
    chosen = torch.zeros(h, n, n_blocks + 1, dtype=torch.bool, device=device)
    chosen.scatter_(2, ids, True)
    key_block = torch.arange(t1, device=device) // block
    mask = chosen[:, :, key_block]  # [h, n, t1]
    t = torch.arange(t0, t1, device=device)[:, None]
    mask = mask & (torch.arange(t1, device=device)[None, :] <= t)
    return mask.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def compressed_lengths(cu_seqlens: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``cu_seqlens_c`` (int32): a document of length L has ``(L - l)//s + 1`` compressed tokens
    if ``L >= l``, else 0. Runs on the device, no synchronisation."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    counts = torch.where(
        lengths >= kernel,
        torch.div(lengths - kernel, stride, rounding_mode="floor") + 1,
        torch.zeros_like(lengths),
    )
    cu_c = torch.zeros_like(cu)
    cu_c[1:] = torch.cumsum(counts, 0)
    return cu_c.to(torch.int32)


def check_compress_args(
    x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None, kernel: int, stride: int
) -> None:
    """One-line ``ValueError`` for shapes or a geometry that ``compress`` cannot take."""
    if kernel < stride or kernel % stride != 0:
        raise ValueError(f"stride={stride} must divide kernel={kernel}")
    _, h, d = x.shape
    if weight.shape[:2] != (h, kernel * d):
        raise ValueError(f"weight must be [{h}, {kernel * d}, d_out], got {tuple(weight.shape)}")
    if pe is not None and pe.shape != (h, kernel, d):
        raise ValueError(f"pe must be [{h}, {kernel}, {d}], got {tuple(pe.shape)}")


def compress_windows(
    x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor:
    """``[n, h, d_out]``: the windows of tokens ``rows [n, l]`` (plus ``pe``) times ``weight``."""
    n, kernel = rows.shape
    _, h, d = x.shape
    windows = x[rows]  # [n, l, h, d]
    if pe is not None:
        windows = windows + pe.to(x.dtype).transpose(0, 1)
    windows = windows.permute(2, 0, 1, 3).reshape(h, n, kernel * d)
    return torch.bmm(windows, weight.to(x.dtype)).transpose(0, 1)  # [n, h, d_out]


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


def compressed_attention(
    q: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_c: torch.Tensor,
    kernel: int,
    stride: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the compressed tokens whose whole window is in the query's past.

    Query at local position t sees compressed token i of its document iff ``t >= i·s + l - 1``.

    Returns:
        ``o [total, H, d]`` in q's dtype (0 for queries that see nothing) and the natural-log
        ``lse [H, total]``: fp32 (fp64 for fp64 inputs), ``-inf`` where no key is visible.
    """
    H, h = _check_heads(q, k_c, v_c)
    scale = _scale(scale, q.shape[-1])
    o_parts, lse_parts = [], []
    for (b0, b1), (c0, c1) in zip(_documents(cu_seqlens), _documents(cu_seqlens_c), strict=True):
        for t0, t1 in _chunks(b1 - b0, H, c1 - c0):
            m = _visible_compressed(t1, c1 - c0, kernel, stride)
            mask_fn = partial(_compressed_mask, t0, t1, m, kernel, stride, q.device)
            o, lse = _attention(
                q[b0 + t0 : b0 + t1], k_c[c0 : c0 + m], v_c[c0 : c0 + m], mask_fn, scale
            )
            o_parts.append(o)
            lse_parts.append(lse)
    empty_lse = torch.empty(H, 0, dtype=_stat_dtype(q.dtype), device=q.device)
    return (
        _cat(o_parts, 0, q.new_zeros(0, H, v_c.shape[-1])),
        _cat(lse_parts, 1, empty_lse),
    )


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
    scale = _scale(scale, q.shape[-1])
    cdt = _stat_dtype(q.dtype)
    idx = torch.full((h, total, topk), -1, dtype=torch.int32, device=q.device)
    overlap_weights(kernel, stride, block)  # validates the divisibility
    for (b0, b1), (c0, c1) in zip(_documents(cu_seqlens), _documents(cu_seqlens_c), strict=True):
        for t0, t1 in _chunks(b1 - b0, H, max(c1 - c0, (b1 - b0) // block + 1)):
            n = t1 - t0
            n_blocks = (t1 - 1) // block + 1
            m = _visible_compressed(t1, c1 - c0, kernel, stride)
            if m > 0:
                qh = q[b0 + t0 : b0 + t1].to(cdt).reshape(n, h, G, -1).permute(1, 2, 0, 3)
                kh = k_c[c0 : c0 + m].to(cdt).permute(1, 2, 0).unsqueeze(1)
                logits = torch.matmul(qh, kh) * scale  # [h, G, n, m]
                row_lse = lse[:, b0 + t0 : b0 + t1].to(cdt).reshape(h, G, n, 1)
                visible = _compressed_mask(t0, t1, m, kernel, stride, q.device)
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


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the union of the keys of each query's selected blocks, causal per token.

    Query head j at local position t attends keys in the blocks ``idx[j // G, t, :]`` (document-
    local ids; -1 and ids past the query are ignored, duplicates count once) with key position
    ``<= t``. Returns ``o [total, H, d]`` in q's dtype; 0 where nothing is selected.
    """
    H, h = _check_heads(q, k, v)
    scale = _scale(scale, q.shape[-1])
    parts = []
    for b0, b1 in _documents(cu_seqlens):
        for t0, t1 in _chunks(b1 - b0, H, b1 - b0):
            mask_fn = partial(_selected_mask, idx[:, b0 + t0 : b0 + t1], t0, t1, block)
            o, _ = _attention(
                q[b0 + t0 : b0 + t1], k[b0 : b0 + t1], v[b0 : b0 + t1], mask_fn, scale
            )
            parts.append(o)
    return _cat(parts, 0, q.new_zeros(0, H, v.shape[-1]))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention inside each document over keys ``t - W + 1 .. t`` (``window=None``: all).

    Returns ``o [total, H, d]`` in q's dtype.
    """
    H, h = _check_heads(q, k, v)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    scale = _scale(scale, q.shape[-1])
    parts = []
    for b0, b1 in _documents(cu_seqlens):
        length = b1 - b0
        keys = length if window is None else min(length, window - 1 + _MAX_CHUNK)
        for t0, t1 in _chunks(length, H, keys):
            lo = 0 if window is None else max(0, t0 - window + 1)
            mask_fn = partial(_window_mask, t0, t1, lo, window, q.device)
            o, _ = _attention(
                q[b0 + t0 : b0 + t1], k[b0 + lo : b0 + t1], v[b0 + lo : b0 + t1], mask_fn, scale
            )
            parts.append(o)
    return _cat(parts, 0, q.new_zeros(0, H, v.shape[-1]))


def gate_mix(
    o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Gated sum of the branch outputs (docs/nsa.md step 8), gates ``[total, H, 3]`` cast to
    o_cmp's dtype, order (cmp, sel, win)."""
    gates = gates.to(o_cmp.dtype)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win
