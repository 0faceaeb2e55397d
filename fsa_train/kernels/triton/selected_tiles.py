"""Selected-block attention (NSA's selected branch) in a *tile-union* loop order (experimental).

``selected_attention_tiles(q, k, v, idx, cu_seqlens, block, scale=None, tile=16)`` computes the
same thing as :func:`fsa_train.kernels.reference.selected_attention`: query head ``j`` (KV head
``j // G``) at document-local position ``t`` attends the keys of the blocks ``idx[j // G, t, :]``
(-1 and ids past the query's block ignored, repeats counted once) with key position ``<= t``.
It is opt-in: :mod:`fsa_train.kernels` keeps dispatching to the block-major kernels of
:mod:`fsa_train.kernels.triton.selected_attention`.

Design (no fp32 partials, no atomics, deterministic, no host synchronisation):

* **Tiles.** ``tile`` consecutive tokens of one document, aligned to the document start; at most
  ``total // tile + n_docs`` of them, the static grid size (programs past the last tile exit).
* **Plan** (:func:`tile_plan`, torch ops on the device): per (KV head, tile) the ascending union
  of the valid block ids its tokens select (``union``, ``count``), from one sort of the keys
  ``tile · NB + block``; and the inverse index, per (KV head, global block) the tiles whose union
  holds it (CSR ``block_tiles_start`` / ``block_tiles``), from a second sort.
* **Forward** (:func:`_fwd_kernel`): one program per (tile, KV head), rows = the tile's tokens x
  the G query heads (row ``r``: token ``r // G``, head ``r % G``), Q and the tile's selections
  loaded once; online softmax (base 2, fp32 statistics, true running max) over the union blocks,
  each masked by "this row's token selected the block" and token-level causality. Writes ``o``
  and the natural-log LSE ``[total, H]`` (fp32, ``-inf`` where nothing is visible).
* **Backward.** ``delta = rowsum(o · do)`` (:func:`.common.attention_delta`), then dQ with the
  forward's grid and loop (:func:`_dq_kernel`), and dK/dV with one program per (global block,
  KV head) looping over the tiles of the inverse index (:func:`_dkdv_kernel`), the G heads'
  contributions summed through the stacked rows: each key row belongs to one block, so both
  write their results directly.

Extra memory: the plan, O(h · total · topk) ints (two int64 sorts of that size while it is built).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

import torch
import triton
import triton.language as tl

from fsa_train.kernels.triton.common import attention_delta
from fsa_train.kernels.triton.selected_attention import _dot

__all__ = ["TilePlan", "selected_attention_tiles", "tile_plan"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NUM_WARPS = 4
_NUM_STAGES = 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SIZES = (16, 32, 64, 128)


# --------------------------------------------------------------------------------------------
# plan: per-tile block unions and the block -> tiles inverse index (torch, no synchronisation)
# --------------------------------------------------------------------------------------------


@dataclass
class TilePlan:
    """Device tensors of :func:`tile_plan` (int32, contiguous) and its static sizes.

    Tiles and global blocks past the real ones have an empty token range (``t0 = t1 = 0``).
    """

    token_tile: torch.Tensor
    """``[total]``: the tile of every token."""
    tile_t0: torch.Tensor
    """``[n_tiles_cap]``: first token (packed index) of each tile."""
    tile_t1: torch.Tensor
    """``[n_tiles_cap]``: one past the tile's last token."""
    tile_s0: torch.Tensor
    """``[n_tiles_cap]``: start of the tile's document."""
    union: torch.Tensor
    """``[h, n_tiles_cap, width]``: the tile's valid selected blocks (document-local), ascending,
    -1 padded; ``width = min(tile · topk, total // block + 1)``."""
    count: torch.Tensor
    """``[h, n_tiles_cap]``: number of blocks in each union."""
    block_k0: torch.Tensor
    """``[n_blocks_cap]``: first key row of each global block (documents' blocks in order)."""
    block_k1: torch.Tensor
    """``[n_blocks_cap]``: one past the block's last key row (clipped to its document)."""
    block_u: torch.Tensor
    """``[n_blocks_cap]``: the block's document-local id."""
    block_tiles_start: torch.Tensor
    """``[h, n_blocks_cap + 1]``: CSR offsets into ``block_tiles``."""
    block_tiles: torch.Tensor
    """``[h, cap]``: for each global block, the tiles whose union holds it, ascending; -1 pads."""

    @property
    def n_tiles_cap(self) -> int:
        return self.tile_t0.shape[0]

    @property
    def n_blocks_cap(self) -> int:
        return self.block_k0.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return astuple(self)

    @classmethod
    def from_tensors(cls, tensors) -> TilePlan:
        return cls(**dict(zip((f.name for f in fields(cls)), tensors, strict=True)))


