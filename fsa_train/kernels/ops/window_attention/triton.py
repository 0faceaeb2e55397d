"""Sliding-window / dense causal attention on packed documents: a FlashAttention-2 style kernel.

``window_attention(q, k, v, cu_seqlens, window=None, scale=None)`` computes, for every query
token ``t`` of every document and every query head ``j``, softmax attention over the keys
``max(0, t - W + 1) .. t`` of the same document (all of ``0 .. t`` when ``window`` is None), with
KV head ``j // G`` (``G = H / h``). It is the project's dense attention for packed batches and the
window branch of NSA (docs/nsa.md step 7).

Design (see docs/notes/window.md for the measurements behind it):

* **Varlen without host synchronisation.** A tile grid of static size: a document starting at
  ``cu[b]`` owns the tile *slots* ``cu[b] // BLOCK + b .. cu[b+1] // BLOCK + b`` (at least
  ``ceil(len_b / BLOCK)`` of them), so ``total // BLOCK + n_docs`` slots cover every document and
  each program finds its document by a binary search over ``cu_seqlens`` inside the kernel. Idle
  slots exit at once. No ``.item()``, no Python loop over documents: CUDA-graph capturable.
* **Forward.** One program per (query tile, query head); the key tiles it visits are split into
  masked tiles (window's lower edge, the causal diagonal) and unmasked interior tiles, and tiles
  wholly outside the causal/window range are never visited (cost ``O(total * W)`` with a window).
  Online softmax in base 2 with fp32 statistics and a true running max; the natural-log LSE
  ``[H, total]`` (fp32) is saved for backward.
* **Backward.** ``delta = rowsum(o * do)`` in a small preprocess kernel, then one kernel whose
  program owns one tile of one KV head and does two things: (1) accumulates ``dk, dv`` of its key
  tile in registers over the query tiles *and over all G query heads of the group* (no atomics);
  (2) computes ``dq`` of the query tile with the same index, for each head of the group. For a
  causal document the two parts' costs sum to a constant per program (load balance). Results are
  deterministic (no atomics anywhere).
* Slots are processed last-tile-first so the longest causal tiles start early; query heads of one
  slot are adjacent in the grid so the K/V tiles they share stay in L2.

Autotuning (GPU only) is keyed on (head dim, G, window is None) plus the dtype; under
``TRITON_INTERPRET=1`` one small fixed configuration is used.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fsa_train.kernels.ops.window_attention import cudnn, fa4, flash
from fsa_train.kernels.ops.window_attention.backends import kernel_for
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings, resolve_settings, settings_from_token
from fsa_train.kernels.triton_utils import (
    LN2_JIT,
    LOG2E_JIT,
    attention_delta,
    head_tile_of_program,
    locate_tile,
)
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import (
    LOG2E,
    as_int32,
    check_attention_args,
    rowmajor,
    search_steps,
)

__all__ = ["window_attention", "window_attention_with_lse"]


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, lo, hi, rows, seqlen, window, qk_scale,
    offs_n, offs_d,
    MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k_off = offs_n[:, None] * sk_t + offs_d[None, :]
    v_off = offs_n[:, None] * sv_t + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        k_ptrs = K_base + tl.cast(start_n, tl.int64) * sk_t + k_off
        v_ptrs = V_base + tl.cast(start_n, tl.int64) * sv_t + v_off
        if MASK:
            cols = start_n + offs_n
            k = tl.load(k_ptrs, mask=(cols < seqlen)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASK:
            vis = cols[None, :] <= rows[:, None]
            if HAS_WINDOW:
                vis = vis & (cols[None, :] > rows[:, None] - window)
            qk = tl.where(vis, qk * qk_scale, float("-inf"))
        else:
            qk = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=(cols < seqlen)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["n_docs", "n_iter", "G", "window"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    total, n_docs, n_iter, H, G, window, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head, doc, bos, seqlen, start_m = head_tile_of_program(CU, tl.program_id(0), H, total, n_docs,
                                                          n_iter, BLOCK_M)
    if start_m >= seqlen:
        return
    kvh = head // G
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    row_ok = rows < seqlen
    bos64 = bos.to(tl.int64)

    q_ptrs = Q + (bos64 + start_m) * sq_t + head * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    K_base = K + bos64 * sk_t + kvh * sk_h
    V_base = V + bos64 * sv_t + kvh * sv_h

    # Finite initial max: a row whose first tiles are all masked keeps alpha = 1, p = 0 (no NaN).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    m_last = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    hi = m_last + 1
    # interior tiles: every key <= start_m (causal for the first row) ...
    u_hi = ((start_m + 1) // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        # ... and every key >= m_last - W + 1 (inside the window of the last row)
        u_lo = ((tl.maximum(m_last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        u_lo = tl.minimum(tl.maximum(u_lo, lo), u_hi)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, lo, u_lo, rows, seqlen, window,
            qk_scale, offs_n, offs_d, True, HAS_WINDOW, DOT_PREC, BLOCK_N,
        )
    else:
        u_lo = 0
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, u_lo, u_hi, rows, seqlen, window,
        qk_scale, offs_n, offs_d, False, HAS_WINDOW, DOT_PREC, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, sk_t, sv_t, u_hi, hi, rows, seqlen, window,
        qk_scale, offs_n, offs_d, True, HAS_WINDOW, DOT_PREC, BLOCK_N,
    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * LN2_JIT
    o_ptrs = O + (bos64 + start_m) * so_t + head * so_h + offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head.to(tl.int64) * total + bos + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, DQA_base, sq_t, sdo_t, sdqa_t, lo, hi,
    cols, seqlen, window, scale, qk_scale, offs_m, offs_d,
    MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M1: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    q_off = offs_m[:, None] * sq_t + offs_d[None, :]
    do_off = offs_m[:, None] * sdo_t + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M1):
        rows = start_m + offs_m
        row_ok = rows < seqlen
        q = tl.load(
            Q_base + tl.cast(start_m, tl.int64) * sq_t + q_off, mask=row_ok[:, None], other=0.0
        )
        lse2 = tl.load(LSE_base + rows, mask=row_ok, other=0.0) * LOG2E_JIT
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASK:
            vis = cols[:, None] <= rows[None, :]
            if HAS_WINDOW:
                vis = vis & (cols[:, None] > rows[None, :] - window)
            pT = tl.where(vis, pT, 0.0)
        do = tl.load(
            DO_base + tl.cast(start_m, tl.int64) * sdo_t + do_off, mask=row_ok[:, None], other=0.0
        )
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(DELTA_base + rows, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            # this key tile's share of dq, added in fp32 (order-dependent rounding)
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * scale
            tl.atomic_add(
                DQA_base + tl.cast(start_m, tl.int64) * sdqa_t + offs_m[:, None] * sdqa_t
                + offs_d[None, :],
                dq, mask=row_ok[:, None], sem="relaxed",
            )
    return dk, dv


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K_base, V_base, sk_t, sv_t, lo, hi, rows, seqlen, window, qk_scale,
    offs_n, offs_d,
    MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    k_off = offs_n[:, None] * sk_t + offs_d[None, :]
    v_off = offs_n[:, None] * sv_t + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N2):
        k_ptrs = K_base + tl.cast(start_n, tl.int64) * sk_t + k_off
        v_ptrs = V_base + tl.cast(start_n, tl.int64) * sv_t + v_off
        if MASK:
            cols = start_n + offs_n
            col_ok = (cols < seqlen)[:, None]
            k = tl.load(k_ptrs, mask=col_ok, other=0.0)
            v = tl.load(v_ptrs, mask=col_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            vis = cols[None, :] <= rows[:, None]
            if HAS_WINDOW:
                vis = vis & (cols[None, :] > rows[:, None] - window)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dkdv_tile(
    Q, K, V, DO, DK, DV, LSE, DELTA, DQA, bos, seqlen, start, kvh,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h, sdqa_t, sdqa_h,
    total, G, window, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M1: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dk, dv of the key tile [start, start + BLOCK) of KV head kvh, summed over its G heads."""
    bos64 = bos.to(tl.int64)
    start64 = start.to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m1 = tl.arange(0, BLOCK_M1)
    idx = start + offs_b
    idx_ok = idx < seqlen
    end = tl.minimum(start + BLOCK, seqlen)  # one past the tile's last real key
    kv_rows = offs_b[:, None]
    k = tl.load(
        K + (bos64 + start64) * sk_t + kvh * sk_h + kv_rows * sk_t + offs_d[None, :],
        mask=idx_ok[:, None], other=0.0,
    )
    v = tl.load(
        V + (bos64 + start64) * sv_t + kvh * sv_h + kv_rows * sv_t + offs_d[None, :],
        mask=idx_ok[:, None], other=0.0,
    )
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    if HAS_WINDOW:
        q_end = tl.minimum(seqlen, end - 1 + window)
        # query tiles wholly inside every key's window: rows <= start + W - 1
        u_end = ((start + window) // BLOCK_M1) * BLOCK_M1
    else:
        q_end = seqlen
        u_end = seqlen
    diag_end = tl.minimum(start + BLOCK, q_end)
    u_end = tl.minimum(tl.maximum(u_end, diag_end), q_end)
    for g in range(G):
        head = kvh * G + g
        Q_base = Q + bos64 * sq_t + head * sq_h
        DO_base = DO + bos64 * sdo_t + head * sdo_h
        LSE_base = LSE + head.to(tl.int64) * total + bos
        DELTA_base = DELTA + head.to(tl.int64) * total + bos
        DQA_base = DQA + bos64 * sdqa_t + head * sdqa_h
        # the diagonal: queries in the key tile's own rows (causal mask)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, DQA_base, sq_t, sdo_t, sdqa_t,
            start, diag_end, idx, seqlen, window, scale, qk_scale, offs_m1, offs_d,
            True, HAS_WINDOW, DOT_PREC, BLOCK_M1, ATOMIC_DQ,
        )
        # queries that see every key of the tile
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, DQA_base, sq_t, sdo_t, sdqa_t,
            diag_end, u_end, idx, seqlen, window, scale, qk_scale, offs_m1, offs_d,
            False, HAS_WINDOW, DOT_PREC, BLOCK_M1, ATOMIC_DQ,
        )
        if HAS_WINDOW:
            # the window's far edge
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, DQA_base, sq_t, sdo_t,
                sdqa_t, u_end, q_end, idx, seqlen, window, scale, qk_scale, offs_m1, offs_d,
                True, HAS_WINDOW, DOT_PREC, BLOCK_M1, ATOMIC_DQ,
            )
    dk = dk * scale
    tl.store(
        DK + (bos64 + start64) * sdk_t + kvh * sdk_h + kv_rows * sdk_t + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=idx_ok[:, None],
    )
    tl.store(
        DV + (bos64 + start64) * sdv_t + kvh * sdv_h + kv_rows * sdv_t + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=idx_ok[:, None],
    )


