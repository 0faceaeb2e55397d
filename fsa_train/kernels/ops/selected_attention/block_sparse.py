"""Block-shared selected attention (``nsa.selection = "block"``): block-sparse FlashAttention.

When the B queries of each selection block share one selection (docs/nsa.md, the variant), the
selected branch is attention over a block-sparse mask of query tiles x key blocks, and needs none
of the token mode's per-(token, slot) partials or gathers:

* **Forward** (:func:`_fwd_kernel`) and **dQ** (:func:`_dq_kernel`): one program per query tile
  (``B / SPLIT`` tokens of one query block, ``GP`` query heads of one KV head stacked as rows)
  walks the tile's selected key blocks in ascending order with an online softmax; the
  token-level causal mask only bites in the query's own block. Outputs written once.
* **dK/dV** (:func:`_dkdv_kernel`): one program per *segment* of a key block's list of query
  blocks (a CSR built on the device by :mod:`.block_plan`, no host synchronisation), with
  dK and dV in fp32 registers over all G heads. A block that more than ``segq`` query blocks
  chose (the forced first block) is cut into several segments, whose fp32 partials
  :func:`_reduce_kernel` sums in a fixed order: balanced and deterministic, no atomics.
  ``KSPLIT = 2`` gives each half of a key block its own program (fewer registers; opt-in).
* **Launch configurations**: Triton's autotuner over a short list (``SPLIT`` query sub-tiles per
  block, ``PACK`` the group's heads as rows or not, warps, stages), one choice per size class.

Contract: ``idx [h, total // B + n_docs, T]`` int32, the layout of ``select_blocks(...,
selection="block")`` (:func:`fsa_train.kernels.varlen.block_rows`); entries that are -1, past the
row's own block or repeats are ignored (:func:`.block_plan.clean_block_selection`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fsa_train.kernels.ops.selected_attention.block_plan import (
    build_block_csr,
    clean_block_selection,
)
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings, settings_from_token
from fsa_train.kernels.triton_utils import (
    LN2_JIT,
    LOG2E_JIT,
    attention_delta,
    dot,
    locate_tile,
)
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import LOG2E, search_steps
from fsa_train.kernels.varlen import block_rows

__all__ = ["packed_heads", "selected_attention_block"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _query_tile(CU, IDX, pid_m, kvh, si_h, si_r, n_docs, n_iter,
                B: tl.constexpr, SPLIT: tl.constexpr, T: tl.constexpr, TP: tl.constexpr):
    """(document start, length, first local query, the row's block ids ``[TP]``, number of
    selected blocks) of query-tile program ``pid_m`` (``SPLIT`` programs per block row)."""
    row = pid_m // SPLIT
    _, bos, seqlen, start = locate_tile(CU, row, n_docs, n_iter, B)
    q0 = start + (pid_m % SPLIT) * (B // SPLIT)
    slots = tl.arange(0, TP)
    ids = tl.load(IDX + kvh.to(tl.int64) * si_h + row.to(tl.int64) * si_r + slots,
                  mask=slots < T, other=-1)
    n_sel = tl.sum((ids >= 0).to(tl.int32), 0)
    return bos, seqlen, q0, ids, n_sel


@triton.jit
def _block_id(ids, i, TP: tl.constexpr):
    """The ``i``-th selected block, from the ids already in registers (the K/V addresses then
    depend on no load inside the loop; reading it from memory each iteration measured the same,
    docs/notes/selected.md)."""
    return tl.sum(tl.where(tl.arange(0, TP) == i, ids, 0), 0)


@triton.jit
def _tile_rows(q0, seqlen, kvh, g0, G: tl.constexpr, GPE: tl.constexpr, BQ: tl.constexpr):
    """Rows of a query tile: ``BQ`` tokens x ``GPE`` heads, token-major (a token's heads are
    adjacent in memory). Returns (local token, query head, row valid)."""
    r = tl.arange(0, BQ * GPE)
    tok = q0 + r // GPE
    head = kvh * G + g0 + r % GPE
    return tok, head, tok < seqlen


@triton.jit
def _rows_ptr(X, bos, tok, head, sxt, sxh, offs_d):
    return X + (bos + tok).to(tl.int64)[:, None] * sxt + head[:, None] * sxh + offs_d[None, :]


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX, CU,
    sqt, sqh, skt, skh, svt, svh, sot, soh, si_h, si_r,
    total, n_docs, n_iter, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, B: tl.constexpr, T: tl.constexpr,
    TP: tl.constexpr, SPLIT: tl.constexpr, PACK: tl.constexpr, IEEE: tl.constexpr,
):
    GPE: tl.constexpr = GP * PACK + 1 - PACK
    BQ: tl.constexpr = B // SPLIT
    pid_h = tl.program_id(1)
    kvh = pid_h // (G // GPE)
    g0 = (pid_h % (G // GPE)) * GPE
    bos, seqlen, q0, ids, n_sel = _query_tile(CU, IDX, tl.program_id(0), kvh, si_h, si_r,
                                              n_docs, n_iter, B, SPLIT, T, TP)
    if q0 >= seqlen:
        return
    tok, head, row_ok = _tile_rows(q0, seqlen, kvh, g0, G, GPE, BQ)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, B)
    q = tl.load(_rows_ptr(Q, bos, tok, head, sqt, sqh, offs_d), mask=row_ok[:, None], other=0.0)
    k_base = K + bos.to(tl.int64) * skt + kvh * skh
    v_base = V + bos.to(tl.int64) * svt + kvh * svh
    m_i = tl.full([BQ * GPE], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ * GPE], tl.float32)
    acc = tl.zeros([BQ * GPE, D], tl.float32)
    for i in range(0, n_sel):
        kpos = _block_id(ids, i, TP) * B + offs_n
        kmask = (kpos < seqlen)[:, None]
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], mask=kmask,
                    other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], mask=kmask,
                    other=0.0)
        s = dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(kpos[None, :] <= tok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(_rows_ptr(O, bos, tok, head, sot, soh, offs_d), o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2_JIT, float("-inf"))
    tl.store(LSE + head.to(tl.int64) * total + bos + tok, lse, mask=row_ok)


@triton.jit
def _row_stats(LSE, DELTA, head, bos, tok, row_ok, total):
    """A tile's rows' LSE in base 2 (+inf where the row saw no key, so p = 0) and delta."""
    lse = tl.load(LSE + head.to(tl.int64) * total + bos + tok, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_JIT
    delta = tl.load(DELTA + head.to(tl.int64) * total + bos + tok, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX, CU,
    sqt, sqh, skt, skh, svt, svh, sdt, sdh, sdqt, sdqh, si_h, si_r,
    total, n_docs, n_iter, scale, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, B: tl.constexpr, T: tl.constexpr,
    TP: tl.constexpr, SPLIT: tl.constexpr, PACK: tl.constexpr, IEEE: tl.constexpr,
):
    GPE: tl.constexpr = GP * PACK + 1 - PACK
    BQ: tl.constexpr = B // SPLIT
    pid_h = tl.program_id(1)
    kvh = pid_h // (G // GPE)
    g0 = (pid_h % (G // GPE)) * GPE
    bos, seqlen, q0, ids, n_sel = _query_tile(CU, IDX, tl.program_id(0), kvh, si_h, si_r,
                                              n_docs, n_iter, B, SPLIT, T, TP)
    if q0 >= seqlen:
        return
    tok, head, row_ok = _tile_rows(q0, seqlen, kvh, g0, G, GPE, BQ)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, B)
    q = tl.load(_rows_ptr(Q, bos, tok, head, sqt, sqh, offs_d), mask=row_ok[:, None], other=0.0)
    do = tl.load(_rows_ptr(DO, bos, tok, head, sdt, sdh, offs_d), mask=row_ok[:, None],
                 other=0.0)
    lse2, delta = _row_stats(LSE, DELTA, head, bos, tok, row_ok, total)
    k_base = K + bos.to(tl.int64) * skt + kvh * skh
    v_base = V + bos.to(tl.int64) * svt + kvh * svh
    dq = tl.zeros([BQ * GPE, D], tl.float32)
    for i in range(0, n_sel):
        kpos = _block_id(ids, i, TP) * B + offs_n
        kmask = (kpos < seqlen)[:, None]
        k = tl.load(k_base + kpos[:, None].to(tl.int64) * skt + offs_d[None, :], mask=kmask,
                    other=0.0)
        v = tl.load(v_base + kpos[:, None].to(tl.int64) * svt + offs_d[None, :], mask=kmask,
                    other=0.0)
        s = dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.where(kpos[None, :] <= tok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, IEEE)
    dq = dq * scale
    tl.store(_rows_ptr(DQ, bos, tok, head, sdqt, sdqh, offs_d), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DKP, DVP,
    QROWS, KEY_START, SEG_KEY, COUNTS, ENDS, CU,
    sqt, sqh, skt, skh, svt, svh, sdt, sdh, sdkt, sdkh, sdvt, sdvh,
    total, n_docs, n_iter, n_rows, nkeys, segq, scale, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, B: tl.constexpr,
    SPLIT: tl.constexpr, PACK: tl.constexpr, IEEE: tl.constexpr, KSPLIT: tl.constexpr = 1,
):
    # KSPLIT programs per segment, each owning B / KSPLIT keys of the block: smaller fp32 dK/dV
    # accumulators (the full block spills at 255 registers; docs/notes/selected.md)
    pid = tl.program_id(0) // KSPLIT
    key = tl.load(SEG_KEY + pid)
    if key >= nkeys:
        return
    GPE: tl.constexpr = GP * PACK + 1 - PACK
    BQ: tl.constexpr = B // SPLIT
    BK: tl.constexpr = B // KSPLIT
    k0 = (tl.program_id(0) % KSPLIT) * BK  # the program's first key within the block
    kvh = key // n_rows
    krow = key % n_rows
    _, bos, seqlen, kstart = locate_tile(CU, krow, n_docs, n_iter, B)
    seg = pid - (tl.load(ENDS + key) - tl.load(COUNTS + key))  # index among the key's segments
    e0 = tl.load(KEY_START + key) + seg * segq
    e1 = tl.minimum(e0 + segq, tl.load(KEY_START + key + 1))
    offs_d = tl.arange(0, D)
    offs_n = k0 + tl.arange(0, BK)
    kpos = kstart + offs_n
    kmask = (kpos < seqlen)[:, None]
    k = tl.load(K + (bos + kpos).to(tl.int64)[:, None] * skt + kvh * skh + offs_d[None, :],
                mask=kmask, other=0.0)
    v = tl.load(V + (bos + kpos).to(tl.int64)[:, None] * svt + kvh * svh + offs_d[None, :],
                mask=kmask, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BK, D], tl.float32)
    dv = tl.zeros([BK, D], tl.float32)
    for e in range(e0, e1):
        qstart = kstart + (tl.load(QROWS + e) - krow) * B  # the query block, same document
        for sub in tl.static_range(SPLIT):
            for g in range(0, G // GPE):
                tok, head, row_ok = _tile_rows(qstart + sub * BQ, seqlen, kvh, g * GPE, G, GPE,
                                               BQ)
                q = tl.load(_rows_ptr(Q, bos, tok, head, sqt, sqh, offs_d), mask=row_ok[:, None],
                            other=0.0)
                do = tl.load(_rows_ptr(DO, bos, tok, head, sdt, sdh, offs_d),
                             mask=row_ok[:, None], other=0.0)
                lse2, delta = _row_stats(LSE, DELTA, head, bos, tok, row_ok, total)
                s = dot(q, kt, IEEE) * qk_scale
                p = tl.where(kpos[None, :] <= tok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
                dv += dot(tl.trans(p.to(do.dtype)), do, IEEE)
                ds = p * (dot(do, vt, IEEE) - delta[:, None])
                dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * scale
    n_part = tl.load(COUNTS + nkeys + key)
    if n_part == 0:  # the key's only segment: the final values
        out_k = DK + (bos + kpos).to(tl.int64)[:, None] * sdkt + kvh * sdkh + offs_d[None, :]
        out_v = DV + (bos + kpos).to(tl.int64)[:, None] * sdvt + kvh * sdvh + offs_d[None, :]
        tl.store(out_k, dk.to(DK.dtype.element_ty), mask=kmask)
        tl.store(out_v, dv.to(DV.dtype.element_ty), mask=kmask)
    else:
        part = tl.load(ENDS + nkeys + key) - n_part + seg
        tile = part.to(tl.int64) * (B * D) + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DKP + tile, dk)
        tl.store(DVP + tile, dv)


@triton.jit
def _reduce_kernel(
    DKP, DVP, DK, DV, COUNTS, ENDS, CU,
    sdkt, sdkh, sdvt, sdvh, n_docs, n_iter, n_rows, nkeys,
    D: tl.constexpr, B: tl.constexpr,
):
    """dK/dV of a key block cut into several segments: their fp32 partials summed in order."""
    key = tl.program_id(0)
    n_seg = tl.load(COUNTS + nkeys + key)
    if n_seg == 0:
        return
    part = tl.load(ENDS + nkeys + key) - n_seg
    kvh = key // n_rows
    _, bos, seqlen, kstart = locate_tile(CU, key % n_rows, n_docs, n_iter, B)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, B)
    tile = offs_n[:, None] * D + offs_d[None, :]
    dk = tl.zeros([B, D], tl.float32)
    dv = tl.zeros([B, D], tl.float32)
    for s in range(0, n_seg):
        base = (part + s).to(tl.int64) * (B * D)
        dk += tl.load(DKP + base + tile)
        dv += tl.load(DVP + base + tile)
    kpos = kstart + offs_n
    kmask = (kpos < seqlen)[:, None]
    rows = (bos + kpos).to(tl.int64)[:, None]
    tl.store(DK + rows * sdkt + kvh * sdkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV + rows * sdvt + kvh * sdvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kmask)


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------


def _config(split, pack, warps, stages) -> dict:
    return {"SPLIT": split, "PACK": pack, "num_warps": warps, "num_stages": stages}


# Measured on an H200 (bf16, d = 128, G = 4, 8K and 64K tokens, 2026-12-02): the first of each
# list was the fastest there (forward 280-300 TFLOP/s, dQ 550-590, dK/dV 260-380); 4 warps with
# 128 rows ran at half speed and 8 warps / 3 stages of dK/dV overflowed shared memory, so they
# are not candidates.
_FWD_CONFIGS = [
    _config(1, 1, 8, 3), _config(1, 0, 4, 3), _config(2, 1, 4, 3), _config(1, 0, 4, 2),
    _config(1, 1, 8, 2),
]
_DQ_CONFIGS = [_config(1, 1, 8, 3), _config(2, 1, 4, 3), _config(1, 0, 4, 3)]
# KSPLIT = 2 (half a key block per dK/dV program, 8 warps) removes the register spills of an
# offline sm_90 compile (255 registers + 72 B stack -> 186, none) but reads each query tile
# twice: in the autotuned list of a 2026-12-02 H200 run it lost to the first candidate at 8K-64K
# (throughput_h200_2026-12-02_block_selection_350m), so it stays opt-in through
# KernelSettings.block_sparse_config (GPU-tested: test_gpu_launch_variants_match_reference).
_DKDV_CONFIGS = [_config(1, 1, 8, 2), _config(1, 0, 4, 2), _config(1, 0, 8, 3),
                 _config(2, 1, 8, 2)]
_FP32 = _config(1, 0, 4, 1)
_INTERP = _config(1, 1, 4, 1)
_KEY = ["G", "GP", "D", "B", "IEEE"]

_fwd_tuned = KernelTuner("selected_attention.block_fwd", _fwd_kernel, _FWD_CONFIGS,
                         [*_KEY, "T"], fp32=_FP32, interpret=_INTERP)
_dq_tuned = KernelTuner("selected_attention.block_dq", _dq_kernel, _DQ_CONFIGS,
                        [*_KEY, "T"], fp32=_FP32, interpret=_INTERP)
_dkdv_tuned = KernelTuner("selected_attention.block_dkdv", _dkdv_kernel, _DKDV_CONFIGS, _KEY,
                          fp32=_FP32, interpret=_INTERP)


def packed_heads(G: int, block: int) -> int:
    """Query heads stacked as rows when ``PACK = 1``: the largest power of two dividing G with at
    most 128 rows per tile (at least 1)."""
    gp = G & -G
    while gp > 1 and gp * block > max(128, block):
        gp //= 2
    return gp


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _override(settings: KernelSettings, dkdv: bool) -> dict | None:
    """``settings.block_sparse_config`` for one kernel: KSPLIT only for dK/dV."""
    config = settings.block_sparse_config
    if config is None or dkdv:
        return config
    return {k: v for k, v in config.items() if k != "KSPLIT"}


def _launch_meta(G, D, block, T, dtype) -> dict:
    return {"G": G, "GP": packed_heads(G, block), "D": D, "B": block,
            "IEEE": dtype == torch.float32}


def _query_grid(n_rows, h, G, GP):
    def grid(meta):
        gpe = GP if meta["PACK"] else 1
        return (n_rows * meta["SPLIT"], h * (G // gpe))
    return grid


def _forward(q, k, v, idx, cu, block, scale, settings: KernelSettings):
    total, H, D = q.shape
    h = k.shape[1]
    G = H // h
    idx_c, keys = clean_block_selection(idx, cu, block)
    n_rows, T = idx_c.shape[1], idx_c.shape[2]
    meta = _launch_meta(G, D, block, T, q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(H, total, dtype=torch.float32, device=q.device)
    n_docs = cu.numel() - 1
    _fwd_tuned.run(
        _query_grid(n_rows, h, G, meta["GP"]),
        (q, k, v, o, lse, idx_c, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
         v.stride(0), v.stride(1), o.stride(0), o.stride(1), idx_c.stride(0), idx_c.stride(1),
         total, n_docs, search_steps(n_docs), scale * LOG2E),
        dtype=q.dtype, autotune=settings.block_sparse_autotune,
        config=_override(settings, dkdv=False), T=T, TP=triton.next_power_of_2(T), **meta,
    )
    return o, lse, idx_c, keys


def _backward(q, k, v, o, lse, do, cu, idx_c, keys, block, scale, settings: KernelSettings):
    total, H, D = q.shape
    h = k.shape[1]
    G = H // h
    n_rows, T = idx_c.shape[1], idx_c.shape[2]
    meta = _launch_meta(G, D, block, T, q.dtype)
    n_docs = cu.numel() - 1
    n_iter = search_steps(n_docs)
    delta = attention_delta(o, do)
    common = dict(dtype=q.dtype, autotune=settings.block_sparse_autotune)
    dq = torch.empty_like(q)
    _dq_tuned.run(
        _query_grid(n_rows, h, G, meta["GP"]),
        (q, k, v, do, lse, delta, dq, idx_c, cu, q.stride(0), q.stride(1), k.stride(0),
         k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
         dq.stride(1), idx_c.stride(0), idx_c.stride(1), total, n_docs, n_iter, scale,
         scale * LOG2E),
        config=_override(settings, dkdv=False), T=T, TP=triton.next_power_of_2(T), **common,
        **meta,
    )
    csr = build_block_csr(keys, h, n_rows, T)
    dk = torch.zeros_like(k)  # blocks nobody selected get no program
    dv = torch.zeros_like(v)
    dkp = torch.empty(csr.n_part * block * D, dtype=torch.float32, device=q.device)
    dvp = torch.empty_like(dkp)
    _dkdv_tuned.run(
        lambda meta: (csr.maxseg * meta.get("KSPLIT", 1),),
        (q, k, v, do, lse, delta, dk, dv, dkp, dvp, csr.q_rows, csr.key_start, csr.seg_key,
         csr.counts, csr.ends, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
         v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1),
         dv.stride(0), dv.stride(1), total, n_docs, n_iter, n_rows, csr.nkeys, csr.segq,
         scale, scale * LOG2E),
        config=_override(settings, dkdv=True), **common, **meta,
    )
    _reduce_kernel[(csr.nkeys,)](
        dkp, dvp, dk, dv, csr.counts, csr.ends, cu, dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), n_docs, n_iter, n_rows, csr.nkeys, D=D, B=block,
        num_warps=4,
    )
    return dq, dk, dv


def _forward_fake(q, k, v, idx, cu, block, scale, settings):
    total, H, _ = q.shape
    h, n_rows, topk = idx.shape
    i32 = {"dtype": torch.int32, "device": q.device}
    return (torch.empty_like(q), q.new_empty((H, total), dtype=torch.float32),
            torch.empty(idx.shape, **i32), torch.empty(h * n_rows * topk, **i32))


@kernel_op("block_selected_attention_fwd", _forward_fake)
def _forward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                    cu: torch.Tensor, block: int, scale: float, settings: str,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward` as a custom op (``settings``: a :class:`KernelSettings` token)."""
    return _forward(q, k, v, idx, cu, block, scale, settings_from_token(settings))


