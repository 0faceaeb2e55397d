"""Rotary embedding (half-rotation form) as one fused Triton kernel per direction.

The torch formulation (:meth:`fsa_train.model.rope.Rotary._torch_forward`) forms fp64 angles,
upcasts x to fp32 and launches ~10 kernels with several full-size fp32 temporaries. Here a cached
fp32 cos/sin table (computed from fp64 angles, so the same values) is gathered at each token's
position, and one kernel reads x once and writes the rotated x once, in x's dtype. The backward is
the inverse rotation (sin negated): the same kernel with ``SIGN=-1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.utils import KERNEL_DTYPES, interpreting

__all__ = ["KERNEL_DTYPES", "RopeFunction", "rope", "rope_table"]


_TILE = 2048
"""Elements of one half-tile (tokens x heads x d/2) per program on the GPU."""
_TILE_INTERP = 256
"""The same under TRITON_INTERPRET=1: small, so that the CPU tests span several token tiles."""

_TABLES: dict[tuple[torch.device, int, float], tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(
    device: torch.device, head_dim: int, base: float, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each fp32 ``[L, head_dim/2]`` with ``L >= length`` a power of two.

    Row ``p`` holds ``cos/sin(p · base^(-2i/d))`` from fp64 angles, as the torch path computes
    them. Cached per (device, head_dim, base) and regrown to the next power of two when a longer
    one is asked for; built from Python ints only, so no host synchronisation.
    """
    device = torch.device(device)
    key = (device, head_dim, float(base))
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        rows = 1 << max(0, length - 1).bit_length()
        # Normal tensors even when first asked for under inference_mode: training reuses them.
        with torch.inference_mode(False), torch.no_grad():
            exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
            inv_freq = base ** (-exponents / head_dim)
            positions = torch.arange(rows, device=device, dtype=torch.float64)
            angles = positions[:, None] * inv_freq[None, :]
            table = (angles.cos().float(), angles.sin().float())
        _TABLES[key] = table
    return table


@triton.jit
def _rope_kernel(
    X, Y, POS, COS, SIN,
    sxt, sxh, sxd, sp, n_tokens, n_rows,
    H: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BD: tl.constexpr, SIGN: tl.constexpr,
):
    """BT tokens x all heads per program: ``y = (x1·cos - x2·sin, x1·sin + x2·cos)`` in fp32.

    Each token's cos/sin row is loaded once and broadcast over its heads (BH at a time). The
    table index is clamped to ``[0, n_rows)`` so that no position reads out of bounds.
    """
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    tv = tt < n_tokens
    t64 = tt.to(tl.int64)
    pos = tl.load(POS + t64 * sp, mask=tv, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), n_rows - 1)
    jj = tl.arange(0, BD)
    jv = jj < HALF
    j3 = jj[None, None, :]
    cs_offs = pos[:, None] * HALF + jj[None, :]
    cs_mask = tv[:, None] & jv[None, :]
    cos = tl.load(COS + cs_offs, mask=cs_mask, other=0.0)[:, None, :]
    sin = (tl.load(SIN + cs_offs, mask=cs_mask, other=0.0) * SIGN)[:, None, :]
    for h0 in tl.static_range(0, H, BH):
        hh = h0 + tl.arange(0, BH).to(tl.int64)
        mask = tv[:, None, None] & (hh < H)[None, :, None] & (j3 < HALF)
        xp = X + t64[:, None, None] * sxt + hh[None, :, None] * sxh + j3 * sxd
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
        yp = Y + t64[:, None, None] * (H * 2 * HALF) + hh[None, :, None] * (2 * HALF) + j3
        tl.store(yp, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def _rotate(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int
) -> torch.Tensor:
    """``x [n, H, d]`` (any strides) rotated by ``sign``·angle into a new contiguous tensor."""
    n, heads, dim = x.shape
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = dim // 2
    block_d = triton.next_power_of_2(half)
    tile = _TILE_INTERP if interpreting() else _TILE
    block_h = min(triton.next_power_of_2(heads), max(1, tile // block_d))
    block_t = max(1, tile // (block_h * block_d))
    _rope_kernel[(triton.cdiv(n, block_t),)](
        x, out, positions, cos, sin,
        *x.stride(), positions.stride(0), n, cos.shape[0],
        H=heads, HALF=half, BT=block_t, BH=block_h, BD=block_d, SIGN=sign, num_warps=4,
    )
    return out


def _rotation_fake(x, positions, head_dim, base, max_position, sign):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("rope", _rotation_fake)
def _rotation(x: torch.Tensor, positions: torch.Tensor, head_dim: int, base: float,
              max_position: int, sign: int) -> torch.Tensor:
    """``x`` rotated by ``sign``·angle (the cached table inside: a constant, not an input)."""
    cos, sin = rope_table(x.device, head_dim, base, max_position)
    return _rotate(x, positions, cos, sin, sign)


class RopeFunction(torch.autograd.Function):
    """Differentiable in x; the backward rotates the gradient back (orthogonal rotation)."""

    @staticmethod
    def forward(ctx, x, positions, head_dim, base, max_position):
        ctx.save_for_backward(positions)
        ctx.params = (head_dim, base, max_position)
        return _rotation(x, positions, head_dim, base, max_position, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (positions,) = ctx.saved_tensors
        return _rotation(dy, positions, *ctx.params, -1), None, None, None, None


def rope(
    x: torch.Tensor, positions: torch.Tensor, head_dim: int, base: float, max_position: int
) -> torch.Tensor:
    """Rotate ``x [n, heads, head_dim]`` at ``positions [n]``; a new contiguous tensor, x's dtype.

    Args:
        x: fp16, bf16 or fp32, any strides.
        positions: integer positions on x's device; each must lie in ``[0, max_position)``.
            The bound is not checked (that would synchronise): a position past the table is
            clamped to its last row, so it reads in bounds but rotates by the wrong angle.
        head_dim: even, equal to ``x.shape[-1]``.
        base: RoPE base.
        max_position: exclusive upper bound on the positions; sizes the cos/sin table.
    """
    if x.dim() != 3 or x.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"x must be [n, heads, {head_dim}] with an even head_dim, got {x.shape}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the RoPE kernel takes float16, bfloat16 or float32, got {x.dtype}")
    if positions.shape != x.shape[:1] or positions.is_floating_point():
        raise ValueError(f"positions must be integers of shape [{x.shape[0]}], "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if positions.device != x.device:
        raise ValueError(f"positions on {positions.device}, x on {x.device}")
    return RopeFunction.apply(x, positions, int(head_dim), float(base), int(max_position))
