"""Naive ``window_attention`` (docs/nsa.md step 7; ``window=None`` is dense causal attention)."""

from __future__ import annotations

from functools import partial

import torch

from fsa_train.kernels import naive_attention as na


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal attention inside each document over keys ``t - W + 1 .. t`` (``window=None``: all).

    ``max_seqlen``: the longest document as a host integer, when the caller knows it (library
    kernels size their grid with it; the result does not depend on it). Returns
    ``o [total, H, d]`` in q's dtype.
    """
    H, h = na.check_heads(q, k, v)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    scale = na.softmax_scale(scale, q.shape[-1])
    parts = []
    for b0, b1 in na.documents(cu_seqlens):
        length = b1 - b0
        keys = length if window is None else min(length, window - 1 + na.MAX_CHUNK)
        for t0, t1 in na.chunks(length, H, keys):
            lo = 0 if window is None else max(0, t0 - window + 1)
            mask_fn = partial(na.window_mask, t0, t1, lo, window, q.device)
            o, _ = na.attention(
                q[b0 + t0 : b0 + t1], k[b0 + lo : b0 + t1], v[b0 + lo : b0 + t1], mask_fn, scale
            )
            parts.append(o)
    return na.cat(parts, 0, q.new_zeros(0, H, v.shape[-1]))