def _offsets(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Exclusive cumsum ``[n_docs + 1]`` of ``ceil(length / size)`` (pieces per document)."""
    pieces = torch.div(lengths + (size - 1), size, rounding_mode="floor")
    off = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
    off[1:] = torch.cumsum(pieces, 0)
    return off


def _pieces(cu: torch.Tensor, off: torch.Tensor, size: int, cap: int):
    """Token range ``[p0, p1)``, document start and document of the ``cap`` piece slots."""
    n_docs = cu.numel() - 1
    j = torch.arange(cap, device=cu.device, dtype=torch.int64)
    doc = torch.searchsorted(off[1:].contiguous(), j, right=True).clamp_max(n_docs - 1)
    exists = j < off[-1]
    s0 = cu[doc]
    p0 = s0 + (j - off[doc]) * size
    p1 = torch.minimum(p0 + size, cu[doc + 1])
    zero = torch.zeros_like(p0)
    return torch.where(exists, p0, zero), torch.where(exists, p1, zero), s0, doc


def tile_plan(idx: torch.Tensor, cu_seqlens: torch.Tensor, block: int, tile: int) -> TilePlan:
    """Per-(KV head, tile) unions of the selected blocks and their inverse index.

    Runs on ``idx``'s device with torch ops of static sizes only (no host synchronisation). A
    (token, slot) entry counts if its id is ``>= 0`` and not past the token's own block.

    Args:
        idx: ``[h, total, topk]`` document-local block ids (any int dtype, any strides).
        cu_seqlens: ``[n_docs + 1]`` document boundaries, ``n_docs >= 1``.
        block: selection block size; tile: tokens per tile.
    """
    h, total, topk = idx.shape
    dev = idx.device
    i64 = torch.int64
    cu = cu_seqlens.to(device=dev, dtype=i64)
    n_docs = cu.numel() - 1
    n_tiles = total // tile + n_docs
    n_blocks = total // block + n_docs
    nbl = total // block + 1  # > every valid document-local block id
    width = max(1, min(tile * topk, nbl))
    n_entries = total * topk

    lengths = cu[1:] - cu[:-1]
    tile_off = _offsets(lengths, tile)
    blk_off = _offsets(lengths, block)
    tile_t0, tile_t1, tile_s0, tile_doc = _pieces(cu, tile_off, tile, n_tiles)
    block_k0, block_k1, block_s0, _ = _pieces(cu, blk_off, block, n_blocks)
    block_u = torch.div(block_k0 - block_s0, block, rounding_mode="floor").clamp_min(0)

    tok = torch.arange(total, device=dev, dtype=i64)
    doc = torch.searchsorted(cu[1:].contiguous(), tok, right=True)
    local = tok - cu[doc]
    token_tile = tile_off[doc] + torch.div(local, tile, rounding_mode="floor")
    own = torch.div(local, block, rounding_mode="floor")

    # one key per valid (token, slot): tile * nbl + block; sorted per head, first occurrences kept
    ids = idx.to(i64)
    valid = (ids >= 0) & (ids <= own[None, :, None])
    sentinel = n_tiles * nbl
    keys = torch.where(valid, token_tile[None, :, None] * nbl + ids, sentinel)
    skey = torch.sort(keys.reshape(h, n_entries), dim=1).values
    first = skey != sentinel
    first[:, 1:] &= skey[:, 1:] != skey[:, :-1]
    incl = torch.cumsum(first, dim=1)  # firsts among skey[: i + 1]
    incl0 = torch.cat([incl.new_zeros(h, 1), incl], dim=1)  # firsts among skey[: i]

    # count and compacted union per tile (gathers only: deterministic)
    bounds = torch.arange(n_tiles + 1, device=dev, dtype=i64) * nbl
    tile_pos = torch.searchsorted(skey, bounds.expand(h, -1).contiguous())  # [h, n_tiles + 1]
    before = incl0.gather(1, tile_pos)
    count = before[:, 1:] - before[:, :-1]
    slot = torch.arange(width, device=dev, dtype=i64)
    rank = (before[:, :-1, None] + slot).reshape(h, n_tiles * width)  # rank among all firsts
    where = torch.searchsorted(incl, rank + 1).clamp_max(n_entries - 1)
    blocks = torch.remainder(skey.gather(1, where), nbl).reshape(h, n_tiles, width)
    union = torch.where(slot < count[..., None], blocks, -1)

    # inverse index: sort the distinct (global block, tile) pairs
    s_tile = torch.div(skey, nbl, rounding_mode="floor").clamp_max(n_tiles - 1)
    gblock = blk_off[tile_doc[s_tile]] + torch.remainder(skey, nbl)
    sentinel2 = n_blocks * n_tiles
    pairs = torch.where(first, gblock * n_tiles + s_tile, sentinel2)
    cap = min(n_entries, n_tiles * width)
    spairs = torch.sort(pairs, dim=1).values[:, :cap].contiguous()
    block_tiles = torch.where(spairs != sentinel2, torch.remainder(spairs, n_tiles), -1)
    bounds2 = torch.arange(n_blocks + 1, device=dev, dtype=i64) * n_tiles
    block_tiles_start = torch.searchsorted(spairs, bounds2.expand(h, -1).contiguous())

    i32 = torch.int32
    return TilePlan(
        token_tile=token_tile.to(i32),
        tile_t0=tile_t0.to(i32),
        tile_t1=tile_t1.to(i32),
        tile_s0=tile_s0.to(i32),
        union=union.to(i32).contiguous(),
        count=count.to(i32).contiguous(),
        block_k0=block_k0.to(i32),
        block_k1=block_k1.to(i32),
        block_u=block_u.to(i32),
        block_tiles_start=block_tiles_start.to(i32).contiguous(),
        block_tiles=block_tiles.to(i32).contiguous(),
    )


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(t0, t1, hh, G: tl.constexpr, TILE: tl.constexpr, RP: tl.constexpr):
    """Rows of a tile: token ``t0 + r // G`` (packed index), query head ``hh·G + r % G``."""
    r = tl.arange(0, RP)
    t = t0 + r // G
    head = hh * G + r % G
    rv = (r < TILE * G) & (t < t1)
    return t, t.to(tl.int64), head, rv


@triton.jit
def _load_rows(X, t64, head, rv, sxt, sxh, sxd, D: tl.constexpr):
    offs_d = tl.arange(0, D)
    return tl.load(X + t64[:, None] * sxt + head[:, None] * sxh + offs_d[None, :] * sxd,
                   mask=rv[:, None], other=0.0)


@triton.jit
def _load_ids(IDX, hh, t64, rv, s_ih, s_it, s_ik, T: tl.constexpr, TP: tl.constexpr):
    """The selections ``[RP, TP]`` of the rows' tokens (-1 for padding)."""
    slots = tl.arange(0, TP)
    ptr = IDX + hh.to(tl.int64) * s_ih + t64[:, None] * s_it + slots[None, :] * s_ik
    return tl.load(ptr, mask=rv[:, None] & (slots < T)[None, :], other=-1).to(tl.int32)


@triton.jit
def _visible(ids, u, rv, t, kpos):
    """``[RP, BLOCK]``: the row's token selected block ``u`` and the key is not in its future."""
    sel = (tl.sum((ids == u).to(tl.int32), 1) > 0) & rv
    return sel[:, None] & (kpos[None, :] <= t[:, None])


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, UNION, COUNT, TT0, TT1, TS0, O, LSE,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, s_ih, s_it, s_ik, sot, soh, sod,
    n_tiles, width, scale_log2,
    G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
    TILE: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    ti = tl.program_id(0)
    hh = tl.program_id(1)
    t0 = tl.load(TT0 + ti)
    t1 = tl.load(TT1 + ti)
    if t1 <= t0:
        return
    s0 = tl.load(TS0 + ti)
    t, t64, head, rv = _tile_rows(t0, t1, hh, G, TILE, RP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    q = _load_rows(Q, t64, head, rv, sqt, sqh, sqd, D)
    ids = _load_ids(IDX, hh, t64, rv, s_ih, s_it, s_ik, T, TP)
    m = tl.full([RP], float("-inf"), tl.float32)
    lsum = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D], tl.float32)
    ubase = (hh * n_tiles + ti).to(tl.int64) * width
    cnt = tl.load(COUNT + hh * n_tiles + ti)
    for i in range(0, cnt):
        u = tl.load(UNION + ubase + i)
        kpos = s0 + u * BLOCK + offs_n
        k64 = kpos.to(tl.int64)
        kin = (kpos < t1)[:, None]  # any visible key is before the tile's end
        k = tl.load(K + k64[:, None] * skt + hh * skh + offs_d[None, :] * skd, mask=kin, other=0.0)
        v = tl.load(V + k64[:, None] * svt + hh * svh + offs_d[None, :] * svd, mask=kin, other=0.0)
        vis = _visible(ids, u, rv, t, kpos)
        s = tl.where(vis, _dot(q, tl.trans(k), IEEE) * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    seen = lsum > 0
    o = acc / tl.where(seen, lsum, 1.0)[:, None]
    tl.store(O + t64[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=rv[:, None])
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, lsum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + t64 * H + head, lse, mask=rv)


@triton.jit
def _load_stats(LSE, DELTA, t64, head, rv, total, H: tl.constexpr):
    """Base-2 LSE (0 where it is -inf: such rows see no key) and delta of the rows."""
    lse = tl.load(LSE + t64 * H + head, mask=rv, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + head.to(tl.int64) * total + t64, mask=rv, other=0.0)
    return lse2, delta


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, UNION, COUNT, TT0, TT1, TS0, DQ,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, s_ih, s_it, s_ik,
    sgt, sgh, sgd,
    total, n_tiles, width, scale, scale_log2,
    G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
    TILE: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    ti = tl.program_id(0)
    hh = tl.program_id(1)
    t0 = tl.load(TT0 + ti)
    t1 = tl.load(TT1 + ti)
    if t1 <= t0:
        return
    s0 = tl.load(TS0 + ti)
    t, t64, head, rv = _tile_rows(t0, t1, hh, G, TILE, RP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    q = _load_rows(Q, t64, head, rv, sqt, sqh, sqd, D)
    do = _load_rows(DO, t64, head, rv, sdt, sdh, sdd, D)
    lse2, delta = _load_stats(LSE, DELTA, t64, head, rv, total, H)
    ids = _load_ids(IDX, hh, t64, rv, s_ih, s_it, s_ik, T, TP)
    dq = tl.zeros([RP, D], tl.float32)
    ubase = (hh * n_tiles + ti).to(tl.int64) * width
    cnt = tl.load(COUNT + hh * n_tiles + ti)
    for i in range(0, cnt):
        u = tl.load(UNION + ubase + i)
        kpos = s0 + u * BLOCK + offs_n
        k64 = kpos.to(tl.int64)
        kin = (kpos < t1)[:, None]
        k = tl.load(K + k64[:, None] * skt + hh * skh + offs_d[None, :] * skd, mask=kin, other=0.0)
        v = tl.load(V + k64[:, None] * svt + hh * svh + offs_d[None, :] * svd, mask=kin, other=0.0)
        vis = _visible(ids, u, rv, t, kpos)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + t64[:, None] * sgt + head[:, None] * sgh + offs_d[None, :] * sgd,
             (dq * scale).to(DQ.dtype.element_ty), mask=rv[:, None])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BT_START, BTILES, TT0, TT1, BK0, BK1, BU, DK, DV,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sdt, sdh, sdd, s_ih, s_it, s_ik,
    sdkt, sdkh, sdkd, sdvt, sdvh, sdvd,
    total, n_blocks, cap, scale, scale_log2,
    G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
    TILE: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    gb = tl.program_id(0)
    hh = tl.program_id(1)
    k0 = tl.load(BK0 + gb)
    k1 = tl.load(BK1 + gb)
    if k1 <= k0:
        return
    u = tl.load(BU + gb)
    offs_d = tl.arange(0, D)
    kpos = k0 + tl.arange(0, BLOCK)
    k64 = kpos.to(tl.int64)
    kin = (kpos < k1)[:, None]
    k = tl.load(K + k64[:, None] * skt + hh * skh + offs_d[None, :] * skd, mask=kin, other=0.0)
    v = tl.load(V + k64[:, None] * svt + hh * svh + offs_d[None, :] * svd, mask=kin, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    row0 = hh * (n_blocks + 1) + gb
    j0 = tl.load(BT_START + row0)
    j1 = tl.load(BT_START + row0 + 1)
    tbase = hh.to(tl.int64) * cap
    for j in range(j0, j1):
        ti = tl.load(BTILES + tbase + j)
        t0 = tl.load(TT0 + ti)
        t1 = tl.load(TT1 + ti)
        t, t64, head, rv = _tile_rows(t0, t1, hh, G, TILE, RP)
        q = _load_rows(Q, t64, head, rv, sqt, sqh, sqd, D)
        do = _load_rows(DO, t64, head, rv, sdt, sdh, sdd, D)
        lse2, delta = _load_stats(LSE, DELTA, t64, head, rv, total, H)
        ids = _load_ids(IDX, hh, t64, rv, s_ih, s_it, s_ik, T, TP)
        vis = _visible(ids, u, rv, t, kpos)
        s = _dot(q, kt, IEEE) * scale_log2
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    tl.store(DK + k64[:, None] * sdkt + hh * sdkh + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=kin)
    tl.store(DV + k64[:, None] * sdvt + hh * sdvh + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kin)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _meta(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, block: int, tile: int) -> dict:
    H, D = q.shape[1], q.shape[2]
    G = H // k.shape[1]
    T = idx.shape[2]
    return {
        "G": G, "H": H, "D": D, "T": T, "TP": max(2, triton.next_power_of_2(T)), "TILE": tile,
        "RP": max(16, triton.next_power_of_2(tile * G)), "BLOCK": block,
        "IEEE": q.dtype == torch.float32, "num_warps": _NUM_WARPS,
        # fp32 tiles need twice the shared memory: d = B = 128 with 64 rows only fits one stage
        "num_stages": 1 if q.dtype == torch.float32 else _NUM_STAGES,
    }


def _forward(q, k, v, idx, plan: TilePlan, block, scale, tile):
    """``o [total, H, d]`` (q's dtype) and the natural-log ``lse [total, H]`` (fp32)."""
    total, H, D = q.shape
    h = k.shape[1]
    o = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(total, H, dtype=torch.float32, device=q.device)
    n_tiles, width = plan.n_tiles_cap, plan.union.shape[2]
    _fwd_kernel[(n_tiles, h)](
        q, k, v, idx, plan.union, plan.count, plan.tile_t0, plan.tile_t1, plan.tile_s0, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *o.stride(),
        n_tiles, width, scale * _LOG2E,
        **_meta(q, k, idx, block, tile),
    )
    return o, lse


def _backward(q, k, v, idx, o, lse, do, plan: TilePlan, block, scale, tile):
    total, H, D = q.shape
    h = k.shape[1]
    delta = attention_delta(o, do)
    meta = _meta(q, k, idx, block, tile)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(total, h, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(total, h, D, dtype=v.dtype, device=v.device)
    n_tiles, width = plan.n_tiles_cap, plan.union.shape[2]
    _dq_kernel[(n_tiles, h)](
        q, k, v, do, lse, delta, idx, plan.union, plan.count, plan.tile_t0, plan.tile_t1,
        plan.tile_s0, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *idx.stride(), *dq.stride(),
        total, n_tiles, width, scale, scale * _LOG2E,
        **meta,
    )
    n_blocks, cap = plan.n_blocks_cap, plan.block_tiles.shape[1]
    _dkdv_kernel[(n_blocks, h)](
        q, k, v, do, lse, delta, idx, plan.block_tiles_start, plan.block_tiles, plan.tile_t0,
        plan.tile_t1, plan.block_k0, plan.block_k1, plan.block_u, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *idx.stride(),
        *dk.stride(), *dv.stride(),
        total, n_blocks, cap, scale, scale * _LOG2E,
        **meta,
    )
    return dq, dk, dv


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its last dimension is unit-stride, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _SelectedTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, cu_seqlens, block, scale, tile):
        q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
        plan = tile_plan(idx, cu_seqlens, block, tile)
        o, lse = _forward(q, k, v, idx, plan, block, scale, tile)
        ctx.save_for_backward(q, k, v, idx, o, lse, *plan.tensors())
        ctx.block, ctx.scale, ctx.tile = block, scale, tile
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse, *tensors = ctx.saved_tensors
        plan = TilePlan.from_tensors(tensors)
        dq, dk, dv = _backward(
            q, k, v, idx, o, lse, _rowmajor(do), plan, ctx.block, ctx.scale, ctx.tile
        )
        return dq, dk, dv, None, None, None, None, None


def _check(q, k, v, idx, cu_seqlens, block, tile) -> None:
    """One-line ``ValueError`` for inputs the kernels do not take."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [tokens, heads, dim]: {q.shape}, {k.shape}, {v.shape}")
    total, H, D = q.shape
    h = k.shape[1]
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != D or H % h:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32: {q.dtype} {k.dtype} {v.dtype}")
    if D not in _SIZES or block not in _SIZES:
        raise ValueError(f"head dim ({D}) and block ({block}) must be one of {_SIZES}")
    if idx.dim() != 3 or idx.shape[:2] != (h, total) or idx.shape[2] < 1:
        raise ValueError(f"idx must be [{h}, {total}, topk >= 1], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (
        torch.int32, torch.int64
    ):
        raise ValueError(f"cu_seqlens must be int32/int64 [n_docs + 1 >= 2], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if not isinstance(tile, int) or tile < 1 or tile * (H // h) < 16:
        raise ValueError(f"tile ({tile}) x G ({H // h}) must be at least 16")


def selected_attention_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block: int,
    scale: float | None = None,
    tile: int = 16,
) -> torch.Tensor:
    """Selected-block attention ``o [total, H, d]`` in q's dtype, tile-union order (differentiable
    in q, k, v).

    Args:
        q: ``[total, H, d]``; k, v: ``[total, h, d]`` with ``H % h == 0``; fp16, bf16 or fp32, any
            strides; ``d`` in 16, 32, 64, 128.
        idx: ``[h, total, topk]`` int32 document-local block ids, valid ones ascending, -1 pads.
        cu_seqlens: ``[n_docs + 1]`` document boundaries.
        block: selection block size B (16, 32, 64 or 128).
        scale: softmax scale, default ``1/sqrt(d)``.
        tile: query tokens per program; ``tile · G`` (matmul rows) must be at least 16.
    """
    _check(q, k, v, idx, cu_seqlens, block, tile)
    total, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if total == 0:
        return q.new_zeros(0, H, D)
    return _SelectedTiles.apply(q, k, v, idx, cu_seqlens, block, scale, tile)
