"""``window_attention`` on FlashAttention-4 (``flash-attn-4``, the CuTe DSL kernels for Hopper and
Blackwell).

The same contract as the naive op: for each query token ``t`` of a document, softmax attention
over the keys ``t - W + 1 .. t`` of its document (all of ``0 .. t`` for ``window=None``), KV head
``j // G`` for query head ``j``. FlashAttention's ``window_size = (left, right)`` keeps keys
``t - left .. t + right``, so a window of W keys is ``(W - 1, 0)``; our ``cu_seqlens`` are its
packed-sequence offsets (documents never attend to each other).

FA4's public ``flash_attn_varlen_func`` is a Python autograd function that JIT-compiles CuTe
kernels, which Dynamo cannot trace; so its forward and backward entry points are wrapped as our
own custom ops (:func:`~fsa_train.kernels.registry.kernel_op`) and tied together by an autograd
function here, like the cuDNN path. Those entry points (``_flash_attn_fwd``, ``_flash_attn_bwd``)
are the library's internal API, read in flash-attn-4 4.0.0b40: a release that changes them is
refused in one line (:func:`unsupported`) and "auto" keeps another kernel.

``max_seqlen`` is the longest document of the batch as a host integer (FA4 sizes host-side
choices with it); when the caller does not know it, it is read from ``cu_seqlens`` (one host
synchronisation). The backward is deterministic when PyTorch is asked for deterministic
algorithms, otherwise FA4's default.
"""

from __future__ import annotations

import math

import torch

from fsa_train.kernels.libraries import (
    FLASH_ATTN_4_MISSING,
    device_capability,
    flash_attn_4,
    unsupported_inputs,
)
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.utils import as_int32, longest_document


def unsupported(q: torch.Tensor, k: torch.Tensor, window: int | None) -> str | None:
    """Why FlashAttention-4 cannot run these inputs (None when it can)."""
    if flash_attn_4() is None:
        return FLASH_ATTN_4_MISSING
    reason = unsupported_inputs("fa4", q, k, max_head_dim=128)
    if reason is None and device_capability(q.device) < (9, 0):
        major, minor = device_capability(q.device)
        reason = (f"window_kernel='fa4' needs a Hopper or Blackwell GPU (compute capability 9.0 "
                  f"or newer), got {major}.{minor}")
    return reason


def window_size(window: int | None, longest: int) -> tuple[int | None, int | None]:
    """FA4's ``(window_size_left, window_size_right)`` for our ``window`` (None: dense causal,
    which FA4 spells as no window with ``causal=True``)."""
    if window is None or window >= longest:
        return None, None
    return int(window) - 1, 0


def _forward_fake(q, k, v, cu, scale, left, longest):
    total, H, _ = q.shape
    return (q.new_empty((total, H, v.shape[-1])),
            q.new_empty((H, total), dtype=torch.float32))


@kernel_op("fa4_window_fwd", _forward_fake)
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      scale: float, left: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's causal forward on packed rows (``left`` -1 for no window): ``o`` like q and the
    natural-log ``lse [H, total]`` fp32."""
    window_left, window_right = (None, None) if left < 0 else (left, 0)
    o, lse, *_ = flash_attn_4().fwd(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
        max_seqlen_k=longest, softmax_scale=scale, causal=True,
        window_size_left=window_left, window_size_right=window_right, return_lse=True)
    return o.contiguous(), lse.contiguous()  # the layouts the fake implementation declares


def _backward_fake(do, q, k, v, o, lse, cu, scale, left, longest, deterministic):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


@kernel_op("fa4_window_bwd", _backward_fake)
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor, scale: float,
                       left: int, longest: int, deterministic: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_forward`."""
    window_left, window_right = (None, None) if left < 0 else (left, 0)
    dq, dk, dv = flash_attn_4().bwd(
        q, k, v, o, do.contiguous(), lse, scale, True, 0.0, window_size_left=window_left,
        window_size_right=window_right, cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=longest, max_seqlen_k=longest, deterministic=deterministic)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


class _FA4WindowAttention(torch.autograd.Function):
    """FA4's forward and backward as our custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale: float, left: int, longest: int, deterministic: bool):
        o, lse = attention_forward(q, k, v, cu, scale, left, longest)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.options = (scale, left, longest, deterministic)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, cu, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def window_attention(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None) -> torch.Tensor:
    """``o [total, H, d]`` from FlashAttention-4; a ValueError naming the reason when it cannot
    run these inputs (:func:`unsupported`)."""
    reason = unsupported(q, k, window)
    if reason is not None:
        raise ValueError(reason)
    total = q.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cu = as_int32(cu_seqlens)
    longest = max(1, longest_document(cu, total, max_seqlen))
    left, _ = window_size(window, longest)
    return _FA4WindowAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, scale,
                                     -1 if left is None else left, longest,
                                     torch.are_deterministic_algorithms_enabled())
