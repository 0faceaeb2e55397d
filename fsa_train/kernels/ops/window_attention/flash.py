"""``window_attention`` on FlashAttention's packed-sequence kernel (torch's ``varlen_attn``).

The same contract as the naive op: for each query token ``t`` of a document, softmax attention
over the keys ``t - W + 1 .. t`` of its document (all of ``0 .. t`` for ``window=None``), KV head
``j // G`` for query head ``j``. FlashAttention's ``window_size = (left, right)`` keeps keys
``t - left .. t + right``, so a window of W keys is ``(W - 1, 0)`` and dense causal attention
``(-1, 0)``; its ``cu_seqlens`` are ours (documents never attend to each other).

``max_seqlen`` is the longest document of the batch as a host integer: FlashAttention sizes its
grid with it. When the caller does not know it, it is read from ``cu_seqlens`` (one host
synchronisation; the batch length while a CUDA graph is captured).

Gradients come from torch's own backward of the op.
"""

from __future__ import annotations

import torch

from fsa_train.kernels.libraries import FLASH_VARLEN_MISSING, flash_varlen, unsupported_inputs
from fsa_train.kernels.ops.window_attention.library import checked_scale
from fsa_train.kernels.utils import as_int32, longest_document, rowmajor


def unsupported(q: torch.Tensor, k: torch.Tensor, window: int | None) -> str | None:
    """Why FlashAttention cannot run these inputs (None when it can)."""
    library = flash_varlen()
    if library is None or not library.takes_window_size:
        return FLASH_VARLEN_MISSING
    return unsupported_inputs("flash", q, k, max_head_dim=256)


def window_attention(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None) -> torch.Tensor:
    """``o [total, H, d]`` from FlashAttention; a ValueError naming the reason when it cannot
    run these inputs (:func:`unsupported`)."""
    scale = checked_scale(unsupported(q, k, window), q, scale)
    library = flash_varlen()
    total = q.shape[0]
    cu = as_int32(cu_seqlens)
    longest = longest_document(cu, total, max_seqlen)
    left = -1 if window is None or window >= total else int(window) - 1
    options = {"scale": scale, "window_size": (left, 0)}
    if library.takes_enable_gqa:
        options["enable_gqa"] = q.shape[1] != k.shape[1]
    return library.fn(rowmajor(q), rowmajor(k), rowmajor(v), cu, cu, longest, longest,
                      **options)