@triton.jit
def _bwd_dq_tile(
    Q, K, V, DO, DQ, LSE, DELTA, bos, seqlen, start, head0, n_heads,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
    total, G, window, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """dq of the query tile [start, start + BLOCK) for query heads head0 .. head0 + n_heads - 1."""
    bos64 = bos.to(tl.int64)
    start64 = start.to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n2 = tl.arange(0, BLOCK_N2)
    idx = start + offs_b
    idx_ok = idx < seqlen
    end = tl.minimum(start + BLOCK, seqlen)
    m_last = end - 1
    kvh = head0 // G
    K_base = K + bos64 * sk_t + kvh * sk_h
    V_base = V + bos64 * sv_t + kvh * sv_h
    u_hi = ((start + 1) // BLOCK_N2) * BLOCK_N2
    if HAS_WINDOW:
        lo = (tl.maximum(start - window + 1, 0) // BLOCK_N2) * BLOCK_N2
        u_lo = ((tl.maximum(m_last - window + 1, 0) + BLOCK_N2 - 1) // BLOCK_N2) * BLOCK_N2
        u_lo = tl.minimum(tl.maximum(u_lo, lo), u_hi)
    else:
        lo = 0
        u_lo = 0
    q_rows = offs_b[:, None]
    for g in range(n_heads):
        head = head0 + g
        q = tl.load(
            Q + (bos64 + start64) * sq_t + head * sq_h + q_rows * sq_t + offs_d[None, :],
            mask=idx_ok[:, None], other=0.0,
        )
        do = tl.load(
            DO + (bos64 + start64) * sdo_t + head * sdo_h + q_rows * sdo_t + offs_d[None, :],
            mask=idx_ok[:, None], other=0.0,
        )
        lse2 = tl.load(LSE + head.to(tl.int64) * total + bos + idx, mask=idx_ok, other=0.0)
        lse2 = lse2 * LOG2E_JIT
        delta = tl.load(DELTA + head.to(tl.int64) * total + bos + idx, mask=idx_ok, other=0.0)
        dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        if HAS_WINDOW:
            dq = _bwd_dq_inner(
                dq, q, do, lse2, delta, K_base, V_base, sk_t, sv_t, lo, u_lo, idx, seqlen,
                window, qk_scale, offs_n2, offs_d, True, HAS_WINDOW, DOT_PREC, BLOCK_N2,
            )
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K_base, V_base, sk_t, sv_t, u_lo, u_hi, idx, seqlen,
            window, qk_scale, offs_n2, offs_d, False, HAS_WINDOW, DOT_PREC, BLOCK_N2,
        )
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, K_base, V_base, sk_t, sv_t, u_hi, end, idx, seqlen,
            window, qk_scale, offs_n2, offs_d, True, HAS_WINDOW, DOT_PREC, BLOCK_N2,
        )
        dq = dq * scale
        tl.store(
            DQ + (bos64 + start64) * sdq_t + head * sdq_h + q_rows * sdq_t + offs_d[None, :],
            dq.to(DQ.dtype.element_ty), mask=idx_ok[:, None],
        )


@triton.jit(do_not_specialize=["n_docs", "n_iter", "window", "G"])
def _bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, CU,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h,
    sdq_t, sdq_h, sdk_t, sdk_h, sdv_t, sdv_h,
    total, n_docs, n_iter, h_kv, G, window, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr,
    DKDV: tl.constexpr, DQ_PART: tl.constexpr, ATOMIC_DQ: tl.constexpr = False,
):
    """Backward over tiles of BLOCK tokens.

    DKDV and DQ_PART: one program per (tile, KV head) does both parts (fused, the default).
    DKDV only: dk, dv per (tile, KV head), first tiles first. DQ_PART only: dq per (tile, query
    head), last tiles first. ATOMIC_DQ (with DKDV only): the dk/dv pass also adds dS K into DQ,
    a zeroed fp32 buffer, with atomics (no second pass, not bitwise deterministic).
    """
    pid = tl.program_id(0)
    n_slots = total // BLOCK + n_docs
    if DKDV:
        n_prog_heads = h_kv
    else:
        n_prog_heads = h_kv * G
    ph = pid % n_prog_heads
    if DKDV and not DQ_PART:
        slot = pid // n_prog_heads
    else:
        slot = n_slots - 1 - pid // n_prog_heads
    doc, bos, seqlen, start = locate_tile(CU, slot, n_docs, n_iter, BLOCK)
    if start >= seqlen:
        return
    if DKDV:
        _bwd_dkdv_tile(
            Q, K, V, DO, DK, DV, LSE, DELTA, DQ, bos, seqlen, start, ph,
            sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
            sdq_t, sdq_h, total, G, window, scale, qk_scale,
            HEAD_DIM, HAS_WINDOW, DOT_PREC, BLOCK, BLOCK_M1, ATOMIC_DQ,
        )
    if DQ_PART:
        if DKDV:
            head0 = ph * G
            n_heads = G
        else:
            head0 = ph
            n_heads = 1
        _bwd_dq_tile(
            Q, K, V, DO, DQ, LSE, DELTA, bos, seqlen, start, head0, n_heads,
            sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
            total, G, window, scale, qk_scale,
            HEAD_DIM, HAS_WINDOW, DOT_PREC, BLOCK, BLOCK_N2,
        )


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------

_KEY = ["HEAD_DIM", "G", "HAS_WINDOW"]

# Hopper-oriented: 128-row tiles, 8 warps, 2-3 stages. Register use (ptxas, sm_90, d = 128):
# forward 176-255 registers without spills; the backward keeps dk and dv (2 x 64 registers per
# thread) plus k, v in shared memory and spills a little at BLOCK_M1 = 64 (docs/notes/window.md).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_M1": 64, "BLOCK_N2": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 128, "BLOCK_M1": 32, "BLOCK_N2": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 128, "BLOCK_M1": 32, "BLOCK_N2": 32}, num_warps=8, num_stages=3),
    # the fewest spills of the fused backward in offline sm_90 compiles (40-72 B with Triton 3.6
    # and 3.9, against 112-650 B for the three above; benchmarks/kernel_resources.py)
    triton.Config({"BLOCK": 128, "BLOCK_M1": 16, "BLOCK_N2": 32}, num_warps=8, num_stages=3),
]
_DKDV_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_M1": 64, "BLOCK_N2": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 128, "BLOCK_M1": 32, "BLOCK_N2": 16}, num_warps=8, num_stages=2),
]
_ATOMIC_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_M1": 64, "BLOCK_N2": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 128, "BLOCK_M1": 32, "BLOCK_N2": 16}, num_warps=8, num_stages=2),
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_M1": 16, "BLOCK_N2": 64}, num_warps=8, num_stages=2),
]
# fp32 inputs (exact "ieee" dots; not a performance path): small tiles that fit shared memory.
_FWD_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_BWD_FP32 = {"BLOCK": 64, "BLOCK_M1": 32, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 1}
# under TRITON_INTERPRET=1 (CPU tests): small tiles so that tiny documents span several tiles.
_FWD_INTERP = {"BLOCK_M": 32, "BLOCK_N": 16}
_BWD_INTERP = {"BLOCK": 32, "BLOCK_M1": 16, "BLOCK_N2": 16}

