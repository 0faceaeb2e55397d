"""Rotary position embedding (half-rotation form) at arbitrary per-token positions.

Positions are explicit because packed documents restart at 0 and NSA's compressed keys sit at
``i·stride`` (docs/nsa.md step 3).
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates pairs ``(x[i], x[i + d/2])`` by ``position · base^(-2i/d)``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        # Plain attributes, not buffers: casting the model (bf16-true) must not round them.
        self.head_dim = head_dim
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [n, heads, d]`` at ``positions [n]``, returned in x's dtype.

        Angles are formed in fp64 (positions up to 128K keep full precision) and the rotation
        is applied in fp32 (fp64 for fp64 inputs).
        """
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float64)
        inv_freq = self.base ** (-exponents / self.head_dim)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        cos = angles.cos().to(compute)[:, None, :]
        sin = angles.sin().to(compute)[:, None, :]
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.to(x.dtype)
