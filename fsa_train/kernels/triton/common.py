"""Pieces shared by the Triton ops: the softmax backward's delta, the fixed-order sum of fp32
split partials, and the launch that picks a configuration by dtype."""

from __future__ import annotations

import os

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


@triton.jit
def _sum_splits_kernel(PART, OUT, numel, n_split, BLOCK: tl.constexpr):
    """``out = Σ_s part[s]`` in fp32, in split order, stored in out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_split):
        acc += tl.load(PART + s * numel + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = part.sum(0)`` for contiguous fp32 split partials ``part [n_split, *out.shape]``
    and a contiguous ``out`` of any float dtype: one launch, deterministic (splits in order)."""
    numel = out.numel()
    block = 1024
    _sum_splits_kernel[(triton.cdiv(numel, block),)](part, out, numel, part.shape[0], BLOCK=block)


def launch(kernel, tuned, fixed_fp32: dict, fixed_interp: dict, grid, args, dtype) -> None:
    """Launch ``kernel`` with the interpreter's fixed configuration, the fp32 ("ieee" dots) one, or
    through its autotuner ``tuned`` for fp16/bf16."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        kernel[grid](*args, **fixed_interp)
    elif dtype == torch.float32:
        kernel[grid](*args, **fixed_fp32)
    else:
        tuned[grid](*args)
