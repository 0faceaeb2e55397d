"""Rotary position embedding (half-rotation form) at arbitrary per-token positions.

Positions are explicit because packed documents restart at 0 and NSA's compressed keys sit at
``i·stride`` (docs/nsa.md step 3).
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates pairs ``(x[i], x[i + d/2])`` by ``position · base^(-2i/d)``."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("inv_freq", (base ** -exponents).float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [n, heads, d]`` at ``positions [n]``; computed in fp32, returned in x's dtype."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq.to(x.device)[None, :]
        cos = angles.cos()[:, None, :]
        sin = angles.sin()[:, None, :]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.to(x.dtype)