_fwd_tuned = KernelTuner("window_attention.fwd", _fwd_kernel, _FWD_CONFIGS, _KEY,
                         fp32=_FWD_FP32, interpret=_FWD_INTERP)
_bwd_tuned = KernelTuner("window_attention.bwd", _bwd_kernel, _BWD_CONFIGS, _KEY,
                         fp32=_BWD_FP32, interpret=_BWD_INTERP)
_dkdv_tuned = KernelTuner("window_attention.bwd_dkdv", _bwd_kernel, _DKDV_CONFIGS, _KEY,
                          fp32=_BWD_FP32, interpret=_BWD_INTERP)
_dq_tuned = KernelTuner("window_attention.bwd_dq", _bwd_kernel, _DQ_CONFIGS, _KEY,
                        fp32=_BWD_FP32, interpret=_BWD_INTERP)
# The atomic mode adds into DQ: each configuration the autotuner times must start from zeros.
_atomic_tuned = KernelTuner("window_attention.bwd_atomic", _bwd_kernel, _ATOMIC_CONFIGS, _KEY,
                            fp32=_BWD_FP32, interpret=_BWD_INTERP, reset_to_zero=["DQ"])


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _check(q, k, v, cu_seqlens, window):
    total, _, _, d = check_attention_args(q, k, v)
    if k.shape[0] != total:
        raise ValueError(
            f"k and v must be [{total}, h, {d}], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {cu_seqlens.shape}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")


