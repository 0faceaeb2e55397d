"""Rotary position embedding (half-rotation form) at arbitrary per-token positions.

Positions are explicit because packed documents restart at 0 and NSA's compressed keys sit at
``i·stride`` (docs/nsa.md step 3).
"""

from __future__ import annotations

import torch
from torch import nn

from fsa_train.kernels.utils import KERNEL_DTYPES, interpreting


class Rotary(nn.Module):
    """Rotates pairs ``(x[i], x[i + d/2])`` by ``position · base^(-2i/d)``.

    CUDA tensors in fp16/bf16/fp32 go through one fused Triton kernel per direction
    (:mod:`fsa_train.kernels.ops.rope.triton`); anything else (CPU, fp64) through torch ops.
    ``interpret=True`` sends CPU tensors to the kernel too when ``TRITON_INTERPRET=1`` (the CPU
    tests of the kernel path); it has no effect otherwise.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interpret: bool = False) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        # Plain attributes, not buffers: casting the model (bf16-true) must not round them.
        self.head_dim = head_dim
        self.base = base
        self.interpret = interpret

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None = None
    ) -> torch.Tensor:
        """Rotate ``x [n, heads, d]`` at ``positions [n]``, returned in x's dtype.

        ``max_position`` is an exclusive bound on the positions (default ``n``: packed document
        positions are below the number of tokens). The kernel path relies on it without checking
        (a check would synchronise): a position at or past it may be rotated by a wrong angle.
        """
        if x.dtype in KERNEL_DTYPES and (
            x.is_cuda or (self.interpret and interpreting())
        ):
            from fsa_train.kernels.ops.rope.triton import rope  # Triton only where it is used

            bound = x.shape[0] if max_position is None else max_position
            return rope(x, positions, self.head_dim, self.base, bound)
        return self._torch_forward(x, positions)

    def _torch_forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The rotation as torch ops: angles in fp64 (positions up to 128K keep full precision),
        rotation in fp32 (fp64 for fp64 inputs)."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float64)
        inv_freq = self.base ** (-exponents / self.head_dim)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        cos = angles.cos().to(compute)[:, None, :]
        sin = angles.sin().to(compute)[:, None, :]
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.to(x.dtype)