def _backward_fake(q, k, v, o, lse, do, cu, idx_c, keys, block, scale, settings):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_op("block_selected_attention_bwd", _backward_fake)
def _backward_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, do: torch.Tensor, cu: torch.Tensor, idx_c: torch.Tensor,
                     keys: torch.Tensor, block: int, scale: float, settings: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward` as a custom op."""
    return _backward(q, k, v, o, lse, do, cu, idx_c, keys, block, scale,
                     settings_from_token(settings))


class _BlockSelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cu, block, scale, settings):
        o, lse, idx_c, keys = _forward_kernel(q, k, v, idx, cu, block, scale, settings.token)
        ctx.save_for_backward(q, k, v, o, lse, cu, idx_c, keys)
        ctx.block, ctx.scale, ctx.settings = block, scale, settings.token
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, idx_c, keys = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _backward_kernel(q, k, v, o, lse, do, cu, idx_c, keys, ctx.block,
                                      ctx.scale, ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def selected_attention_block(q, k, v, idx, cu, block: int, scale: float,
                             settings: KernelSettings) -> torch.Tensor:
    """Block-shared selected attention, ``o [total, H, d]`` (checked arguments; see the module
    docstring for the contract of ``idx``)."""
    rows = block_rows(q.shape[0], cu.numel() - 1, block)
    if idx.dim() != 3 or idx.shape[0] != k.shape[1] or idx.shape[1] != rows:
        raise ValueError(f"block selections must be [{k.shape[1]}, {rows}, T] (total // block + "
                         f"n_docs rows), got {tuple(idx.shape)}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _BlockSelectedAttention.apply(q, k, v, idx, cu, block, scale, settings)
