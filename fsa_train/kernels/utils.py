"""Host-side helpers shared by the kernel modules: the interpreter switch, log constants, layout
and argument checks. Nothing here imports Triton, so the naive ops can use it too."""

from __future__ import annotations

import os

import torch

LOG2E = 1.4426950408889634
"""log2(e): the kernels compute softmax with ``exp2``, so scores are scaled by ``scale · LOG2E``."""
LN2 = 0.6931471805599453
"""ln(2): turns the kernels' base-2 log-sum-exp into the natural log the ops return."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes the Triton kernels take (``tl.dot`` has no fp64)."""

PARTIALS = ("fp32", "half")
"""Precisions of the selected kernels' per-(token, slot, head) O and dQ partials: "fp32" (the
default) or "half" (the inputs' fp16/bf16; the partial LSEs stay fp32). The partials are most of
the branch's memory traffic; "half" halves it at the cost of one rounding of each partial
(docs/notes/selected.md)."""


SELECTIONS = ("token", "block")
"""NSA selection granularities: "token" (exact NSA, one selection per token and KV head) or
"block" (the queries of each selection block share one selection; docs/nsa.md, the variant)."""


def check_selection(selection: str) -> None:
    """One-line error for a selection mode not in :data:`SELECTIONS`."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def check_forced_blocks(forced_blocks: tuple[int, int] | None) -> None:
    """One-line error unless ``forced_blocks`` is None or ``(init, local)``, integers >= 0."""
    if forced_blocks is not None and not (
            len(forced_blocks) == 2 and all(isinstance(n, int) and n >= 0 for n in forced_blocks)):
        raise ValueError(f"forced_blocks must be (init, local) with integers >= 0, "
                         f"got {forced_blocks!r}")


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, the CPU test suite)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (any token/head strides are fine)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def as_int32(cu: torch.Tensor) -> torch.Tensor:
    """Document boundaries as int32 (the kernels' index type), without a copy when they are."""
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def longest_document(cu: torch.Tensor, total: int, max_seqlen: int | None) -> int:
    """``max_seqlen`` when the caller knows it, else the longest document read from ``cu`` (one
    host synchronisation), or ``total`` while compiling or capturing a CUDA graph (no reads
    then)."""
    if max_seqlen is not None:
        return max(1, min(int(max_seqlen), total))
    if torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return max(1, total)
    return max(1, int((cu[1:] - cu[:-1]).max())) if cu.numel() > 1 else 1


def search_steps(n_docs: int) -> int:
    """Steps of a binary search over ``n_docs`` documents (at least one)."""
    return max(1, int(n_docs).bit_length())


def check_partials(partials: str) -> None:
    """One-line error for a selected-attention partials precision not in :data:`PARTIALS`."""
    if partials not in PARTIALS:
        raise ValueError(f"selected-attention partials must be one of {PARTIALS}, got {partials!r}")


def check_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str = "q, k, v"
) -> tuple[int, int, int, int]:
    """``(total, H, h, d)`` after the checks every attention kernel shares: 3-D tensors, k and v
    of one shape with q's head dim, G = H/h whole, d a power of two in [16, 256], one kernel dtype.
    ``k`` may have another token count than ``q`` (compressed keys)."""
    q_name, k_name, v_name = (name.strip() for name in names.split(","))
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{names} must be [tokens, heads, dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    total, H, d = q.shape
    h = k.shape[1]
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"{k_name} and {v_name} must be [tokens, h, {d}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if H % h:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({h})")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{names} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return total, H, h, d
