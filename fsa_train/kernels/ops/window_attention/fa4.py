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

import torch

from fsa_train.kernels.libraries import FLASH_ATTN_4_MISSING, flash_attn_4
from fsa_train.kernels.ops.window_attention.library import (
    checked_scale,
    gradients_fake,
    library_attention,
    unsupported_library,
)
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.utils import as_int32, longest_document


def unsupported(q: torch.Tensor, k: torch.Tensor, window: int | None) -> str | None:
    """Why FlashAttention-4 cannot run these inputs (None when it can)."""
    return unsupported_library("fa4", flash_attn_4(), FLASH_ATTN_4_MISSING, q, k, (9, 0),
                               "a Hopper or Blackwell GPU")


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


@kernel_op("fa4_window_bwd", gradients_fake)
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


_FA4WindowAttention = library_attention("_FA4WindowAttention", attention_forward,
                                        attention_backward)
"""FA4's forward and backward as our custom ops."""


def window_attention(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None) -> torch.Tensor:
    """``o [total, H, d]`` from FlashAttention-4; a ValueError naming the reason when it cannot
    run these inputs (:func:`unsupported`)."""
    scale = checked_scale(unsupported(q, k, window), q, scale)
    total = q.shape[0]
    cu = as_int32(cu_seqlens)
    longest = max(1, longest_document(cu, total, max_seqlen))
    left, _ = window_size(window, longest)
    return _FA4WindowAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, scale,
                                     -1 if left is None else left, longest,
                                     torch.are_deterministic_algorithms_enabled())
