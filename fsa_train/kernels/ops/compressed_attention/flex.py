"""``compressed_attention`` on PyTorch's FlexAttention, the mask written as a ``mask_mod``.

The same contract as the naive op: the query at local position ``t`` of a document sees
compressed token ``i`` of the same document iff ``t >= i·s + l - 1``; output 0 and LSE ``-inf``
for queries that see none. The packed batch is one FlexAttention sequence of ``total`` queries
against ``total_c`` compressed keys, documents kept apart by the mask; KV heads are shared by
their G query heads (``enable_gqa``). On CUDA the op runs ``torch.compile``'d FlexAttention
(its Triton kernels, built per shape) and builds the block mask compiled too; elsewhere the
eager reference, which has no backward on CPU.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from fsa_train.kernels.varlen import document_ids, document_positions

FLEX_MISSING = ("compressed_kernel='flex' needs torch.nn.attention.flex_attention "
                "(torch >= 2.5)")


@cache
def _flex():
    """``(flex_attention, create_block_mask)`` or None without FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@cache
def _compiled():
    flex_attention, _ = _flex()
    return torch.compile(flex_attention, dynamic=False)


_LAST_MASK: list = []
"""The last block mask and what it was built from: every NSA layer of a step passes the same
``cu_seqlens`` tensors, so one mask serves them all (the tensors are held, so a later batch's
cannot take their place unnoticed; an in-place change bumps their version)."""


def _block_mask(cu_seqlens, cu_seqlens_c, total: int, total_c: int, kernel: int, stride: int):
    key = (cu_seqlens, cu_seqlens_c, cu_seqlens._version, cu_seqlens_c._version, total, total_c,
           kernel, stride)
    if _LAST_MASK and len(_LAST_MASK[0]) == len(key) and all(
            a is b if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(_LAST_MASK[0], key, strict=True)):
        return _LAST_MASK[1]
    _, create_block_mask = _flex()
    doc_q = document_ids(cu_seqlens, total)
    pos_q = document_positions(cu_seqlens, total)
    doc_c = document_ids(cu_seqlens_c, total_c)
    pos_c = document_positions(cu_seqlens_c, total_c)

    def visible(b, h, q_idx, kv_idx):
        return (doc_q[q_idx] == doc_c[kv_idx]) & (pos_c[kv_idx] * stride + kernel - 1
                                                   <= pos_q[q_idx])

    mask = create_block_mask(visible, None, None, total, total_c, device=cu_seqlens.device,
                             _compile=cu_seqlens.is_cuda)
    _LAST_MASK[:] = [key, mask]
    return mask


def unsupported(q: torch.Tensor) -> str | None:
    """Why the FlexAttention path cannot run these inputs (None when it can)."""
    if _flex() is None:
        return FLEX_MISSING
    if not q.is_cuda and q.requires_grad and torch.is_grad_enabled():
        return "compressed_kernel='flex' has no backward on the CPU (FlexAttention's limit)"
    return None


def compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel: int, stride: int,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [total, H, d], lse [H, total] fp32)``; a ValueError naming the reason when
    FlexAttention cannot run these inputs (:func:`unsupported`)."""
    reason = unsupported(q)
    if reason is not None:
        raise ValueError(reason)
    flex_attention, _ = _flex()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    block_mask = _block_mask(cu_seqlens, cu_seqlens_c, q.shape[0], k_c.shape[0], kernel, stride)
    run = _compiled() if q.is_cuda else flex_attention
    o, lse = run(q.transpose(0, 1)[None], k_c.transpose(0, 1)[None], v_c.transpose(0, 1)[None],
                 block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k_c.shape[1],
                 return_lse=True)
    return o[0].transpose(0, 1).contiguous(), lse[0].float().detach()
