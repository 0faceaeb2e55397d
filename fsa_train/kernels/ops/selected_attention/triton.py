"""Selected-block attention (NSA's selected branch) as Triton kernels, forward and backward.

``selected_attention(q, k, v, idx, cu_seqlens, block, scale=None)`` computes, for query head ``j``
(KV head ``j // G``) at document-local position ``t``, softmax attention over the keys of the
blocks ``idx[j // G, t, :]`` (local block ids, -1 padded) with key position ``<= t``; see
``docs/nsa.md`` step 6 and the naive op (:mod:`fsa_train.kernels.ops.selected_attention.naive`).

Design (FSA's block-major order, with the G query heads of a token stacked as matmul rows):

* **Plan** (:mod:`.plan`): the block -> (token, slot) inverse index, cut into segments of at most
  ``segq`` pairs, on the device with static sizes.
* **Forward** (:func:`_fwd_block_kernel`): one program per segment loads its K/V block once and
  walks the segment in chunks of ``BLOCK_M // G`` queries, the G heads of each query stacked as
  rows (``M = BLOCK_M`` rows for any G). Each (query, slot, head) gets an fp32 partial output
  (``partials="half"``: in the inputs' dtype) and a natural-log LSE (true row maximum), merged per
  token by :func:`_merge_kernel`.
* **Backward** (:func:`_bwd_block_kernel`): dK/dV in fp32 registers, one fp32 partial per
  segment, summed in a fixed order by :func:`_reduce_dkdv_kernel` (deterministic, no atomics);
  dQ as per-(query, slot) partials reduced by :func:`_reduce_dq_kernel`.
* **Launch configurations**: the hand-measured table as the rule of a
  :class:`~fsa_train.kernels.tuning.KernelTuner` (by block size and head dim), overridable through
  :class:`~fsa_train.kernels.settings.KernelSettings`.

Extra memory: the plan O(h · total · T) ints; dK/dV segment partials O(h · total · d); the O and
dQ partials O(total · H · T · d). Nothing depends on how the selections are distributed.
Query-major variants (one program per token, no partials) were measured slower at every shape
(docs/notes/selected.md) and removed; git history keeps them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fsa_train.kernels.ops.selected_attention import block_sparse, forced
from fsa_train.kernels.ops.selected_attention.block_sparse import selected_attention_block
from fsa_train.kernels.ops.selected_attention.plan import (
    SelectionPlan,
    build_plan,
    plan_fakes,
    plan_sizes,
)
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings, resolve_settings, settings_from_token
from fsa_train.kernels.triton_utils import LN2_JIT, LOG2E_JIT, attention_delta, dot
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import (
    LOG2E,
    PARTIALS,
    as_int32,
    check_forced_blocks,
    check_partials,
    check_selection,
    interpreting,
)

__all__ = ["PARTIALS", "partial_dtype", "selected_attention"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _segment_block(
    K, V, BLK_START, SEG_OFF, TOK0, TOK1, pid, key, skt, skh, skd, svt, svh, svd,
    nbmax, segq, BLOCK_N: tl.constexpr, D: tl.constexpr,
):
    """Program ``pid``'s segment of the plan (key = KV head · nbmax + global block): its KV head,
    its pair range ``[p0, p1)``, the block's key positions and its K and V tiles (zero past the
    document's end)."""
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
    return hh, p0, p1, offs_n, k, v


@triton.jit
def _chunk_pairs(PAIRS, c, p1, qi, C, T):
    """The chunk of pairs ``c .. c + C`` of a segment ending at ``p1``: which of its rows are valid
    (row ``r`` holds pair ``c + qi[r]``, one row per query head), the pairs and their tokens."""
    rv = (qi < C) & (c + qi < p1)
    pair = tl.load(PAIRS + c + qi, mask=rv, other=0)
    return rv, pair, pair // T