def _meta(q, k, cu_seqlens, window):
    total, H, d = q.shape
    n_docs = cu_seqlens.numel() - 1
    n_iter = search_steps(n_docs)
    # a window at least as long as the batch can never cut a key: run the dense kernel
    has_window = window is not None and window < total
    win = int(window) if has_window else total + 1
    return total, H, k.shape[1], d, n_docs, n_iter, has_window, win


def _forward(q, k, v, cu, window, scale, settings: KernelSettings):
    total, H, h, d, n_docs, n_iter, has_window, win = _meta(q, k, cu, window)
    o = torch.empty((total, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return o, lse
    prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (H * (total // meta["BLOCK_M"] + n_docs),)

    args = (
        q, k, v, o, lse, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        total, n_docs, n_iter, H, H // h, win, scale * LOG2E,
        d, has_window, prec,
    )
    _fwd_tuned.run(grid, args, dtype=q.dtype, autotune=settings.window_autotune)
    return o, lse


def _backward(do, q, k, v, o, lse, cu, window, scale, settings: KernelSettings):
    total, H, h, d, n_docs, n_iter, has_window, win = _meta(q, k, cu, window)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty((total, h, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((total, h, d), dtype=v.dtype, device=v.device)
    if total == 0:
        return dq, dk, dv
    delta = attention_delta(o, do)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (
        q, k, v, do, dq, dk, dv, lse, delta, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, n_docs, n_iter, h, H // h, win, scale, scale * LOG2E,
        d, has_window, prec,
    )

    def grid_kv(meta):
        return (h * (total // meta["BLOCK"] + n_docs),)

    def grid_q(meta):
        return (H * (total // meta["BLOCK"] + n_docs),)

    run = {"dtype": q.dtype, "autotune": settings.window_autotune}
    if settings.window_bwd == "atomic":
        dqa = torch.zeros((total, H, d), dtype=torch.float32, device=q.device)
        args = list(args)
        args[4] = dqa
        args[18:20] = [dqa.stride(0), dqa.stride(1)]
        _atomic_tuned.run(grid_kv, args, **run, DKDV=True, DQ_PART=False, ATOMIC_DQ=True)
        dq = dqa.to(q.dtype)
    elif settings.window_bwd == "split":
        _dkdv_tuned.run(grid_kv, args, **run, DKDV=True, DQ_PART=False)
        _dq_tuned.run(grid_q, args, **run, DKDV=False, DQ_PART=True)
    else:
        _bwd_tuned.run(grid_kv, args, **run, DKDV=True, DQ_PART=True)
    return dq, dk, dv


def _forward_fake(q, k, v, cu, window, scale, settings):
    total, H, d = q.shape
    return q.new_empty((total, H, d)), q.new_empty((H, total), dtype=torch.float32)


@kernel_op("window_attention_fwd", _forward_fake)
def _forward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                    window: int | None, scale: float,
                    settings: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_forward` as a custom op (``settings``: a :class:`KernelSettings` token)."""
    return _forward(q, k, v, cu, window, scale, settings_from_token(settings))


def _backward_fake(do, q, k, v, o, lse, cu, window, scale, settings):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty_like(k),
            torch.empty_like(v))


@kernel_op("window_attention_bwd", _backward_fake)
def _backward_kernel(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     o: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor, window: int | None,
                     scale: float, settings: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward` as a custom op."""
    return _backward(do, q, k, v, o, lse, cu, window, scale, settings_from_token(settings))


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, window, scale, settings):
        o, lse = _forward_kernel(q, k, v, cu, window, scale, settings.token)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.window, ctx.scale, ctx.settings = window, scale, settings.token
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = _backward_kernel(rowmajor(do), q, k, v, o, lse, cu, ctx.window, ctx.scale,
                                      ctx.settings)
        return dq, dk, dv, None, None, None, None


def window_attention_with_lse(q, k, v, cu_seqlens, window: int | None = None,
                              scale: float | None = None, *,
                              settings: KernelSettings | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_attention` that also returns the natural-log LSE ``[H, total]`` (fp32).

    The LSE carries no gradient.
    """
    _check(q, k, v, cu_seqlens, window)
    return _ours(q, k, v, cu_seqlens, window, scale, resolve_settings(settings))


def _ours(q, k, v, cu_seqlens, window, scale, settings: KernelSettings):
    """Our kernel on checked inputs: ``(o, lse)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    return _WindowAttention.apply(q, k, v, as_int32(cu_seqlens), window, scale, settings)


def window_attention(q, k, v, cu_seqlens, window: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None, *,
                     settings: KernelSettings | None = None) -> torch.Tensor:
    """The naive op's contract (:mod:`.naive`) on the GPU: fp16, bf16 or fp32 inputs with any
    token/head strides, int32 or int64 ``cu_seqlens``. ``settings``: which kernel
    (:func:`~.backends.kernel_for`: ours, cuDNN, FlashAttention-2 or -4), autotuning and our
    backward schedule; ``max_seqlen`` sizes the libraries' grids (ours needs no bound)."""
    _check(q, k, v, cu_seqlens, window)
    settings = resolve_settings(settings)
    kernel = kernel_for(settings, q, k, window)
    if kernel == "cudnn":
        return cudnn.window_attention(q, k, v, cu_seqlens, window, scale, max_seqlen)
    if kernel == "flash":
        return flash.window_attention(q, k, v, cu_seqlens, window, scale, max_seqlen)
    if kernel == "fa4":
        return fa4.window_attention(q, k, v, cu_seqlens, window, scale, max_seqlen)
    return _ours(q, k, v, cu_seqlens, window, scale, settings)[0]
