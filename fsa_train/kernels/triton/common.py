"""Pieces shared by the attention kernels' backward passes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    sot, soh, sod, sdt, sdh, sdd, total,
    D: tl.constexpr, BT: tl.constexpr,
):
    """delta[head, t] = sum_d o * do (fp32), BT tokens x one head per program."""
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    head = tl.program_id(1)
    tv = tt < total
    t64 = tt.to(tl.int64)
    offs_d = tl.arange(0, D)
    o = tl.load(O + t64[:, None] * sot + head * soh + offs_d[None, :] * sod, mask=tv[:, None],
                other=0.0)
    do = tl.load(DO + t64[:, None] * sdt + head * sdh + offs_d[None, :] * sdd, mask=tv[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total + tt, delta, mask=tv)


def attention_delta(o: torch.Tensor, do: torch.Tensor, block_t: int = 64) -> torch.Tensor:
    """``rowsum(o * do)`` per (head, token) in fp32, ``[H, total]``: the softmax backward's
    correction term. ``o`` and ``do`` are ``[total, H, d]`` with any strides."""
    total, heads, dim = o.shape
    delta = torch.empty((heads, total), dtype=torch.float32, device=o.device)
    if total:
        _delta_kernel[(triton.cdiv(total, block_t), heads)](
            o, do, delta, *o.stride(), *do.stride(), total, D=dim, BT=block_t, num_warps=4,
        )
    return delta
