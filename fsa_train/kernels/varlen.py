"""Helpers for the packed (varlen) layout: per-token document ids and local positions.

All are vectorised and free of host synchronisation, so they can run inside CUDA graphs.
"""

from __future__ import annotations

import torch


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the document each of the ``total`` packed tokens belongs to (int64, ``[total]``)."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its own document (int64, restarts at 0)."""
    ids = document_ids(cu_seqlens, total)
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    return tokens - cu_seqlens.to(torch.int64)[ids]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, where: str = "cu_seqlens") -> None:
    """Raise ``ValueError`` with one line if ``cu_seqlens`` is not a valid boundary vector.

    Performs a host synchronisation: call it in tests and at data-loading time, not in kernels.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape)
        raise ValueError(f"{where} must be 1-D with at least 2 entries, got {shape}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where} must be int32 or int64, got {cu_seqlens.dtype}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"{where} must start at 0 and end at total={total}, got {first}..{last}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"{where} must be non-decreasing")


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


def block_rows(total: int, n_docs: int, block: int) -> int:
    """Static number of rows of the per-block layout (block-shared selections): document ``d``'s
    query block ``j`` is row ``cu[d] // block + d + j``, so ``total // block + n_docs`` rows hold
    every block of any batch with these sizes (rows no block owns are padding)."""
    return total // block + n_docs


def document_first_rows(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """The row of each document's first block in the per-block layout (:func:`block_rows`),
    ``[n_docs]`` int64; strictly increasing, on ``cu_seqlens``'s device."""
    cu = cu_seqlens.to(torch.int64)
    return cu[:-1] // block + torch.arange(cu.numel() - 1, device=cu.device)


def token_block_rows(cu_seqlens: torch.Tensor, total: int, block: int) -> torch.Tensor:
    """Each packed token's row in the per-block layout (:func:`block_rows`), ``[total]`` int64."""
    ids = document_ids(cu_seqlens, total)
    positions = document_positions(cu_seqlens, total)
    return document_first_rows(cu_seqlens, block)[ids] + positions // block


def block_row_owners(cu_seqlens: torch.Tensor, block: int, n_rows: int) -> tuple[torch.Tensor, ...]:
    """For each row of the per-block layout: ``(document, block id in it, exists)``, ``[n_rows]``
    each; ``exists`` is False for padding rows (no block of the document starts there)."""
    cu = cu_seqlens.to(torch.int64)
    first = document_first_rows(cu_seqlens, block)
    rows = torch.arange(n_rows, device=cu.device)
    doc = (torch.searchsorted(first, rows, right=True) - 1).clamp_min(0)
    j = rows - first[doc]
    exists = j * block < (cu[1:] - cu[:-1])[doc]
    return doc, j, exists
