"""Fused block scoring and streaming top-k of NSA (step 5): ``select_blocks`` as one Triton kernel.

``select_blocks(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block, topk, init_blocks,
local_blocks, scale=None)`` returns ``idx [h, total, topk]`` int32: for every KV head and token the
document-local ids of its selected blocks, ascending, then -1 padding; the same indices as
:func:`fsa_train.kernels.ops.select_blocks.naive.select_blocks` (ties go to the lower block id).

One program owns a tile of ``BLOCK_M`` query tokens of one document and one KV head, and walks the
compressed keys of its document in tiles of ``NBT`` selection blocks (``NBT·B/s`` compressed tokens,
aligned on block boundaries):

1. ``P[t, i] = Σ_g exp(σ q_t^(g)·k̃_i - lse_g[t])`` over the G query heads of the group (visible
   ``i`` only), recomputed from q, k̃ and the compressed attention's LSE; nothing is stored.
2. Block scores of the tile's blocks, exact fp32 (no tensor-core rounding): ``P`` viewed as
   ``[tokens, NBT, B/s]`` groups; each group's weighted sum onto its own block plus the weighted sum
   of its last ``l/s - 1`` tokens onto the next block (the histogram rule of docs/nsa.md), shifted
   by one block with an fp32 product by a 0/1 matrix; the last group of a tile overlaps the next
   tile's first block, carried as a per-row ``spill``. Requires
   ``l <= B + s`` (so a compressed token touches at most two consecutive blocks' tiles) and ``B/s``
   a power of two.
3. Forced blocks get +inf, blocks after the query's own block are invalid. Each (score, id) is
   packed into one int64 key ``(bits(score) + 1) << 32 | (2^31 - 1 - id)`` (0 = invalid): for
   non-negative floats the bit pattern is monotonic, so comparing keys compares scores and then
   prefers the lower id, exactly the reference's tie rule.
4. Streaming top-``TP`` (``TP`` = next power of two >= topk): the running set is kept sorted
   descending, the tile's candidates sorted ascending; the elementwise maximum of the two is the
   top ``TP`` of their union (a bitonic sequence), sorted again: by Batcher's bitonic merge
   (default: ``log2 TP`` compare-exchange stages instead of a sort's
   ``log2 TP · (log2 TP + 1) / 2``) or, with ``KernelSettings.topk_merge = "sort"``, by a full
   ``tl.sort``.
   Only ``[h, total, topk]`` int32 is written, never a score matrix.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fsa_train.kernels import shapes
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings, resolve_settings, settings_from_token
from fsa_train.kernels.triton_utils import LOG2E_JIT, head_tile_of_program, n_visible_compressed
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import (
    LOG2E,
    as_int32,
    check_selection,
    interpreting,
    rowmajor,
    search_steps,
)
from fsa_train.kernels.varlen import block_rows

__all__ = ["select_blocks", "supports"]

_ID_MAX = 2147483647


@triton.jit
def _overlap(m, A: tl.constexpr, BS: tl.constexpr):
    """Weight of offset ``m`` in the histogram of ``a + c`` (``a < A``, ``c < BS``), 0 outside."""
    w = tl.minimum(m, A - 1) - tl.maximum(m - BS + 1, 0) + 1
    ok = (m >= 0) & (m <= A + BS - 2)
    return tl.where(ok, w, 0).to(tl.float32)


@triton.jit
def _half_clean(x, ROWS: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr):
    """One bitonic stage: inside every group of ``2·HALF``, element ``j`` against ``j + HALF``,
    the larger first. Written as a reduction over the pair axis and a select (no permute or
    join), which keeps the tensor's layout: no extra trips through shared memory."""
    pairs = tl.reshape(x, [ROWS, N // (2 * HALF), 2, HALF])
    hi = tl.max(pairs, axis=2)[:, :, None, :]
    lo = tl.min(pairs, axis=2)[:, :, None, :]
    first = tl.arange(0, 2)[None, None, :, None] == 0  # the pair's first element gets the max
    return tl.reshape(tl.where(first, hi, lo), [ROWS, N])


@triton.jit
def _bitonic_merge_desc(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Sort each row of a bitonic ``[ROWS, N]`` tensor descending (N = 2^LOG_N ≤ 32): the
    half-cleaners of Batcher's bitonic merger, unrolled."""
    if LOG_N >= 1:
        x = _half_clean(x, ROWS, N, N // 2)
    if LOG_N >= 2:
        x = _half_clean(x, ROWS, N, N // 4)
    if LOG_N >= 3:
        x = _half_clean(x, ROWS, N, N // 8)
    if LOG_N >= 4:
        x = _half_clean(x, ROWS, N, N // 16)
    if LOG_N >= 5:
        x = _half_clean(x, ROWS, N, N // 32)
    return x


@triton.jit(do_not_specialize=["n_docs", "n_iter", "G", "kernel", "stride", "block", "topk",
                               "init_blocks", "local_blocks"])
def _select_kernel(
    Q, K, LSE, IDX, CU, CUC,
    sq_t, sq_h, sk_t, sk_h, si_h, si_t,
    total, n_docs, n_iter, h, G, kernel, stride, block, topk, init_blocks, local_blocks,
    qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
    A: tl.constexpr, BS: tl.constexpr, NBT: tl.constexpr, TP: tl.constexpr,
    BITONIC: tl.constexpr, LOG_TP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_MODE: tl.constexpr,
):
    BN: tl.constexpr = NBT * BS
    ROWS: tl.constexpr = 1 if BLOCK_MODE else BLOCK_M  # selections the program makes
    kvh, doc, bos, seqlen, start_m = head_tile_of_program(CU, tl.program_id(0), h, total, n_docs,
                                                         n_iter, BLOCK_M)
    if start_m >= seqlen:
        return
    bos_c = tl.load(CUC + doc).to(tl.int64)
    bos64 = bos.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, NBT)
    rows = start_m + offs_m
    row_ok = rows < seqlen
    if BLOCK_MODE:  # the tile is one query block (BLOCK_M = block): one shared selection
        own = tl.full([ROWS], start_m // block, tl.int32)
    else:
        own = rows // block
    m_last = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    hi = n_visible_compressed(m_last, kernel, stride)  # compressed keys seen by the tile's last row
    n_tiles = (m_last // block) // NBT + 1  # block tiles up to the last row's own block

    # overlap weights of the BS compressed tokens of group j (tile-local c = BS·j + r) on block j
    # ("own") and on block j + 1 ("next"; nonzero for the last l/s - 1 tokens of the group)
    offs_r = tl.arange(0, BS)
    w_own = _overlap(offs_r + A - 1, A, BS)
    w_next = _overlap(offs_r + A - 1 - BS, A, BS)
    # shift by one block inside the tile, as an exact fp32 product (one 1.0 per column)
    shift = (offs_b[:, None] + 1 == offs_b[None, :]).to(tl.float32)  # [NBT, NBT]

    K_base = K + bos_c * sk_t + kvh * sk_h
    k_off = offs_n[:, None] * sk_t + offs_d[None, :]
    q_off = (bos64 + rows)[:, None] * sq_t + offs_d[None, :]
    lse_off = bos + rows

    best = tl.zeros([ROWS, TP], dtype=tl.int64)  # running top-TP keys, sorted descending
    spill = tl.zeros([ROWS], dtype=tl.float32)
    for tile in range(0, n_tiles):
        c0 = tile * BN
        p_sum = tl.zeros([BLOCK_M, BN], dtype=tl.float32)
        if c0 < hi:
            cols = c0 + offs_n
            col_ok = cols < hi
            k = tl.load(K_base + tl.cast(c0, tl.int64) * sk_t + k_off, mask=col_ok[:, None],
                        other=0.0)
            vis = (cols[None, :] * stride + kernel - 1 <= rows[:, None]) & col_ok[None, :]
            for g in range(G):
                head = kvh * G + g
                q = tl.load(Q + q_off + head * sq_h, mask=row_ok[:, None], other=0.0)
                lse = tl.load(LSE + head.to(tl.int64) * total + lse_off, mask=row_ok,
                              other=float("inf"))
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_JIT
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                p_sum += tl.where(vis, tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        if BLOCK_MODE:  # the block's tokens' scores summed (before the block mapping: linear)
            groups = tl.reshape(tl.sum(p_sum, 0), [ROWS, NBT, BS])
        else:
            groups = tl.reshape(p_sum, [ROWS, NBT, BS])
        part = tl.sum(groups * w_own[None, None, :], 2)  # [ROWS, NBT]
        nxt = tl.sum(groups * w_next[None, None, :], 2)  # belongs to the next block
        if BLOCK_MODE:  # one row: the shift as an exact elementwise sum (tl.dot needs 16 rows)
            scores = part + tl.sum(nxt[:, :, None] * shift[None, :, :], 1)
        else:
            scores = part + tl.dot(nxt, shift, input_precision="ieee")
        scores += tl.where(offs_b[None, :] == 0, spill[:, None], 0.0)
        spill = tl.sum(tl.where(offs_b[None, :] == NBT - 1, nxt, 0.0), 1)

        bid = tile * NBT + offs_b
        valid = bid[None, :] <= own[:, None]
        forced = (bid[None, :] < init_blocks) | (bid[None, :] > own[:, None] - local_blocks)
        forced = forced & valid
        scores = tl.where(forced, float("inf"), scores)
        hi_bits = (scores.to(tl.int32, bitcast=True) + 1).to(tl.int64)
        key = (hi_bits << 32) | (2147483647 - bid).to(tl.int64)[None, :]
        key = tl.where(valid, key, 0)
        if NBT > TP:
            cand = tl.sort(key, descending=False)
            cand = tl.max(tl.reshape(cand, [ROWS, NBT // TP, TP]), 1)  # top TP, ascending
        else:
            cand = tl.sort(key, descending=False)
        if BITONIC:
            best = _bitonic_merge_desc(tl.maximum(best, cand), ROWS, TP, LOG_TP)
        else:
            best = tl.sort(tl.maximum(best, cand), descending=True)

    pos = tl.arange(0, TP)
    keep = (pos[None, :] < topk) & (best > 0)
    ids = 2147483647 - best.to(tl.int32)  # the low 32 bits (two's-complement truncation)
    ids = tl.where(keep, ids, 2147483647)
    ids = tl.sort(ids, descending=False)
    ids = tl.where(ids == 2147483647, -1, ids)
    if BLOCK_MODE:  # row cu[doc] // B + doc + j of the per-block layout
        slot = bos // block + doc + start_m // block
        out = IDX + kvh.to(tl.int64) * si_h + slot.to(tl.int64) * si_t + pos[None, :]
        tl.store(out, ids, mask=pos[None, :] < topk)
    else:
        out = IDX + kvh.to(tl.int64) * si_h + (bos64 + rows)[:, None] * si_t + pos[None, :]
        tl.store(out, ids, mask=row_ok[:, None] & (pos[None, :] < topk))


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------

_CONFIGS = [
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=2),
]
# The fixed configuration validated on the GPU (H200, Triton 3.6) with fp32 inputs. fp16/bf16 are
# autotuned over _CONFIGS (validated on the H200 with bf16/fp16 after the tf32 mapping dot was
# removed, and about 30 % faster); FSA_TOPK_CONFIGS=safe makes them use the fixed one too (see
# docs/notes/compressed.md).
_FIXED_FP32 = {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1}
_FIXED_INTERP = {"BLOCK_M": 16}

MIN_NBT_GPU = 16
"""Fewest selection blocks per key tile on the GPU (``tl.dot`` needs 16)."""
MIN_NBT_INTERP = 4
"""The same under the interpreter: small tiles, so that tiny documents span several tiles."""
WIDE_TILE_MIN_G = 16
"""Smallest G for which ``topk_tile_blocks = 0`` means 32-block tiles on the GPU: on the H200
(2026-12-02, docs/notes/compressed.md) 32 blocks were 14 % faster at G = 16 and 15-40 % slower at
G = 1 and 4, so the default is 32 from G = 16 and the fewest below."""

_tuned = KernelTuner(
    "select_blocks.select", _select_kernel, _CONFIGS,
    ["HEAD_DIM", "A", "BS", "NBT", "TP", "DOT_PREC", "BITONIC"],
    fp32=_FIXED_FP32, interpret=_FIXED_INTERP,
)


def block_tile_config(block: int) -> dict:
    """Block mode's launch configuration: one query block per program."""
    return {"BLOCK_M": block, "num_warps": 4 if block <= 64 else 8, "num_stages": 2}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_blocks(tp: int, G: int, requested: int = 0, interpreted: bool | None = None) -> int:
    """Selection blocks per key tile for a running set of ``tp`` and G query heads per KV head:
    ``requested`` (``KernelSettings.topk_tile_blocks``, a power of two) or, for 0, the measured
    default; never fewer than ``tp`` or the minimum tile."""
    interpreted = interpreting() if interpreted is None else interpreted
    wide = 32 if requested == 0 and G >= WIDE_TILE_MIN_G and not interpreted else 0
    return max(tp, MIN_NBT_INTERP if interpreted else MIN_NBT_GPU, requested, wide)


def supported(kernel: int, stride: int, block: int) -> bool:
    """Whether the fused kernel handles these NSA parameters."""
    bs = block // stride
    return (
        kernel % stride == 0 and block % stride == 0 and bs & (bs - 1) == 0
        and kernel <= block + stride
    )


def supports(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block, *args, **kwargs) -> bool:
    """Whether the kernel takes these arguments: the NSA geometry (:func:`supported`) and a head
    dim that is a power of two >= 16. The dispatcher runs the naive op otherwise."""
    d = q.shape[-1]
    return supported(kernel, stride, block) and not d & (d - 1) and d >= 16


@torch.no_grad()
def select_blocks(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel: int, stride: int, block: int,
                  topk: int, init_blocks: int, local_blocks: int, scale: float | None = None,
                  selection: str = "token", *,
                  settings: KernelSettings | None = None) -> torch.Tensor:
    """The naive op's contract (:mod:`.naive`) as one fused kernel, for the geometries of
    :func:`supports`. ``settings``: the merge, the key-tile width and the launch configurations.
    Block mode tiles one query block per program (``BLOCK_M = block``) and sums its tokens'
    probabilities before the block mapping and the top-k."""
    if q.dim() != 3 or k_c.dim() != 3 or lse.dim() != 2:
        raise ValueError(f"q, k_c must be [tokens, heads, dim], lse [H, total]: {q.shape}")
    total, H, d = q.shape
    h = k_c.shape[1]
    if H % h or k_c.shape[2] != d or lse.shape != (H, total):
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k_c {tuple(k_c.shape)}, lse {lse.shape}")
    if topk < 1:
        raise ValueError(f"topk must be positive, got {topk}")
    if not supports(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block):
        raise ValueError(f"select_blocks' kernel does not take kernel={kernel}, stride={stride}, "
                         f"block={block}, head dim {d}; the dispatcher runs the naive op for them")
    settings = resolve_settings(settings)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    check_selection(selection)
    return _select(q, k_c, lse, cu_seqlens, cu_seqlens_c, int(kernel), int(stride), int(block),
                   int(topk), int(init_blocks), int(local_blocks), scale, selection,
                   settings.token)


def _select_fake(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block, topk,
                 init_blocks, local_blocks, scale, selection, settings):
    return shapes.select_blocks(q, k_c, lse, cu_seqlens, cu_seqlens_c, kernel, stride, block,
                                topk, init_blocks, local_blocks, scale, selection)


@kernel_op("select_blocks", _select_fake)
def _select(q: torch.Tensor, k_c: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
            cu_seqlens_c: torch.Tensor, kernel: int, stride: int, block: int, topk: int,
            init_blocks: int, local_blocks: int, scale: float, selection: str,
            settings: str) -> torch.Tensor:
    """The launch of :func:`select_blocks` on checked arguments, a custom op (``settings``: a
    :class:`KernelSettings` token)."""
    settings = settings_from_token(settings)
    total, H, d = q.shape
    h = k_c.shape[1]
    by_block = selection == "block"
    n_docs = cu_seqlens.numel() - 1
    if by_block:  # rows no block owns stay -1
        idx = torch.full((h, block_rows(total, n_docs, block), topk), -1, dtype=torch.int32,
                         device=q.device)
    else:
        idx = torch.empty((h, total, topk), dtype=torch.int32, device=q.device)
    if total == 0:
        return idx
    q, k_c = rowmajor(q), rowmajor(k_c)
    lse = lse.to(torch.float32).contiguous()
    cu, cuc = as_int32(cu_seqlens), as_int32(cu_seqlens_c)
    n_iter = search_steps(n_docs)
    tp = max(2, _next_pow2(topk))
    nbt = tile_blocks(tp, H // h, settings.topk_tile_blocks)
    fp32 = q.dtype == torch.float32
    if k_c.dtype != q.dtype:
        k_c = k_c.to(q.dtype)
    args = (
        q, k_c, lse, idx, cu, cuc,
        q.stride(0), q.stride(1), k_c.stride(0), k_c.stride(1), idx.stride(0), idx.stride(1),
        total, n_docs, n_iter, h, H // h, kernel, stride, block, topk, init_blocks,
        local_blocks, scale * LOG2E,
    )
    meta = {
        "HEAD_DIM": d,
        "DOT_PREC": "ieee" if fp32 else "tf32",
        "A": kernel // stride,
        "BS": block // stride,
        "NBT": nbt,
        "TP": tp,
        "BITONIC": settings.topk_merge == "bitonic",
        "LOG_TP": tp.bit_length() - 1,
        "BLOCK_MODE": by_block,
    }

    def grid(m):
        return (h * (total // m["BLOCK_M"] + n_docs),)

    safe = _FIXED_FP32 if settings.topk_configs == "safe" and not interpreting() else None
    if by_block:
        safe = block_tile_config(block)
    _tuned.run(grid, args, dtype=q.dtype, autotune=settings.topk_autotune, config=safe, **meta)
    return idx
