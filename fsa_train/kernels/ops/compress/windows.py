"""Torch helpers of ``compress`` shared by its naive op and its kernel's fp64 path: argument checks
and the windows-times-weight product."""

from __future__ import annotations

import torch


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
