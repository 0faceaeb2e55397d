"""Attention over compressed tokens on packed documents (NSA step 4): Triton forward and backward.

``compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride, scale=None)``
returns ``o [total, H, d]`` and the natural-log ``lse [H, total]`` (fp32). Query at local position
``t`` of a document sees the document's compressed token ``i`` iff ``t >= i·s + l - 1`` (the whole
window is in its past); compressed token ``i`` sits at row ``cu_seqlens_c[b] + i``. A query that
sees nothing (``t < l - 1``) gets ``o = 0`` and ``lse = -inf`` with zero gradients.

Design:

* **Varlen without host synchronisation.** As in :mod:`.window_attention`: document ``b`` owns the
  tile slots ``cu[b] // BLOCK + b ..`` of a static grid, a binary search over ``cu_seqlens`` inside
  the kernel finds a program's document; idle slots exit. The key-side kernel (dk, dv) does the
  same over ``cu_seqlens_c``. No ``.item()``, no Python loop over documents or heads.
* **Forward.** One program per (query tile, query head), heads of a group adjacent in the grid so
  the compressed K/V tiles they share stay in L2. Key tiles wholly visible to the first row run
  unmasked; the rest (the causal edge, at most two tiles) are masked. Online softmax in base 2
  with a true running max and fp32 statistics.
* **Backward.** ``delta = rowsum(o·do)``; a dq kernel per (query tile, query head) over the visible
  key tiles; a dk/dv kernel per (compressed key tile, KV head, query split) that accumulates over
  the G heads of the group and over its share of the queries that see the tile (registers, no
  atomics). A long document has few compressed key tiles, so the query range is split
  (:func:`dkdv_splits`) until the grid fills the GPU; the splits' fp32 partials are summed in a
  fixed order (deterministic).

GQA: per query head (K/V re-reads hit L2); the G-stacked alternative was not built (see
docs/notes/compressed.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fsa_train.kernels.ops.compressed_attention import cudnn, flex
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings, resolve_settings, settings_from_token
from fsa_train.kernels.triton_utils import (
    LN2_JIT,
    LOG2E_JIT,
    attention_delta,
    head_tile_of_program,
    locate_tile,
    n_visible_compressed,
    sum_splits,
)
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import (
    LOG2E,
    as_int32,
    check_attention_args,
    interpreting,
    rowmajor,
    search_steps,
)

__all__ = ["compressed_attention"]


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, lo, hi, rows, kernel, stride, qk_scale,
    offs_n, offs_d, MASK: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k_off = offs_n[:, None] * sk_t + offs_d[None, :]
    v_off = offs_n[:, None] * sv_t + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K_base + tl.cast(start_n, tl.int64) * sk_t + k_off
        v_ptrs = V_base + tl.cast(start_n, tl.int64) * sv_t + v_off
        if MASK:
            col_ok = (cols < hi)[:, None]
            k = tl.load(k_ptrs, mask=col_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASK:
            vis = (cols[None, :] * stride + kernel - 1 <= rows[:, None]) & (cols < hi)[None, :]
            qk = tl.where(vis, qk * qk_scale, float("-inf"))
        else:
            qk = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=col_ok, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["n_docs", "n_iter", "G", "kernel", "stride"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU, CUC,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    total, n_docs, n_iter, H, G, kernel, stride, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head, doc, bos, seqlen, start_m = head_tile_of_program(CU, tl.program_id(0), H, total, n_docs,
                                                          n_iter, BLOCK_M)
    if start_m >= seqlen:
        return
    bos_c = tl.load(CUC + doc).to(tl.int64)
    kvh = head // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    row_ok = rows < seqlen
    bos64 = bos.to(tl.int64)
    q = tl.load(
        Q + (bos64 + start_m) * sq_t + head * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    K_base = K + bos_c * sk_t + kvh * sk_h
    V_base = V + bos_c * sv_t + kvh * sv_h

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_last = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    hi = n_visible_compressed(m_last, kernel, stride)
    # key tiles every row of the tile sees entirely
    u_hi = (n_visible_compressed(start_m, kernel, stride) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, 0, u_hi, rows, kernel, stride, qk_scale,
        offs_n, offs_d, False, DOT_PREC, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, u_hi, hi, rows, kernel, stride, qk_scale,
        offs_n, offs_d, True, DOT_PREC, BLOCK_N,
    )
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2_JIT, float("-inf"))
    tl.store(
        O + (bos64 + start_m) * so_t + head * so_h + offs_m[:, None] * so_t + offs_d[None, :],
        o.to(O.dtype.element_ty), mask=row_ok[:, None],
    )
    tl.store(LSE + head.to(tl.int64) * total + bos + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_docs", "n_iter", "G", "kernel", "stride"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU, CUC,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
    total, n_docs, n_iter, H, G, kernel, stride, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head, doc, bos, seqlen, start_m = head_tile_of_program(CU, tl.program_id(0), H, total, n_docs,
                                                          n_iter, BLOCK_M)
    if start_m >= seqlen:
        return
    bos_c = tl.load(CUC + doc).to(tl.int64)
    kvh = head // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    row_ok = rows < seqlen
    bos64 = bos.to(tl.int64)
    row_off = (bos64 + start_m + offs_m)[:, None]
    q = tl.load(Q + row_off * sq_t + head * sq_h + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        DO + row_off * sdo_t + head * sdo_h + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    lse = tl.load(LSE + head.to(tl.int64) * total + bos + rows, mask=row_ok, other=float("inf"))
    # rows without a visible key (lse = -inf) get p = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_JIT
    delta = tl.load(DELTA + head.to(tl.int64) * total + bos + rows, mask=row_ok, other=0.0)
    K_base = K + bos_c * sk_t + kvh * sk_h
    V_base = V + bos_c * sv_t + kvh * sv_h
    k_off = offs_n[:, None] * sk_t + offs_d[None, :]
    v_off = offs_n[:, None] * sv_t + offs_d[None, :]
    m_last = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    hi = n_visible_compressed(m_last, kernel, stride)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(K_base + tl.cast(start_n, tl.int64) * sk_t + k_off, mask=col_ok[:, None],
                    other=0.0)
        v = tl.load(V_base + tl.cast(start_n, tl.int64) * sv_t + v_off, mask=col_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        vis = (cols[None, :] * stride + kernel - 1 <= rows[:, None]) & col_ok[None, :]
        p = tl.where(vis, tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + row_off * sdq_t + head * sdq_h + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_docs", "n_iter", "G", "kernel", "stride"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU, CUC,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h, s_split,
    total, total_c, n_docs, n_iter, h, G, kernel, stride, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dk, dv of one tile of BLOCK_N compressed keys of one KV head, summed over its G heads and
    over split ``program_id(1)`` of the query rows that see the tile.

    With one split the sums are the gradients; with several, each split writes its own fp32
    partial (``s_split`` apart) and the host adds them (deterministic, no atomics).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    kvh = pid % h
    slot = pid // h  # a document's first key tiles are seen by the most queries: start them first
    doc, bos_c, len_c, start_n = locate_tile(CUC, slot, n_docs, n_iter, BLOCK_N)
    if start_n >= len_c:
        return
    bos = tl.load(CU + doc)
    seqlen = tl.load(CU + doc + 1) - bos
    bos64 = bos.to(tl.int64)
    bosc64 = bos_c.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + offs_n
    col_ok = cols < len_c
    kv_rows = (bosc64 + start_n + offs_n)[:, None]
    k = tl.load(K + kv_rows * sk_t + kvh * sk_h + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_rows * sv_t + kvh * sv_h + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # first query that sees the tile's first key, and first one that sees all of its keys
    q_lo = ((start_n * stride + kernel - 1) // BLOCK_M) * BLOCK_M
    last_col = tl.minimum(start_n + BLOCK_N, len_c) - 1
    q_full = last_col * stride + kernel - 1
    q_mid = tl.minimum(((q_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, seqlen)
    q_mid = tl.maximum(q_mid, q_lo)
    # this split's share of the query tiles [q_lo, seqlen)
    tiles = tl.cdiv(tl.maximum(seqlen - q_lo, 0), BLOCK_M)
    share = tl.cdiv(tiles, n_split)
    s_lo = q_lo + split * share * BLOCK_M
    s_hi = tl.minimum(s_lo + share * BLOCK_M, seqlen)
    m_lo = tl.minimum(s_lo, q_mid)
    m_hi = tl.minimum(s_hi, q_mid)
    u_lo = tl.maximum(s_lo, q_mid)
    for g in range(G):
        head = kvh * G + g
        Q_base = Q + bos64 * sq_t + head * sq_h
        DO_base = DO + bos64 * sdo_t + head * sdo_h
        LSE_base = LSE + head.to(tl.int64) * total + bos
        DELTA_base = DELTA + head.to(tl.int64) * total + bos
        dk, dv = _dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t, m_lo, m_hi,
            seqlen, cols, col_ok, kernel, stride, qk_scale, offs_m, offs_d, True, DOT_PREC,
            BLOCK_M,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t, u_lo, s_hi,
            seqlen, cols, col_ok, kernel, stride, qk_scale, offs_m, offs_d, False, DOT_PREC,
            BLOCK_M,
        )
    dk = dk * scale
    DK += split.to(tl.int64) * s_split
    DV += split.to(tl.int64) * s_split
    tl.store(DK + kv_rows * sdk_t + kvh * sdk_h + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + kv_rows * sdv_t + kvh * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, sq_t, sdo_t, lo, hi, seqlen, cols,
    col_ok, kernel, stride, qk_scale, offs_m, offs_d,
    MASK: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    q_off = offs_m[:, None] * sq_t + offs_d[None, :]
    do_off = offs_m[:, None] * sdo_t + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen
        q = tl.load(Q_base + tl.cast(start_m, tl.int64) * sq_t + q_off, mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(DO_base + tl.cast(start_m, tl.int64) * sdo_t + do_off, mask=row_ok[:, None],
                     other=0.0)
        lse = tl.load(LSE_base + rows, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_JIT
        delta = tl.load(DELTA_base + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASK:
            vis = (cols[:, None] * stride + kernel - 1 <= rows[None, :]) & col_ok[:, None]
            pT = tl.where(vis, pT, 0.0)
        else:
            pT = tl.where(col_ok[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PREC)
    return dk, dv


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------

_KEY = ["HEAD_DIM", "DOT_PREC"]
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
]
_DKDV_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 64}, num_warps=4, num_stages=2),
    # more reuse of each loaded q/do tile (the 64K dk/dv ran at ~220 TFLOP/s with 64 keys)
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
    # the fewest spills in offline sm_90 compiles at d = 128 (<= 80 B of stack per thread with
    # Triton 3.6 and 3.9, against 0.3-1.6 KB for every config above; kernel_resources.py)
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_M": 32}, num_warps=4, num_stages=2),
]
# fp32 inputs ("ieee" dots; a test path): small tiles that fit shared memory.
_FWD_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_DQ_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_DKDV_FP32 = {"BLOCK_N": 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 1}
# interpreter (CPU tests): small tiles so that tiny documents span several tiles
_FWD_INTERP = {"BLOCK_M": 16, "BLOCK_N": 16}
_DQ_INTERP = {"BLOCK_M": 16, "BLOCK_N": 16}
_DKDV_INTERP = {"BLOCK_N": 16, "BLOCK_M": 16}

_fwd_tuned = KernelTuner("compressed_attention.fwd", _fwd_kernel, _FWD_CONFIGS, _KEY,
                         fp32=_FWD_FP32, interpret=_FWD_INTERP)
_dq_tuned = KernelTuner("compressed_attention.dq", _bwd_dq_kernel, _DQ_CONFIGS, _KEY,
                        fp32=_DQ_FP32, interpret=_DQ_INTERP)
_dkdv_tuned = KernelTuner("compressed_attention.dkdv", _bwd_dkdv_kernel, _DKDV_CONFIGS, _KEY,
                          fp32=_DKDV_FP32, interpret=_DKDV_INTERP)


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _forward(q, k_c, v_c, cu, cuc, kernel, stride, scale, settings: KernelSettings):
    total, H, d = q.shape
    h = k_c.shape[1]
    n_docs = cu.numel() - 1
    n_iter = search_steps(n_docs)
    o = torch.empty((total, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return o, lse
    prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (H * (total // meta["BLOCK_M"] + n_docs),)

    args = (
        q, k_c, v_c, o, lse, cu, cuc,
        q.stride(0), q.stride(1), k_c.stride(0), k_c.stride(1), v_c.stride(0), v_c.stride(1),
        o.stride(0), o.stride(1),
        total, n_docs, n_iter, H, H // h, kernel, stride, scale * LOG2E,
        d, prec,
    )
    _fwd_tuned.run(grid, args, dtype=q.dtype, autotune=settings.compressed_autotune)
    return o, lse


def _backward(do, q, k_c, v_c, o, lse, cu, cuc, kernel, stride, scale, settings: KernelSettings):
    total, H, d = q.shape
    total_c, h, _ = k_c.shape
    n_docs = cu.numel() - 1
    n_iter = search_steps(n_docs)
    dq = torch.empty((total, H, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_c, h, d), dtype=k_c.dtype, device=q.device)
    dv = torch.empty((total_c, h, d), dtype=v_c.dtype, device=q.device)
    if total == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = attention_delta(o, do)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    dq_args = (
        q, k_c, v_c, do, dq, lse, delta, cu, cuc,
        q.stride(0), q.stride(1), k_c.stride(0), k_c.stride(1), v_c.stride(0), v_c.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        total, n_docs, n_iter, H, H // h, kernel, stride, scale, scale * LOG2E,
        d, prec,
    )

    def grid_q(meta):
        return (H * (total // meta["BLOCK_M"] + n_docs),)

    _dq_tuned.run(grid_q, dq_args, dtype=q.dtype, autotune=settings.compressed_autotune)
    if total_c == 0:
        return dq, dk, dv
    n_split = settings.compressed_dkdv_splits or dkdv_splits(total_c, h)
    if n_split > 1:
        dk_out = torch.empty((n_split, total_c, h, d), dtype=torch.float32, device=q.device)
        dv_out = torch.empty_like(dk_out)
    else:
        dk_out, dv_out = dk[None], dv[None]
    kv_args = (
        q, k_c, v_c, do, dk_out, dv_out, lse, delta, cu, cuc,
        q.stride(0), q.stride(1), k_c.stride(0), k_c.stride(1), v_c.stride(0), v_c.stride(1),
        do.stride(0), do.stride(1), dk_out.stride(1), dk_out.stride(2), dv_out.stride(1),
        dv_out.stride(2), dk_out.stride(0),
        total, total_c, n_docs, n_iter, h, H // h, kernel, stride, scale, scale * LOG2E,
        d, prec,
    )

    def grid_kv(meta):
        return (h * (total_c // meta["BLOCK_N"] + n_docs), n_split)

    _dkdv_tuned.run(grid_kv, kv_args, dtype=q.dtype, autotune=settings.compressed_autotune)
    if n_split > 1:
        sum_splits(dk_out, dk)
        sum_splits(dv_out, dv)
    return dq, dk, dv


def dkdv_splits(total_c: int, h: int, interpreted: bool | None = None) -> int:
    """Query-range splits of the dk/dv kernel: enough programs to fill the GPU (~2048 of them,
    at most 16 splits). A long document has few compressed key tiles (64K tokens: 64 per KV head),
    each seen by up to 64K queries, so one program per key tile left most SMs idle."""
    if interpreting() if interpreted is None else interpreted:
        return 1  # the interpreter runs programs one by one: empty splits only cost time
    programs = h * max(1, total_c // 64)
    return max(1, min(16, 2048 // programs))


def _forward_fake(q, k_c, v_c, cu, cuc, kernel, stride, scale, settings):
    total, H, d = q.shape
    return q.new_empty((total, H, d)), q.new_empty((H, total), dtype=torch.float32)


@kernel_op("compressed_attention_fwd", _forward_fake)
def _forward_kernel(q: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, cu: torch.Tensor,
                    cuc: torch.Tensor, kernel: int, stride: int, scale: float,
                    settings: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_forward` as a custom op (``settings``: a :class:`KernelSettings` token)."""
    return _forward(q, k_c, v_c, cu, cuc, kernel, stride, scale, settings_from_token(settings))


