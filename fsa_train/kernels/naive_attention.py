"""The building block of every naive op: masked softmax attention over one chunk of queries.

The naive ops (``ops/<op>/naive.py``) are the ground truth every kernel is tested against, so they
favour being obviously right over being fast: each document is processed on its own (packing can
never leak between documents) and in chunks of queries, with an explicit boolean mask of the keys
each query may see and a masked softmax whose statistics are fp32 (fp64 for fp64 inputs). Memory
stays bounded by the chunk size: no ``[H, total, total]`` matrix is ever built, and when a
gradient is needed each chunk is recomputed in the backward pass (activation checkpointing)
instead of keeping its probabilities.

Conventions shared by all ops (docs/architecture.md):

* ``q [total, H, d]``, ``k, v [total, h, d]``; query head j uses KV head ``j // G``, ``G = H/h``.
* ``cu_seqlens [n_docs + 1]`` (int32 or int64); positions and block ids are local to a document.
* A query that sees no key gets output 0 and log-sum-exp ``-inf``, with finite (zero) gradients.
* The documents' boundaries are read on the host (one synchronisation per call): fine here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

SCORE_BUDGET = 1 << 27
"""Largest number of attention scores (heads x queries x keys) materialised at once per chunk."""
MIN_CHUNK = 16
MAX_CHUNK = 4096

MaskFn = Callable[[], torch.Tensor]

_CHECKPOINT = [True]
"""Whether :func:`attention` recomputes its chunks in backward (see :func:`kept_activations`)."""


@contextmanager
def kept_activations() -> Iterator[None]:
    """Chunks keep their activations instead of being checkpointed: for the backward of the
    opaque compiled naive op (:mod:`fsa_train.kernels.registry`), which differentiates inside a
    custom op, where checkpointing's recomputation would run without autograd."""
    _CHECKPOINT[0] = False
    try:
        yield
    finally:
        _CHECKPOINT[0] = True


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of softmax statistics and scores: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of every document (host synchronisation)."""
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def chunks(length: int, heads: int, keys: int) -> Iterator[tuple[int, int]]:
    """Query ranges ``[t0, t1)`` covering ``0..length`` so that heads·chunk·keys fits the budget."""
    size = SCORE_BUDGET // max(1, heads * keys)
    size = max(MIN_CHUNK, min(MAX_CHUNK, size))
    for t0 in range(0, length, size):
        yield t0, min(length, t0 + size)


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """``(H, h)`` after checking that the query heads are a multiple of the KV heads."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim]: {q.shape}, {k.shape}, {v.shape}")
    H, h = q.shape[1], k.shape[1]
    if v.shape[1] != h or H % h != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({h}, {v.shape[1]})")
    return H, h


def visible_compressed(t_end: int, n_c: int, kernel: int, stride: int) -> int:
    """Compressed tokens visible to a query at position ``t_end - 1``: ``i·s + l - 1 <= t``."""
    if t_end < kernel:
        return 0
    return min(n_c, (t_end - kernel) // stride + 1)


def attention_core(
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
    cdt = stat_dtype(q.dtype)
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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: MaskFn, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_core`, recomputed in backward when a gradient is needed (less memory)."""
    if q.shape[0] == 0 or k.shape[0] == 0:
        H, dv = q.shape[1], v.shape[2]
        o = q.new_zeros(q.shape[0], H, dv)
        lse = q.new_full((H, q.shape[0]), float("-inf"), dtype=stat_dtype(q.dtype))
        return o, lse
    if _CHECKPOINT[0] and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        return checkpoint(
            attention_core, q, k, v, mask_fn, scale, use_reentrant=False, preserve_rng_state=False
        )
    return attention_core(q, k, v, mask_fn, scale)


def cat(parts: list[torch.Tensor], dim: int, empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=dim) if parts else empty


# --------------------------------------------------------------------------------------------
# masks (built inside the checkpointed chunk)
# --------------------------------------------------------------------------------------------


def compressed_mask(
    t0: int, t1: int, n_keys: int, kernel: int, stride: int, device: torch.device
) -> torch.Tensor:
    """``[n, m]``: query t sees compressed token i iff its window ends at or before t."""
    t = torch.arange(t0, t1, device=device)[:, None]
    i = torch.arange(n_keys, device=device)[None, :]
    return i * stride + kernel - 1 <= t


def window_mask(
    t0: int, t1: int, lo: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """``[n, m]`` over keys ``lo..t1-1``: causal, at most ``window`` keys back (itself included)."""
    t = torch.arange(t0, t1, device=device)[:, None]
    j = torch.arange(lo, t1, device=device)[None, :]
    mask = j <= t
    if window is not None:
        mask = mask & (j > t - window)
    return mask


def selected_mask(idx: torch.Tensor, t0: int, t1: int, block: int) -> torch.Tensor:
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
