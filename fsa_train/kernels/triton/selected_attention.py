"""Selected-block attention (NSA's selected branch) as Triton kernels, forward and backward.

``selected_attention(q, k, v, idx, cu_seqlens, block, scale=None)`` computes, for query head ``j``
(KV head ``j // G``) at document-local position ``t``, softmax attention over the keys of the
blocks ``idx[j // G, t, :]`` (local block ids, -1 padded) with key position ``<= t``; see
``docs/nsa.md`` step 6 and :func:`fsa_train.kernels.reference.selected_attention`.

Design (FSA's block-major order, with the G query heads of a token stacked as matmul rows):

* **Plan** (:func:`_plan`, on the device, static sizes, no host synchronisation): one kernel
  cleans the selections and gives every (KV head, token, slot) whose block is valid the key
  ``head · NB + global block``; a stable sort of the keys (torch) gives the block → queries
  inverse index (CSR, queries ascending in each block), ``searchsorted`` gives the offsets. The
  queries of a block are cut into *segments* of at most ``segq`` queries, so a block that every
  query selects becomes many programs (balanced grid) and never more memory. The grid is sized
  by a static bound on the number of segments; programs past the real count exit at once.
* **Forward, block-major** (:func:`_fwd_block_kernel`): one program per segment loads its K/V block
  once and walks the segment in chunks of ``BLOCK_M // G`` queries, the G heads of each query
  stacked as rows (``M = BLOCK_M`` rows for any G). Each (query, slot, head) gets an fp32 partial
  output (``partials="half"``: in the inputs' dtype) and a natural-log LSE (true row
  maximum), merged per token by :func:`_merge_kernel`.
* **Forward, query-major** (:func:`_fwd_query_kernel`): one program per (token, KV head), rows =
  the G heads, online softmax over the token's blocks. No partials: the choice for large G.
* **Backward**: dK/dV always block-major (:func:`_bwd_block_kernel`, fp32 accumulators in
  registers, one fp32 partial per segment, summed in a fixed order by :func:`_reduce_dkdv_kernel`:
  deterministic, no atomics). dQ either from the same kernel as fp32 per-(query, slot) partials
  reduced by :func:`_reduce_dq_kernel`, or query-major (:func:`_dq_query_kernel`), picked per shape.

Extra memory: the plan O(h · total · T) ints; dK/dV segment partials O(h · total · d); fp32
partials of O and dQ (block-major paths only) O(total · H · T · d). Nothing depends on how the
selections are distributed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fsa_train.kernels.triton.common import attention_delta

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_block_kernel(
    Q, K, V, OP, LP,
    PAIRS, BLK_START, SEG_KEY, SEG_OFF, TOK0, TOK1,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd,
    scale_log2, nbmax, nkeys, segq,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    key = tl.load(SEG_KEY + pid)
    if key >= nkeys:
        return
    hh = key // nbmax
    gb = key % nbmax
    seg = pid - tl.load(SEG_OFF + key)
    p0 = tl.load(BLK_START + key) + seg * segq
    p1 = tl.minimum(p0 + segq, tl.load(BLK_START + key + 1))
    tok0 = tl.load(TOK0 + gb)
    tok1 = tl.load(TOK1 + gb)

    offs_n = tok0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = (offs_n < tok1)[:, None]
    k = tl.load(K + offs_n[:, None] * skt + hh * skh + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + offs_n[:, None] * svt + hh * svh + offs_d[None, :] * svd, mask=kmask, other=0.0)
    kt = tl.trans(k)

    C = BLOCK_M // G
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    head = hh * G + r % G
    if PREFETCH:  # the next chunk's gathers are issued before this chunk's math
        rv_n = (qi < C) & (p0 + qi < p1)
        pair_n = tl.load(PAIRS + p0 + qi, mask=rv_n, other=0)
        q_n = tl.load(
            Q + (pair_n // T)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
            mask=rv_n[:, None], other=0.0,
        )
    for c in range(p0, p1, C):
        if PREFETCH:
            rv = rv_n
            pair = pair_n
            q = q_n
            rv_n = (qi < C) & (c + C + qi < p1)
            pair_n = tl.load(PAIRS + c + C + qi, mask=rv_n, other=0)
            q_n = tl.load(
                Q + (pair_n // T)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                mask=rv_n[:, None], other=0.0,
            )
        else:
            rv = (qi < C) & (c + qi < p1)
            pair = tl.load(PAIRS + c + qi, mask=rv, other=0)
            q = tl.load(
                Q + (pair // T)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                mask=rv[:, None], other=0.0,
            )
        t = pair // T
        s = _dot(q, kt, IEEE) * scale_log2
        vis = (offs_n[None, :] <= t[:, None]) & rv[:, None]
        s = tl.where(vis, s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        lsum = tl.sum(p, 1)
        seen = lsum > 0
        o = _dot(p.to(v.dtype), v, IEEE) / tl.where(seen, lsum, 1.0)[:, None]
        lse = tl.where(seen, (m + tl.log2(lsum)) * 0.6931471805599453, float("-inf"))
        row = pair.to(tl.int64) * H + head
        tl.store(OP + row[:, None] * D + offs_d[None, :], o.to(OP.dtype.element_ty),
                 mask=rv[:, None])
        tl.store(LP + row, lse, mask=rv)


@triton.jit
def _merge_kernel(
    OP, LP, IDX, O, LSE,
    sot, soh, sod, total,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
):
    """o, lse of BR // G tokens x one KV head's G heads (rows) from the per-slot fp32 partials."""
    TB = BR // G
    r = tl.arange(0, BR)
    tt = tl.program_id(0) * TB + r // G
    hh = tl.program_id(1)
    head = hh * G + r % G
    rv = (r < TB * G) & (tt < total)
    offs_d = tl.arange(0, D)
    ibase = (hh * total + tt).to(tl.int64) * T
    m = tl.full([BR], float("-inf"), tl.float32)
    wsum = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, D], tl.float32)
    for j in range(T):
        valid = rv & (tl.load(IDX + ibase + j, mask=rv, other=-1) >= 0)
        row = (tt.to(tl.int64) * T + j) * H + head
        lse_j = tl.load(LP + row, mask=valid, other=float("-inf"))
        m_new = tl.maximum(m, lse_j)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_j - m_safe)
        o_j = tl.load(OP + row[:, None] * D + offs_d[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + w[:, None] * o_j
        wsum = wsum * alpha + w
        m = m_new
    seen = wsum > 0
    o = acc / tl.where(seen, wsum, 1.0)[:, None]
    tl.store(O + tt[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=rv[:, None])
    lse = tl.where(seen, m + tl.log(tl.where(seen, wsum, 1.0)), float("-inf"))
    tl.store(LSE + head * total + tt, lse, mask=rv)


@triton.jit
def _fwd_query_kernel(
    Q, K, V, IDX, START, O, LSE,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sot, soh, sod,
    total, scale_log2,
    T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    t = tl.program_id(0)
    hh = tl.program_id(1)
    g = tl.arange(0, GP)
    gv = g < G
    head = hh * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + t * sqt + head[:, None] * sqh + offs_d[None, :] * sqd, mask=gv[:, None],
                other=0.0)
    s0 = tl.load(START + t)
    m = tl.full([GP], float("-inf"), tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    idx_base = (hh * total + t).to(tl.int64) * T
    for j in range(T):
        b = tl.load(IDX + idx_base + j)
        if b >= 0:
            offs_n = s0 + b * BLOCK_N + tl.arange(0, BLOCK_N)
            kvis = offs_n <= t
            k = tl.load(K + offs_n[:, None] * skt + hh * skh + offs_d[None, :] * skd,
                        mask=kvis[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svt + hh * svh + offs_d[None, :] * svd,
                        mask=kvis[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            s = tl.where(kvis[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m = m_new
    seen = lsum > 0
    o = acc / tl.where(seen, lsum, 1.0)[:, None]
    tl.store(O + t * sot + head[:, None] * soh + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=gv[:, None])
    lse = tl.where(seen, (m + tl.log2(lsum)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + head * total + t, lse, mask=gv)


@triton.jit
def _bwd_block_kernel(
    Q, K, V, DO, LSE, DELTA, DKP, DVP, DQP,
    PAIRS, BLK_START, SEG_KEY, SEG_OFF, TOK0, TOK1,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd,
    total, scale, scale_log2, nbmax, nkeys, segq,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_DQ: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    key = tl.load(SEG_KEY + pid)
    if key >= nkeys:
        return
    hh = key // nbmax
    gb = key % nbmax
    seg = pid - tl.load(SEG_OFF + key)
    p0 = tl.load(BLK_START + key) + seg * segq
    p1 = tl.minimum(p0 + segq, tl.load(BLK_START + key + 1))
    tok0 = tl.load(TOK0 + gb)
    tok1 = tl.load(TOK1 + gb)

    offs_n = tok0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = (offs_n < tok1)[:, None]
    k = tl.load(K + offs_n[:, None] * skt + hh * skh + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + offs_n[:, None] * svt + hh * svh + offs_d[None, :] * svd, mask=kmask, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    C = BLOCK_M // G
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    head = hh * G + r % G
    if PREFETCH:  # the next chunk's gathers are issued before this chunk's math
        rv_n = (qi < C) & (p0 + qi < p1)
        pair_n = tl.load(PAIRS + p0 + qi, mask=rv_n, other=0)
        t_n = pair_n // T
        q_n = tl.load(Q + t_n[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                      mask=rv_n[:, None], other=0.0)
        do_n = tl.load(DO + t_n[:, None] * sdt + head[:, None] * sdh + offs_d[None, :] * sdd,
                       mask=rv_n[:, None], other=0.0)
        lse_n = tl.load(LSE + head * total + t_n, mask=rv_n, other=0.0)
        delta_n = tl.load(DELTA + head * total + t_n, mask=rv_n, other=0.0)
    for c in range(p0, p1, C):
        if PREFETCH:
            rv = rv_n
            pair = pair_n
            t = t_n
            q = q_n
            do = do_n
            lse2 = lse_n * 1.4426950408889634
            delta = delta_n
            rv_n = (qi < C) & (c + C + qi < p1)
            pair_n = tl.load(PAIRS + c + C + qi, mask=rv_n, other=0)
            t_n = pair_n // T
            q_n = tl.load(Q + t_n[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                          mask=rv_n[:, None], other=0.0)
            do_n = tl.load(DO + t_n[:, None] * sdt + head[:, None] * sdh + offs_d[None, :] * sdd,
                           mask=rv_n[:, None], other=0.0)
            lse_n = tl.load(LSE + head * total + t_n, mask=rv_n, other=0.0)
            delta_n = tl.load(DELTA + head * total + t_n, mask=rv_n, other=0.0)
        else:
            rv = (qi < C) & (c + qi < p1)
            pair = tl.load(PAIRS + c + qi, mask=rv, other=0)
            t = pair // T
            q = tl.load(Q + t[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd,
                        mask=rv[:, None], other=0.0)
            do = tl.load(DO + t[:, None] * sdt + head[:, None] * sdh + offs_d[None, :] * sdd,
                         mask=rv[:, None], other=0.0)
            lse2 = tl.load(LSE + head * total + t, mask=rv, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + head * total + t, mask=rv, other=0.0)
        s = _dot(q, kt, IEEE) * scale_log2
        vis = (offs_n[None, :] <= t[:, None]) & rv[:, None]
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dsl = ds.to(q.dtype)
        dk += _dot(tl.trans(dsl), q, IEEE)
        if WRITE_DQ:
            dq = _dot(dsl, k, IEEE) * scale
            row = pair.to(tl.int64) * H + head
            tl.store(DQP + row[:, None] * D + offs_d[None, :], dq.to(DQP.dtype.element_ty),
                     mask=rv[:, None])
    out = pid.to(tl.int64) * (BLOCK_N * D) + tl.arange(0, BLOCK_N)[:, None] * D + offs_d[None, :]
    tl.store(DKP + out, dk * scale)
    tl.store(DVP + out, dv)


@triton.jit
def _reduce_dkdv_kernel(
    DKP, DVP, DK, DV, SEG_OFF, TOK0, TOK1,
    sdkt, sdkh, sdvt, sdvh, nbmax,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    key = tl.program_id(0)
    hh = key // nbmax
    gb = key % nbmax
    tok0 = tl.load(TOK0 + gb)
    tok1 = tl.load(TOK1 + gb)
    if tok1 <= tok0:
        return
    s0 = tl.load(SEG_OFF + key)
    s1 = tl.load(SEG_OFF + key + 1)
    n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    tile = n[:, None] * D + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    pk = DKP + s0.to(tl.int64) * (BLOCK_N * D) + tile
    pv = DVP + s0.to(tl.int64) * (BLOCK_N * D) + tile
    for _ in range(s0, s1):
        dk += tl.load(pk)
        dv += tl.load(pv)
        pk += BLOCK_N * D
        pv += BLOCK_N * D
    offs_n = tok0 + n
    mask = (offs_n < tok1)[:, None]
    tl.store(DK + offs_n[:, None] * sdkt + hh * sdkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=mask)
    tl.store(DV + offs_n[:, None] * sdvt + hh * sdvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mask)


@triton.jit
def _reduce_dq_kernel(
    DQP, IDX, DQ, sdqt, sdqh, total,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
):
    """dq of BR // G tokens x one KV head's G heads: the sum of the valid slots' fp32 partials."""
    TB = BR // G
    r = tl.arange(0, BR)
    tt = tl.program_id(0) * TB + r // G
    hh = tl.program_id(1)
    head = hh * G + r % G
    rv = (r < TB * G) & (tt < total)
    offs_d = tl.arange(0, D)
    ibase = (hh * total + tt).to(tl.int64) * T
    acc = tl.zeros([BR, D], tl.float32)
    for j in range(T):
        valid = rv & (tl.load(IDX + ibase + j, mask=rv, other=-1) >= 0)
        row = (tt.to(tl.int64) * T + j) * H + head
        acc += tl.load(DQP + row[:, None] * D + offs_d[None, :], mask=valid[:, None],
                       other=0.0).to(tl.float32)
    tl.store(DQ + tt[:, None] * sdqt + head[:, None] * sdqh + offs_d[None, :],
             acc.to(DQ.dtype.element_ty), mask=rv[:, None])


@triton.jit
def _dq_query_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, START, DQ,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, sdqt, sdqh,
    total, scale, scale_log2,
    T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    t = tl.program_id(0)
    hh = tl.program_id(1)
    g = tl.arange(0, GP)
    gv = g < G
    head = hh * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + t * sqt + head[:, None] * sqh + offs_d[None, :] * sqd, mask=gv[:, None],
                other=0.0)
    do = tl.load(DO + t * sdt + head[:, None] * sdh + offs_d[None, :] * sdd, mask=gv[:, None],
                 other=0.0)
    lse2 = tl.load(LSE + head * total + t, mask=gv, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * total + t, mask=gv, other=0.0)
    s0 = tl.load(START + t)
    dq = tl.zeros([GP, D], tl.float32)
    idx_base = (hh * total + t).to(tl.int64) * T
    for j in range(T):
        b = tl.load(IDX + idx_base + j)
        if b >= 0:
            offs_n = s0 + b * BLOCK_N + tl.arange(0, BLOCK_N)
            kvis = offs_n <= t
            k = tl.load(K + offs_n[:, None] * skt + hh * skh + offs_d[None, :] * skd,
                        mask=kvis[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svt + hh * svh + offs_d[None, :] * svd,
                        mask=kvis[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            p = tl.where(kvis[None, :] & gv[:, None], tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + t * sdqt + head[:, None] * sdqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=gv[:, None])


# --------------------------------------------------------------------------------------------
# plan: block -> queries inverse index, built on the device with static sizes
# --------------------------------------------------------------------------------------------


@triton.jit
def _count_at_most(ENDS, x, n, n_iter, mask):
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
def _plan_keys_kernel(
    IDX, CU, BOFF, IDXC, KEYS, START,
    s_ih, s_it, s_ik, total, n_docs, n_iter, block, nbmax, nkeys,
    T: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr,
):
    """Clean BT tokens' selections of one KV head and write their sort keys.

    An entry is valid if it is >= 0, not past the token's own block and not a repeat of the
    previous slot (valid ids are sorted, so repeats are adjacent); ``idx_c`` holds the valid ids
    (-1 otherwise), ``keys`` ``head·nbmax + global block`` (``nkeys`` = invalid, sorts last).
    Head 0 also writes each token's document start.
    """
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    head = tl.program_id(1)
    tv = tt < total
    doc = tl.minimum(_count_at_most(CU + 1, tt, n_docs, n_iter, tv), n_docs - 1)
    start = tl.load(CU + doc, mask=tv, other=0)
    own = (tt - start) // block
    slots = tl.arange(0, TP)
    sv = slots < T
    m = tv[:, None] & sv[None, :]
    t64 = tt.to(tl.int64)
    base = IDX + head.to(tl.int64) * s_ih + t64[:, None] * s_it
    ids = tl.load(base + slots[None, :] * s_ik, mask=m, other=-1).to(tl.int32)
    prev = tl.load(base + (slots[None, :] - 1) * s_ik, mask=m & (slots[None, :] > 0),
                   other=-2).to(tl.int32)
    valid = (ids >= 0) & (ids <= own[:, None]) & (ids != prev)
    flat = (head.to(tl.int64) * total + t64)[:, None] * T + slots[None, :]
    tl.store(IDXC + flat, tl.where(valid, ids, -1), mask=m)
    boff = tl.load(BOFF + doc, mask=tv, other=0)
    key = head * nbmax + boff[:, None] + ids
    tl.store(KEYS + flat, tl.where(valid, key, nkeys), mask=m)
    if head == 0:
        tl.store(START + tt, start, mask=tv)


@triton.jit
def _plan_blocks_kernel(
    CU, BOFF, TOK0, TOK1, n_docs, n_iter, block, nbmax, BR: tl.constexpr,
):
    """Token range ``[tok0, tok1)`` of each global block row (0, 0 past the last block)."""
    gb = tl.program_id(0) * BR + tl.arange(0, BR)
    gv = gb < nbmax
    doc = tl.minimum(_count_at_most(BOFF + 1, gb, n_docs, n_iter, gv), n_docs - 1)
    doc_start = tl.load(CU + doc, mask=gv, other=0)
    doc_end = tl.load(CU + doc + 1, mask=gv, other=0)
    tok0 = doc_start + (gb - tl.load(BOFF + doc, mask=gv, other=0)) * block
    tok1 = tl.minimum(tok0 + block, doc_end)
    exists = gb < tl.load(BOFF + n_docs)
    tl.store(TOK0 + gb, tl.where(exists, tok0, 0), mask=gv)
    tl.store(TOK1 + gb, tl.where(exists, tok1, 0), mask=gv)


def _segment_queries(topk: int, block: int) -> int:
    """Queries per segment: the average number of queries per block (T·B) in a long document."""
    return max(16, topk * block)


def _plan(idx: torch.Tensor, cu_seqlens: torch.Tensor, total: int, block: int, segq: int) -> dict:
    """Cleaned selections and the block -> (token, slot) CSR index; no host synchronisation.

    Returns a dict of device tensors plus the static ints ``nbmax``, ``nkeys``, ``maxseg``.
    ``idx`` entries that are -1, past the query's own block, or repeats of the previous entry
    (valid entries are sorted, so repeats are adjacent) become -1 in ``idx_c``.
    """
    h, _, topk = idx.shape
    dev = idx.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int32)
    n_docs = cu.numel() - 1
    nbmax = total // block + n_docs + 1
    nkeys = h * nbmax
    i32 = torch.int32

    nblk = torch.div(cu[1:] - cu[:-1] + (block - 1), block, rounding_mode="floor")
    boff = torch.zeros(n_docs + 1, dtype=i32, device=dev)
    boff[1:] = torch.cumsum(nblk, 0)
    n_iter = max(1, n_docs.bit_length())
    idx_c = torch.empty((h, total, topk), dtype=i32, device=dev)
    keys = torch.empty(h * total * topk, dtype=i32, device=dev)
    start = torch.empty(total, dtype=i32, device=dev)
    bt = 32
    _plan_keys_kernel[(triton.cdiv(total, bt), h)](
        idx, cu, boff, idx_c, keys, start, *idx.stride(), total, n_docs, n_iter, block, nbmax,
        nkeys, T=topk, TP=triton.next_power_of_2(topk), BT=bt, num_warps=4,
    )
    skeys, perm = torch.sort(keys, stable=True)
    pairs = torch.remainder(perm, total * topk).to(i32)
    blk_start = torch.searchsorted(
        skeys, torch.arange(nkeys + 1, dtype=i32, device=dev), out_int32=True
    )
    nseg = torch.div(blk_start[1:] - blk_start[:-1] + (segq - 1), segq, rounding_mode="floor")
    seg_off = torch.zeros(nkeys + 1, dtype=i32, device=dev)
    seg_off[1:] = torch.cumsum(nseg, 0)
    maxseg = -(-h * total * topk // segq) + nkeys
    seg_key = torch.searchsorted(
        seg_off[1:].contiguous(), torch.arange(maxseg, dtype=i32, device=dev), right=True,
        out_int32=True,
    )

    tok0 = torch.empty(nbmax, dtype=i32, device=dev)
    tok1 = torch.empty(nbmax, dtype=i32, device=dev)
    br = 128
    _plan_blocks_kernel[(triton.cdiv(nbmax, br),)](
        cu, boff, tok0, tok1, n_docs, n_iter, block, nbmax, BR=br, num_warps=4,
    )
    return {
        "idx_c": idx_c, "start": start, "pairs": pairs, "blk_start": blk_start,
        "seg_key": seg_key, "seg_off": seg_off, "tok0": tok0, "tok1": tok1,
        "nbmax": nbmax, "nkeys": nkeys, "maxseg": maxseg, "segq": segq,
    }


# --------------------------------------------------------------------------------------------
# configuration (measured on an H200: benchmarks/NOTES_selected.md)
# --------------------------------------------------------------------------------------------


def _modes(G: int, d: int, block: int, total: int) -> tuple[str, str]:
    """(forward path, dQ path), each "block" or "query"."""
    fwd = "block"
    dq = "block"
    return fwd, dq


def _token_tile() -> int:
    return 64 if _interpreting() else 32


def _row_tile(G: int) -> int:
    """Rows (tokens x G heads) per program of the merge / dQ-reduction kernels."""
    return max(64, triton.next_power_of_2(G))


_PREFETCH_TEST = False
"""Tests flip this to run the interpreter through the prefetching variant."""

CONFIG_OVERRIDE: dict[str, dict] = {}
"""Benchmark hook: {"fwd": {...}, "bwd": {...}} replaces the table below."""


def _block_cfg(G: int, d: int, block: int, bwd: bool) -> dict:
    if _interpreting():
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": _PREFETCH_TEST}
    over = CONFIG_OVERRIDE.get("bwd" if bwd else "fwd")
    if over:
        return dict(over)
    # Measured on an H200 at 64K tokens, d=128, G = 1, 4, 16 (benchmarks/NOTES_selected.md):
    # forward B=64: 64 rows / 4 warps / 3 stages; B=128: 64 / 4 / 2 with the next chunk's gathers
    # prefetched (-20..-35 %). Backward B=64: 128 rows / 8 warps / 3 stages; B=128: 64 / 8 / 2
    # (128 rows would need 258 KB of shared memory).
    if bwd:
        if block >= 128:
            return {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 128 if d >= 64 else 64, "num_warps": 8, "num_stages": 3}
    if block >= 128:
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "PREFETCH": True}
    return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


PARTIALS = ("fp32", "half")
"""Precisions of the block-major paths' per-(token, slot, head) O and dQ partials: "fp32" (the
default, what issue 3 asks for) or "half" (the inputs' fp16/bf16; the partial LSEs stay fp32).
The partials are most of the branch's memory traffic; "half" halves it at the cost of one
rounding of each partial (benchmarks/results/partials_sweep_2026-12-02.md)."""


def partial_dtype(dtype: torch.dtype, partials: str) -> torch.dtype:
    """The O/dQ partials' dtype for inputs of ``dtype`` and ``partials`` ("fp32" or "half")."""
    if partials not in PARTIALS:
        raise ValueError(f"selected-attention partials must be one of {PARTIALS}, got {partials!r}")
    return dtype if partials == "half" and dtype != torch.float32 else torch.float32


def _launch_fwd_block(q, k, v, plan, T, G, block, scale, partials):
    total, H, D = q.shape
    ieee = q.dtype == torch.float32
    op = torch.empty(total * T * H * D, dtype=partial_dtype(q.dtype, partials), device=q.device)
    lp = torch.empty(total * T * H, dtype=torch.float32, device=q.device)
    cfg = _block_cfg(G, D, block, False)
    _fwd_block_kernel[(plan["maxseg"],)](
        q, k, v, op, lp,
        plan["pairs"], plan["blk_start"], plan["seg_key"], plan["seg_off"], plan["tok0"],
        plan["tok1"],
        *q.stride(), *k.stride(), *v.stride(),
        scale * _LOG2E, plan["nbmax"], plan["nkeys"], plan["segq"],
        T=T, G=G, H=H, D=D, BLOCK_N=block, BLOCK_M=cfg["BLOCK_M"], IEEE=ieee,
        PREFETCH=cfg.get("PREFETCH", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    o = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total, dtype=torch.float32, device=q.device)
    h = H // G
    br = _row_tile(G)
    _merge_kernel[(triton.cdiv(total, br // G), h)](
        op, lp, plan["idx_c"], o, lse, *o.stride(), total,
        T=T, G=G, H=H, D=D, BR=br, num_warps=4,
    )
    return o, lse


def _launch_fwd_query(q, k, v, idx_c, start, G, block, scale):
    total, H, D = q.shape
    h = H // G
    T = idx_c.shape[2]
    o = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total, dtype=torch.float32, device=q.device)
    _fwd_query_kernel[(total, h)](
        q, k, v, idx_c, start, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        total, scale * _LOG2E,
        T=T, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block,
        IEEE=q.dtype == torch.float32, num_warps=4 if D <= 64 else 8, num_stages=2,
    )
    return o, lse


def _forward(q, k, v, idx, cu_seqlens, block, scale, fwd_mode, partials):
    total, H, D = q.shape
    h = k.shape[1]
    G = H // h
    T = idx.shape[2]
    plan = _plan(idx, cu_seqlens, total, block, _segment_queries(T, block))
    if fwd_mode == "block":
        o, lse = _launch_fwd_block(q, k, v, plan, T, G, block, scale, partials)
    else:
        o, lse = _launch_fwd_query(q, k, v, plan["idx_c"], plan["start"], G, block, scale)
    return o, lse, plan


def _backward(q, k, v, o, lse, do, plan, block, scale, dq_mode, partials):
    total, H, D = q.shape
    h = k.shape[1]
    G = H // h
    T = plan["idx_c"].shape[2]
    GP = max(16, triton.next_power_of_2(G))
    ieee = q.dtype == torch.float32
    delta = attention_delta(o, do, _token_tile())
    maxseg = plan["maxseg"]
    dkp = torch.empty(maxseg * block * D, dtype=torch.float32, device=q.device)
    dvp = torch.empty(maxseg * block * D, dtype=torch.float32, device=q.device)
    write_dq = dq_mode == "block"
    dqp = (
        torch.empty(total * T * H * D, dtype=partial_dtype(q.dtype, partials), device=q.device)
        if write_dq
        else dkp
    )
    cfg = _block_cfg(G, D, block, True)
    _bwd_block_kernel[(maxseg,)](
        q, k, v, do, lse, delta, dkp, dvp, dqp,
        plan["pairs"], plan["blk_start"], plan["seg_key"], plan["seg_off"], plan["tok0"],
        plan["tok1"],
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        total, scale, scale * _LOG2E, plan["nbmax"], plan["nkeys"], plan["segq"],
        T=T, G=G, H=H, D=D, BLOCK_N=block, BLOCK_M=cfg["BLOCK_M"], WRITE_DQ=write_dq, IEEE=ieee,
        PREFETCH=cfg.get("PREFETCH", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    dk = torch.empty(total, h, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(total, h, D, dtype=v.dtype, device=v.device)
    _reduce_dkdv_kernel[(plan["nkeys"],)](
        dkp, dvp, dk, dv, plan["seg_off"], plan["tok0"], plan["tok1"],
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), plan["nbmax"],
        D=D, BLOCK_N=block, num_warps=4,
    )
    dq = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    if write_dq:
        br = _row_tile(G)
        _reduce_dq_kernel[(triton.cdiv(total, br // G), h)](
            dqp, plan["idx_c"], dq, dq.stride(0), dq.stride(1), total,
            T=T, G=G, H=H, D=D, BR=br, num_warps=4,
        )
    else:
        _dq_query_kernel[(total, h)](
            q, k, v, do, lse, delta, plan["idx_c"], plan["start"], dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), dq.stride(0), dq.stride(1),
            total, scale, scale * _LOG2E,
            T=T, G=G, GP=GP, D=D, BLOCK_N=block, IEEE=ieee,
            num_warps=4 if D <= 64 else 8, num_stages=2,
        )
    return dq, dk, dv


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cu_seqlens, block, scale, fwd_mode, dq_mode, partials):
        o, lse, plan = _forward(q, k, v, idx, cu_seqlens, block, scale, fwd_mode, partials)
        names = [n for n, x in plan.items() if isinstance(x, torch.Tensor)]
        ctx.plan_names = names
        ctx.plan_ints = {n: x for n, x in plan.items() if not isinstance(x, torch.Tensor)}
        ctx.save_for_backward(q, k, v, o, lse, *(plan[n] for n in names))
        ctx.block, ctx.scale, ctx.dq_mode, ctx.partials = block, scale, dq_mode, partials
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *tensors = ctx.saved_tensors
        plan = dict(zip(ctx.plan_names, tensors, strict=True))
        plan.update(ctx.plan_ints)
        dq, dk, dv = _backward(q, k, v, o, lse, do, plan, ctx.block, ctx.scale, ctx.dq_mode,
                               ctx.partials)
        return dq, dk, dv, None, None, None, None, None, None, None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block: int,
    scale: float | None = None,
    *,
    fwd_mode: str = "auto",
    dq_mode: str = "auto",
    partials: str = "fp32",
) -> torch.Tensor:
    """Selected-block attention ``o [total, H, d]`` in q's dtype (differentiable in q, k, v).

    Args:
        q: ``[total, H, d]``; k, v: ``[total, h, d]`` with ``H % h == 0`` (any strides).
        idx: ``[h, total, T]`` int32 document-local block ids, valid ones sorted ascending, -1 pads.
        cu_seqlens: ``[n_docs + 1]`` document boundaries.
        block: selection block size B (a power of two >= 16).
        scale: softmax scale, default ``1/sqrt(d)``.
        fwd_mode, dq_mode: "block", "query" or "auto" (the measured choice per shape).
        partials: precision of the block-major paths' O and dQ partials, :data:`PARTIALS`.
    """
    total, H, D = q.shape
    h = k.shape[1]
    if H % h or v.shape[1] != h or k.shape[0] != total or v.shape[0] != total:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if idx.dim() != 3 or idx.shape[0] != h or idx.shape[1] != total:
        raise ValueError(f"idx must be [{h}, {total}, T], got {tuple(idx.shape)}")
    if D & (D - 1) or D < 16 or block & (block - 1) or block < 16 or v.shape[2] != D:
        raise ValueError(f"head dim ({D}) and block ({block}) must be powers of two >= 16")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    partial_dtype(q.dtype, partials)  # a bad value fails here, before any launch
    auto_fwd, auto_dq = _modes(H // h, D, block, total)
    fwd_mode = auto_fwd if fwd_mode == "auto" else fwd_mode
    dq_mode = auto_dq if dq_mode == "auto" else dq_mode
    if total == 0:
        return q.new_zeros(0, H, D)
    return _SelectedAttention.apply(q, k, v, idx, cu_seqlens, block, scale, fwd_mode, dq_mode,
                                    partials)


def random_selection(
    cu_seqlens: torch.Tensor,
    h: int,
    topk: int,
    block: int,
    generator: torch.Generator | None = None,
    forced: tuple[int, int] = (1, 2),
    chunk: int = 8192,
) -> torch.Tensor:
    """Realistic random valid selections ``[h, total, topk]`` int32 (for tests and benchmarks).

    Per (KV head, token): the first ``forced[0]`` blocks and the ``forced[1]`` blocks ending at the
    token's own block, then random distinct earlier blocks up to ``topk``; sorted ascending, -1
    padded when the token has fewer than ``topk`` blocks. Built on ``cu_seqlens``'s device.
    """
    dev = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    total = int(cu[-1])
    lengths = cu[1:] - cu[:-1]
    nb = int(((lengths + block - 1) // block).max()) if lengths.numel() else 0
    tok = torch.arange(total, device=dev)
    doc = torch.searchsorted(cu[1:].contiguous(), tok, right=True)
    own = (tok - cu[doc]) // block
    out = torch.empty(h, total, topk, dtype=torch.int32, device=dev)
    blocks = torch.arange(max(nb, 1), device=dev)
    for t0 in range(0, total, chunk):
        t1 = min(total, t0 + chunk)
        ob = own[t0:t1, None]
        score = torch.rand(h, t1 - t0, max(nb, 1), device=dev, generator=generator)
        force = (blocks[None, :] < forced[0]) | (
            (blocks[None, :] <= ob) & (blocks[None, :] > ob - forced[1])
        )
        score = torch.where(force[None], score + 2.0, score)
        score = torch.where((blocks[None, :] <= ob)[None], score, -1.0)
        k = min(topk, score.shape[-1])
        top, ids = torch.topk(score, k, dim=-1)
        ids = torch.where(top >= 0, ids, nb + 1)
        ids = torch.sort(ids, dim=-1).values
        ids = torch.where(ids > nb, -1, ids)
        chunk_out = torch.full((h, t1 - t0, topk), -1, dtype=torch.int32, device=dev)
        chunk_out[..., :k] = ids.to(torch.int32)
        out[:, t0:t1] = chunk_out
    return out
