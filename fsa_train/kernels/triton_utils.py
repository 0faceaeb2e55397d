"""Triton pieces shared by the kernels: a dot product at the inputs' precision, the two binary
searches over document boundaries (which document owns a tile slot, which document holds a
token), the compressed tokens a query sees, the softmax backward's delta, and the fixed-order sum
of fp32 split partials."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fsa_train.kernels.utils import LN2, LOG2E

LOG2E_JIT = tl.constexpr(LOG2E)
""":data:`~fsa_train.kernels.utils.LOG2E` for use inside ``@triton.jit`` code."""
LN2_JIT = tl.constexpr(LN2)
""":data:`~fsa_train.kernels.utils.LN2` for use inside ``@triton.jit`` code."""


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot`` in IEEE fp32 for fp32 inputs (``IEEE``), the default precision otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def locate_tile(CU, slot, n_docs, n_iter, block):
    """(document index, its start, its length, first row of the tile) of a tile slot.

    Tiles never straddle documents: document ``b`` owns the slots ``cu[b] // block + b ..``
    (strictly increasing starts), and a binary search of ``n_iter`` steps finds the largest ``b``
    whose first slot is ``<= slot``. ``block`` may be a constexpr (attention tiles) or a run-time
    value (``compress``'s tiles of ``BLOCK_U · stride`` tokens). Slots past a document's last
    tile give a first row ``>= length``: the program has nothing to do.
    """
    lo = slot * 0
    hi = lo + n_docs
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        ok = tl.load(CU + mid) // block + mid <= slot
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    bos = tl.load(CU + lo)
    seqlen = tl.load(CU + lo + 1) - bos
    start = (slot - (bos // block + lo)) * block
    return lo, bos, seqlen, start


@triton.jit
def head_tile_of_program(CU, pid, heads, total, n_docs, n_iter, block):
    """(head, document, its start, its length, first row of the tile) of program ``pid`` of a
    static grid of ``heads · (total // block + n_docs)`` programs. The heads sharing a tile are
    adjacent in the grid (their K/V tiles stay in L2), and the slots run in reverse order, so
    the last tiles of long documents, which have the most keys, start first."""
    n_slots = total // block + n_docs
    head = pid % heads
    slot = n_slots - 1 - pid // heads
    doc, bos, seqlen, start = locate_tile(CU, slot, n_docs, n_iter, block)
    return head, doc, bos, seqlen, start


@triton.jit
def count_at_most(ENDS, x, n, n_iter, mask):
    """For each ``x``: how many of the ascending ``ENDS[0..n)`` are ``<= x`` (binary search,
    ``n_iter >= bit_length(n)`` steps). With ``ENDS = cu[1:]`` that is the document of token x."""
    lo = x * 0
    hi = lo + n
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(ENDS + tl.minimum(mid, n - 1), mask=mask, other=0)
        right = active & (end <= x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def n_visible_compressed(t, kernel, stride):
    """Number of compressed tokens visible to the query at local position ``t``: those whose
    whole window ``i·stride .. i·stride + kernel - 1`` is at or before ``t``."""
    u = t - kernel + 1
    return tl.where(u >= 0, tl.maximum(u, 0) // stride + 1, 0)


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