def _backward_fake(do, q, k_c, v_c, o, lse, cu, cuc, kernel, stride, scale, settings):
    return torch.empty_like(q), torch.empty_like(k_c), torch.empty_like(v_c)


@kernel_op("compressed_attention_bwd", _backward_fake)
def _backward_kernel(do: torch.Tensor, q: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor,
                     o: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor, cuc: torch.Tensor,
                     kernel: int, stride: int, scale: float, settings: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward` as a custom op."""
    return _backward(do, q, k_c, v_c, o, lse, cu, cuc, kernel, stride, scale,
                     settings_from_token(settings))


class _CompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_c, v_c, cu, cuc, kernel, stride, scale, settings):
        o, lse = _forward_kernel(q, k_c, v_c, cu, cuc, kernel, stride, scale, settings.token)
        ctx.save_for_backward(q, k_c, v_c, o, lse, cu, cuc)
        ctx.params = (kernel, stride, scale, settings.token)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_c, v_c, o, lse, cu, cuc = ctx.saved_tensors
        dq, dk, dv = _backward_kernel(rowmajor(do), q, k_c, v_c, o, lse, cu, cuc, *ctx.params)
        return dq, dk, dv, None, None, None, None, None, None


def compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel: int, stride: int,
                         scale: float | None = None, max_seqlen: int | None = None, *,
                         settings: KernelSettings | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive op's contract (:mod:`.naive`) in Triton: fp16, bf16 or fp32 inputs with any
    token/head strides; the LSE is fp32. ``settings``: the kernel (``compressed_kernel``: ours,
    FlexAttention :mod:`.flex` or cuDNN :mod:`.cudnn`), autotuning and forced dk/dv splits."""
    _check(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride)
    settings = resolve_settings(settings)
    if settings.compressed_kernel == "flex":
        return flex.compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride,
                                         scale)
    if settings.compressed_kernel == "cudnn":
        return cudnn.compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride,
                                          scale, max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k_c, v_c = rowmajor(q), rowmajor(k_c), rowmajor(v_c)
    return _CompressedAttention.apply(
        q, k_c, v_c, as_int32(cu_seqlens), as_int32(cu_seqlens_c), int(kernel), int(stride), scale,
        settings,
    )


def _check(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel, stride) -> None:
    check_attention_args(q, k_c, v_c, "q, k_c, v_c")
    if cu_seqlens.shape != cu_seqlens_c.shape or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens and cu_seqlens_c must be 1-D of equal length")
    if kernel < 1 or stride < 1 or kernel % stride:
        raise ValueError(f"stride={stride} must divide kernel={kernel}")
