"""``window_attention`` on cuDNN's fused attention (nvidia-cudnn-frontend's packed-sequence ops).

The same contract as the naive op: for each query token ``t`` of a document, softmax attention
over the keys ``t - W + 1 .. t`` of its document (all of ``0 .. t`` for ``window=None``), KV head
``j // G`` for query head ``j``. cuDNN's ``diagonal_band_left_bound`` counts the visible keys
including the query's own, so a window of W keys is ``window_left=W``; our ``cu_seqlens`` are
its ragged offsets, so documents never attend to each other.

cuDNN builds one execution plan per (documents, longest document, heads, ...) and the frontend
caches it by those numbers. Training batches differ in both, so the op rounds them up before
calling it: the document count to a power of two (the extra documents are empty) and the
longest document to a power of two (at most the batch length). A step then reuses one of a
handful of plans instead of building a new one every time. ``max_seqlen`` (a host integer) is
the longest document when the caller knows it; otherwise it is read from ``cu_seqlens``, one
host synchronisation (the batch length while a CUDA graph is captured).

The backward is deterministic when PyTorch is asked for deterministic algorithms
(``torch.use_deterministic_algorithms``, Lightning's ``trainer.deterministic``), as PyTorch's own
cuDNN attention does; otherwise it adds dQ in any order. The deterministic one is slower and
needs a workspace of B·H·S² elements (measured: 129 GiB for one 64K document at 16 heads).
"""

from __future__ import annotations

import torch

from fsa_train.kernels.libraries import CUDNN_SDPA_MISSING, cudnn_sdpa
from fsa_train.kernels.ops.window_attention.library import (
    checked_scale,
    gradients_fake,
    library_attention,
    unsupported_library,
)
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.utils import as_int32, longest_document, rowmajor


def unsupported(q: torch.Tensor, k: torch.Tensor, window: int | None) -> str | None:
    """Why the cuDNN path cannot run these inputs (None when it can)."""
    return unsupported_library("cudnn", cudnn_sdpa(), CUDNN_SDPA_MISSING, q, k, (8, 0),
                               "an Ampere or newer GPU (fused attention)")


def power_of_two_at_least(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def plan_shape(cu_seqlens: torch.Tensor, total: int,
               max_seqlen: int | None) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` padded with empty documents to a power-of-two count, and the longest
    document rounded up to a power of two (at most ``total``): the numbers cuDNN plans for."""
    cu = as_int32(cu_seqlens)
    docs = cu.numel() - 1
    slots = power_of_two_at_least(docs)
    if slots > docs:
        cu = torch.cat([cu, cu[-1:].expand(slots - docs)])
    longest = longest_document(cu, total, max_seqlen)
    return cu, max(1, min(power_of_two_at_least(longest), total))


def _forward_fake(q, k, v, cu, scale, window_left, longest):
    total, H, _ = q.shape
    return (q.new_empty((total, H, v.shape[-1])),
            q.new_empty((total, H, 1), dtype=torch.float32))


@kernel_op("cudnn_window_fwd", _forward_fake)
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      scale: float, window_left: int,
                      longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's causal forward on packed rows (``cu`` and ``longest`` from :func:`plan_shape`,
    ``window_left`` -1 for none): ``o`` like q and the natural-log ``lse [total, H, 1]`` fp32."""
    o, lse = cudnn_sdpa().fwd(q, k, v, scale, is_causal=True, window_left=window_left,
                              cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                              max_seqlen_kv=longest, return_lse=True)
    return o.contiguous(), lse.contiguous()  # the layouts the fake implementation declares


@kernel_op("cudnn_window_bwd", gradients_fake)
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor, scale: float,
                       window_left: int, longest: int, deterministic: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_forward` (``lse`` as it returned it)."""
    library = cudnn_sdpa()
    padded = library.padded_lse(lse[:, :, 0], cu, longest)
    grads = library.bwd(rowmajor(do), q, k, v, o, padded, scale, is_causal=True,
                        window_left=window_left, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                        max_seqlen_q=longest, max_seqlen_kv=longest,
                        is_deterministic=deterministic)
    return tuple(g.contiguous() for g in grads)


_CudnnWindowAttention = library_attention("_CudnnWindowAttention", attention_forward,
                                          attention_backward)
"""cuDNN's forward and backward on the padded plan shape (:func:`plan_shape`)."""


def window_attention(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None, *,
                     deterministic: bool | None = None) -> torch.Tensor:
    """``o [total, H, d]`` from cuDNN; a ValueError naming the reason when it cannot run these
    inputs (:func:`unsupported`). ``deterministic``: the backward's order (None: PyTorch's
    switch)."""
    scale = checked_scale(unsupported(q, k, window), q, scale)
    total = q.shape[0]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    cu, longest = plan_shape(cu_seqlens, total, max_seqlen)
    window_left = -1 if window is None or window >= longest else int(window)
    # packed copies: with q a strided view (the model's fused projection), cuDNN 9.19's
    # any-order backward returned a wrong dQ (GPU test, 2026-12-03); the deterministic one did not
    return _CudnnWindowAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, scale,
                                       window_left, longest, deterministic)