@triton.jit
def _gather_rows(X, t, head, rv, sxt, sxh, sxd, offs_d):
    """``x[t[r], head[r], :]`` for each row ``r`` of a chunk (0 where the row is not valid)."""
    return tl.load(X + t[:, None] * sxt + head[:, None] * sxh + offs_d[None, :] * sxd,
                   mask=rv[:, None], other=0.0)


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
    hh, p0, p1, offs_n, k, v = _segment_block(
        K, V, BLK_START, SEG_OFF, TOK0, TOK1, pid, key, skt, skh, skd, svt, svh, svd,
        nbmax, segq, BLOCK_N, D)
    offs_d = tl.arange(0, D)
    kt = tl.trans(k)

    C = BLOCK_M // G
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    head = hh * G + r % G
    if PREFETCH:  # the next chunk's gathers are issued before this chunk's math
        rv_n, pair_n, t_n = _chunk_pairs(PAIRS, p0, p1, qi, C, T)
        q_n = _gather_rows(Q, t_n, head, rv_n, sqt, sqh, sqd, offs_d)
    for c in range(p0, p1, C):
        if PREFETCH:
            rv = rv_n
            pair = pair_n
            q = q_n
            rv_n, pair_n, t_n = _chunk_pairs(PAIRS, c + C, p1, qi, C, T)
            q_n = _gather_rows(Q, t_n, head, rv_n, sqt, sqh, sqd, offs_d)
        else:
            rv, pair, t = _chunk_pairs(PAIRS, c, p1, qi, C, T)
            q = _gather_rows(Q, t, head, rv, sqt, sqh, sqd, offs_d)
        t = pair // T
        s = dot(q, kt, IEEE) * scale_log2
        vis = (offs_n[None, :] <= t[:, None]) & rv[:, None]
        s = tl.where(vis, s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        lsum = tl.sum(p, 1)
        seen = lsum > 0
        o = dot(p.to(v.dtype), v, IEEE) / tl.where(seen, lsum, 1.0)[:, None]
        lse = tl.where(seen, (m + tl.log2(lsum)) * LN2_JIT, float("-inf"))
        row = pair.to(tl.int64) * H + head
        tl.store(OP + row[:, None] * D + offs_d[None, :], o.to(OP.dtype.element_ty),
                 mask=rv[:, None])
        tl.store(LP + row, lse, mask=rv)


@triton.jit
def _merge_kernel(
    OP, LP, IDX, O, LSE, OI, LI,
    sot, soh, sod, total,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """o, lse of BR // G tokens x one KV head's G heads (rows) from the per-slot fp32 partials;
    ``HAS_INIT``: starting from another key set's attention ``OI`` (strides of O) and ``LI``
    (the forced blocks', :mod:`.forced`), so the result covers the union."""
    TB = BR // G
    r = tl.arange(0, BR)
    tt = tl.program_id(0) * TB + r // G
    hh = tl.program_id(1)
    head = hh * G + r % G
    rv = (r < TB * G) & (tt < total)
    offs_d = tl.arange(0, D)
    ibase = (hh * total + tt).to(tl.int64) * T
    if HAS_INIT:
        m = tl.load(LI + head * total + tt, mask=rv, other=float("-inf"))
        wsum = tl.where(m > float("-inf"), 1.0, 0.0)
        acc = tl.load(OI + tt[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod,
                      mask=rv[:, None], other=0.0).to(tl.float32)
    else:
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
def _bwd_block_kernel(
    Q, K, V, DO, LSE, DELTA, DKP, DVP, DQP,
    PAIRS, BLK_START, SEG_KEY, SEG_OFF, TOK0, TOK1,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd,
    total, scale, scale_log2, nbmax, nkeys, segq,
    T: tl.constexpr, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    key = tl.load(SEG_KEY + pid)
    if key >= nkeys:
        return
    hh, p0, p1, offs_n, k, v = _segment_block(
        K, V, BLK_START, SEG_OFF, TOK0, TOK1, pid, key, skt, skh, skd, svt, svh, svd,
        nbmax, segq, BLOCK_N, D)
    offs_d = tl.arange(0, D)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    C = BLOCK_M // G
    r = tl.arange(0, BLOCK_M)
    qi = r // G
    head = hh * G + r % G
    if PREFETCH:  # the next chunk's gathers are issued before this chunk's math
        rv_n, pair_n, t_n = _chunk_pairs(PAIRS, p0, p1, qi, C, T)
        q_n = _gather_rows(Q, t_n, head, rv_n, sqt, sqh, sqd, offs_d)
        do_n = _gather_rows(DO, t_n, head, rv_n, sdt, sdh, sdd, offs_d)
        lse_n = tl.load(LSE + head * total + t_n, mask=rv_n, other=0.0)
        delta_n = tl.load(DELTA + head * total + t_n, mask=rv_n, other=0.0)
    for c in range(p0, p1, C):
        if PREFETCH:
            rv = rv_n
            pair = pair_n
            t = t_n
            q = q_n
            do = do_n
            lse2 = lse_n * LOG2E_JIT
            delta = delta_n
            rv_n, pair_n, t_n = _chunk_pairs(PAIRS, c + C, p1, qi, C, T)
            q_n = _gather_rows(Q, t_n, head, rv_n, sqt, sqh, sqd, offs_d)
            do_n = _gather_rows(DO, t_n, head, rv_n, sdt, sdh, sdd, offs_d)
            lse_n = tl.load(LSE + head * total + t_n, mask=rv_n, other=0.0)
            delta_n = tl.load(DELTA + head * total + t_n, mask=rv_n, other=0.0)
        else:
            rv, pair, t = _chunk_pairs(PAIRS, c, p1, qi, C, T)
            q = _gather_rows(Q, t, head, rv, sqt, sqh, sqd, offs_d)
            do = _gather_rows(DO, t, head, rv, sdt, sdh, sdd, offs_d)
            lse2 = tl.load(LSE + head * total + t, mask=rv, other=0.0) * LOG2E_JIT
            delta = tl.load(DELTA + head * total + t, mask=rv, other=0.0)
        s = dot(q, kt, IEEE) * scale_log2
        vis = (offs_n[None, :] <= t[:, None]) & rv[:, None]
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dv += dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dsl = ds.to(q.dtype)
        dk += dot(tl.trans(dsl), q, IEEE)
        dq = dot(dsl, k, IEEE) * scale
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


# --------------------------------------------------------------------------------------------
# launch configurations (measured on an H200: docs/notes/selected.md)
# --------------------------------------------------------------------------------------------

# Measured at 64K tokens, d = 128, G = 1, 4, 16. Forward B = 64: 64 rows / 4 warps / 3 stages;
# B = 128: 64 / 4 / 2 with the next chunk's gathers prefetched (-20..-35 %). Backward B = 64:
# 128 rows / 8 warps / 3 stages (64 rows for d < 64); B = 128: 64 / 8 / 2 (128 rows would need
# 258 KB of shared memory).
_FWD_CONFIGS = [
    {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "PREFETCH": False},
    {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "PREFETCH": True},
]
_BWD_CONFIGS = [
    {"BLOCK_M": 128, "num_warps": 8, "num_stages": 3, "PREFETCH": False},
    {"BLOCK_M": 64, "num_warps": 8, "num_stages": 3, "PREFETCH": False},
    {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2, "PREFETCH": False},
]
_INTERP = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": False}


def _fwd_rule(meta: dict) -> dict:
    return _FWD_CONFIGS[1] if meta["BLOCK_N"] >= 128 else _FWD_CONFIGS[0]


def _bwd_rule(meta: dict) -> dict:
    if meta["BLOCK_N"] >= 128:
        return _BWD_CONFIGS[2]
    return _BWD_CONFIGS[0] if meta["D"] >= 64 else _BWD_CONFIGS[1]


# The same table for every dtype (fp32 included) and size: a rule, not an autotuner.
_fwd_tuned = KernelTuner("selected_attention.fwd_block", _fwd_block_kernel, _FWD_CONFIGS,
                         size_arg=None, interpret=_INTERP, rule=_fwd_rule)
_bwd_tuned = KernelTuner("selected_attention.bwd_block", _bwd_block_kernel, _BWD_CONFIGS,
                         size_arg=None, interpret=_INTERP, rule=_bwd_rule)


def _override(config: dict | None) -> dict | None:
    """A settings override as a full launch configuration (PREFETCH off unless named)."""
    return None if config is None else {"PREFETCH": False, **config}


def _token_tile() -> int:
    return 64 if interpreting() else 32


def _row_tile(G: int) -> int:
    """Rows (tokens x G heads) per program of the merge / dQ-reduction kernels."""
    return max(64, triton.next_power_of_2(G))


def partial_dtype(dtype: torch.dtype, partials: str) -> torch.dtype:
    """The O/dQ partials' dtype for inputs of ``dtype`` and ``partials`` (:data:`PARTIALS`)."""
    check_partials(partials)
    return dtype if partials == "half" and dtype != torch.float32 else torch.float32


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _forward(q, k, v, idx, cu_seqlens, block, scale, partials, settings: KernelSettings,
             init: tuple[torch.Tensor, torch.Tensor] | None = None):
    """o, lse and the plan; ``init``: (o, lse) of attention over other keys of the same
    queries (contiguous, as ``o``), merged in (the forced blocks' part, :mod:`.forced`)."""
    total, H, D = q.shape
    G = H // k.shape[1]
    T = idx.shape[2]
    plan = build_plan(idx, cu_seqlens, total, block)
    op = torch.empty(total * T * H * D, dtype=partial_dtype(q.dtype, partials), device=q.device)
    lp = torch.empty(total * T * H, dtype=torch.float32, device=q.device)
    _fwd_tuned.run(
        (plan.maxseg,),
        (q, k, v, op, lp, plan.pairs, plan.blk_start, plan.seg_key, plan.seg_off, plan.tok0,
         plan.tok1, *q.stride(), *k.stride(), *v.stride(),
         scale * LOG2E, plan.nbmax, plan.nkeys, plan.segq),
        dtype=q.dtype, config=_override(settings.selected_fwd_config),
        T=T, G=G, H=H, D=D, BLOCK_N=block, IEEE=q.dtype == torch.float32,
    )
    o = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total, dtype=torch.float32, device=q.device)
    br = _row_tile(G)
    o_init, lse_init = init if init is not None else (o, lse)  # unread without init
    _merge_kernel[(triton.cdiv(total, br // G), H // G)](
        op, lp, plan.idx_c, o, lse, o_init, lse_init, *o.stride(), total,
        T=T, G=G, H=H, D=D, BR=br, HAS_INIT=init is not None, num_warps=4,
    )
    return o, lse, plan


def _backward(q, k, v, o, lse, do, plan: SelectionPlan, block, scale, partials,
              settings: KernelSettings):
    total, H, D = q.shape
    h = k.shape[1]
    G = H // h
    T = plan.idx_c.shape[2]
    delta = attention_delta(o, do, _token_tile())
    dkp = torch.empty(plan.maxseg * block * D, dtype=torch.float32, device=q.device)
    dvp = torch.empty(plan.maxseg * block * D, dtype=torch.float32, device=q.device)
    dqp = torch.empty(total * T * H * D, dtype=partial_dtype(q.dtype, partials), device=q.device)
    _bwd_tuned.run(
        (plan.maxseg,),
        (q, k, v, do, lse, delta, dkp, dvp, dqp,
         plan.pairs, plan.blk_start, plan.seg_key, plan.seg_off, plan.tok0, plan.tok1,
         *q.stride(), *k.stride(), *v.stride(), *do.stride(),
         total, scale, scale * LOG2E, plan.nbmax, plan.nkeys, plan.segq),
        dtype=q.dtype, config=_override(settings.selected_bwd_config),
        T=T, G=G, H=H, D=D, BLOCK_N=block, IEEE=q.dtype == torch.float32,
    )
    dk = torch.empty(total, h, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(total, h, D, dtype=v.dtype, device=v.device)
    _reduce_dkdv_kernel[(plan.nkeys,)](
        dkp, dvp, dk, dv, plan.seg_off, plan.tok0, plan.tok1,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), plan.nbmax,
        D=D, BLOCK_N=block, num_warps=4,
    )
    dq = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    br = _row_tile(G)
    _reduce_dq_kernel[(triton.cdiv(total, br // G), h)](
        dqp, plan.idx_c, dq, dq.stride(0), dq.stride(1), total,
        T=T, G=G, H=H, D=D, BR=br, num_warps=4,
    )
    return dq, dk, dv


def _forward_fake(q, k, v, idx, cu_seqlens, block, scale, partials, settings):
    total, H, D = q.shape
    return [q.new_empty((total, H, D)), q.new_empty((H, total), dtype=torch.float32),
            *plan_fakes(idx, cu_seqlens.shape[0] - 1, total, block)]


@kernel_op("selected_attention_fwd", _forward_fake)
def _forward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                    cu_seqlens: torch.Tensor, block: int, scale: float, partials: str,
                    settings: str) -> list[torch.Tensor]:
    """:func:`_forward` as a custom op: ``[o, lse, *plan.tensors()]``."""
    o, lse, plan = _forward(q, k, v, idx, cu_seqlens, block, scale, partials,
                            settings_from_token(settings))
    return [o, lse, *plan.tensors()]


def _forward_merged_fake(q, k, v, idx, cu_seqlens, block, scale, partials, settings, o_init,
                         lse_init):
    return _forward_fake(q, k, v, idx, cu_seqlens, block, scale, partials, settings)


@kernel_op("selected_attention_fwd_merged", _forward_merged_fake)
def _forward_merged_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                           cu_seqlens: torch.Tensor, block: int, scale: float, partials: str,
                           settings: str, o_init: torch.Tensor, lse_init: torch.Tensor,
                           ) -> list[torch.Tensor]:
    """:func:`_forward` merged with ``(o_init, lse_init)`` as a custom op."""
    o, lse, plan = _forward(q, k, v, idx, cu_seqlens, block, scale, partials,
                            settings_from_token(settings), (o_init.contiguous(), lse_init))
    return [o, lse, *plan.tensors()]


def _backward_fake(q, k, v, o, lse, do, plan, n_docs, block, scale, partials, settings):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@kernel_op("selected_attention_bwd", _backward_fake)
def _backward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, do: torch.Tensor, plan: list[torch.Tensor], n_docs: int,
                     block: int, scale: float, partials: str, settings: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward` as a custom op, on the plan's tensors (its sizes from the shapes)."""
    h, total, topk = plan[0].shape
    sizes = plan_sizes(h, total, topk, n_docs, block)
    return _backward(q, k, v, o, lse, do, SelectionPlan.rebuild(tuple(plan), sizes), block,
                     scale, partials, settings_from_token(settings))


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cu_seqlens, block, scale, partials, settings):
        o, lse, *plan = _forward_kernel(q, k, v, idx, cu_seqlens, block, scale, partials,
                                        settings.token)
        ctx.save_for_backward(q, k, v, o, lse, *plan)
        ctx.n_docs = cu_seqlens.shape[0] - 1
        ctx.block, ctx.scale, ctx.partials, ctx.settings = block, scale, partials, settings.token
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *plan = ctx.saved_tensors
        dq, dk, dv = _backward_kernel(q, k, v, o, lse, do, plan, ctx.n_docs, ctx.block,
                                      ctx.scale, ctx.partials, ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None


class _ForcedSplitAttention(torch.autograd.Function):
    """Token-mode selected attention as the block-sparse kernels over every query block's forced
    blocks plus the token kernels over the free slots, merged by LSE (:mod:`.forced`)."""

    @staticmethod
    def forward(ctx, q, k, v, free, rows, cu_seqlens, block, scale, partials, settings):
        o, lse, idx_c, keys = block_sparse._forward_kernel(q, k, v, rows, cu_seqlens, block,
                                                           scale, settings.token)
        plan = []
        if free.shape[2]:  # the token kernels' merge starts from the forced blocks' (o, lse)
            o, lse, *plan = _forward_merged_kernel(q, k, v, free, cu_seqlens, block, scale,
                                                   partials, settings.token, o, lse)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, idx_c, keys, *plan)
        ctx.n_docs = cu_seqlens.shape[0] - 1
        ctx.block, ctx.scale, ctx.partials, ctx.settings = block, scale, partials, settings.token
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, idx_c, keys, *plan = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        # both kernels with the merged o and lse: each gives its keys' share of the gradients
        dq, dk, dv = block_sparse._backward_kernel(q, k, v, o, lse, do, cu_seqlens, idx_c, keys,
                                                   ctx.block, ctx.scale, ctx.settings)
        if plan:
            dq_s, dk_s, dv_s = _backward_kernel(q, k, v, o, lse, do, plan, ctx.n_docs,
                                                ctx.block, ctx.scale, ctx.partials, ctx.settings)
            dq, dk, dv = dq + dq_s, dk + dk_s, dv + dv_s
        return dq, dk, dv, None, None, None, None, None, None, None


def _forced_split(q, k, v, idx, cu_seqlens, block, scale, partials, settings, init, local):
    cu = as_int32(cu_seqlens)
    free = forced.free_selection(idx, cu, block, init, local)
    rows = forced.forced_rows(cu, q.shape[0], block, k.shape[1], init, local)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _ForcedSplitAttention.apply(q, k, v, free, rows, cu, block, scale, partials, settings)


def selected_attention(q, k, v, idx, cu_seqlens, block: int, scale: float | None = None,
                       partials: str = "fp32", selection: str = "token",
                       forced_blocks: tuple[int, int] | None = None, *,
                       settings: KernelSettings | None = None) -> torch.Tensor:
    """The naive op's contract (:mod:`.naive`) in Triton, for head dims and block sizes that are
    powers of two >= 16; ``idx`` as :func:`~fsa_train.kernels.api.select_blocks` returns it
    (valid ids ascending). ``partials``: the token mode's O/dQ partials' precision
    (:data:`~fsa_train.kernels.utils.PARTIALS`; block mode has no partials); ``selection="block"``
    runs the block-sparse kernels of :mod:`.block_sparse`; ``forced_blocks=(init, local)``: the
    caller's promise that every token's selection holds those forced blocks, which lets
    ``settings.selected_forced == "dense"`` run them as block-sparse query tiles
    (:mod:`.forced`); ``settings``: launch overrides."""
    total, H, D = q.shape
    h = k.shape[1]
    if H % h or v.shape[1] != h or k.shape[0] != total or v.shape[0] != total:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_selection(selection)
    if selection == "token" and (idx.dim() != 3 or idx.shape[0] != h or idx.shape[1] != total):
        raise ValueError(f"idx must be [{h}, {total}, T], got {tuple(idx.shape)}")
    if D & (D - 1) or D < 16 or block & (block - 1) or block < 16 or v.shape[2] != D:
        raise ValueError(f"head dim ({D}) and block ({block}) must be powers of two >= 16")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    check_partials(partials)  # a bad value fails here, before any launch
    check_forced_blocks(forced_blocks)
    settings = resolve_settings(settings)
    if total == 0:
        return q.new_zeros(0, H, D)
    if selection == "block":
        return selected_attention_block(q, k, v, idx, as_int32(cu_seqlens), block, scale,
                                        settings)
    if forced_blocks is not None and settings.selected_forced == "dense" and sum(forced_blocks):
        return _forced_split(q, k, v, idx, cu_seqlens, block, scale, partials, settings,
                             *forced_blocks)
    return _SelectedAttention.apply(q, k, v, idx, cu_seqlens, block, scale, partials, settings)
