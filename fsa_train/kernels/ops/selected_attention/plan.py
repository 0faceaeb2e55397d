"""The selected branch's plan: which (token, slot) pairs read each selection block.

Built on the device with static sizes and no host synchronisation (so it runs under CUDA-graph
capture): one kernel cleans the selections and gives every (KV head, token, slot) whose block is
valid the key ``head · nbmax + global block``; a stable sort of the keys (torch) gives the
block -> (token, slot) inverse index (CSR, tokens ascending in each block), ``searchsorted`` its
offsets. The pairs of a block are cut into *segments* of at most ``segq`` pairs, so a block that
every query selects becomes many programs (a balanced grid) and never more memory. The grid is
sized by a static bound on the number of segments; programs past the real count exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from fsa_train.kernels.triton_utils import count_at_most
from fsa_train.kernels.utils import search_steps


@triton.jit
def _plan_keys_kernel(
    IDX, CU, BOFF, IDXC, KEYS,
    s_ih, s_it, s_ik, total, n_docs, n_iter, block, nbmax, nkeys,
    T: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr,
):
    """Clean BT tokens' selections of one KV head and write their sort keys.

    An entry is valid if it is >= 0, not past the token's own block and not a repeat of the
    previous slot (valid ids are sorted, so repeats are adjacent); ``idx_c`` holds the valid ids
    (-1 otherwise), ``keys`` ``head·nbmax + global block`` (``nkeys`` = invalid, sorts last).
    """
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    head = tl.program_id(1)
    tv = tt < total
    doc = tl.minimum(count_at_most(CU + 1, tt, n_docs, n_iter, tv), n_docs - 1)
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


@triton.jit
def _plan_blocks_kernel(
    CU, BOFF, TOK0, TOK1, n_docs, n_iter, block, nbmax, BR: tl.constexpr,
):
    """Token range ``[tok0, tok1)`` of each global block row (0, 0 past the last block)."""
    gb = tl.program_id(0) * BR + tl.arange(0, BR)
    gv = gb < nbmax
    doc = tl.minimum(count_at_most(BOFF + 1, gb, n_docs, n_iter, gv), n_docs - 1)
    doc_start = tl.load(CU + doc, mask=gv, other=0)
    doc_end = tl.load(CU + doc + 1, mask=gv, other=0)
    tok0 = doc_start + (gb - tl.load(BOFF + doc, mask=gv, other=0)) * block
    tok1 = tl.minimum(tok0 + block, doc_end)
    exists = gb < tl.load(BOFF + n_docs)
    tl.store(TOK0 + gb, tl.where(exists, tok0, 0), mask=gv)
    tl.store(TOK1 + gb, tl.where(exists, tok1, 0), mask=gv)


def segment_queries(topk: int, block: int) -> int:
    """Pairs per segment: the average number of queries per block (T·B) in a long document."""
    return max(16, topk * block)


@dataclass
class SelectionPlan:
    """The block -> (token, slot) index of one call (device tensors and static sizes).

    Attributes:
        idx_c: the cleaned selections ``[h, total, T]`` int32: entries that were -1, past the
            token's own block or repeats of the previous slot (valid ids are sorted, so repeats
            are adjacent) are -1.
        pairs: ``token · T + slot`` of every valid entry, grouped by key (CSR values).
        blk_start: ``[nkeys + 1]`` offsets of each key's pairs in ``pairs``.
        seg_key: ``[maxseg]`` the key of each segment (``nkeys`` past the real count).
        seg_off: ``[nkeys + 1]`` the first segment of each key.
        tok0, tok1: ``[nbmax]`` the token range of each global block.
        nbmax: a static bound on the global blocks of one KV head (``total // B + n_docs + 1``).
        nkeys: ``h · nbmax``.
        maxseg: a static bound on the segments (the grid of the block-major kernels).
        segq: pairs per segment.
    """

    idx_c: torch.Tensor
    pairs: torch.Tensor
    blk_start: torch.Tensor
    seg_key: torch.Tensor
    seg_off: torch.Tensor
    tok0: torch.Tensor
    tok1: torch.Tensor
    nbmax: int
    nkeys: int
    maxseg: int
    segq: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The plan's tensors, in field order (for ``ctx.save_for_backward``)."""
        return tuple(getattr(self, f.name) for f in fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor))

    def sizes(self) -> dict[str, int]:
        """The plan's static sizes."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not isinstance(getattr(self, f.name), torch.Tensor)}

    @classmethod
    def rebuild(cls, tensors: tuple[torch.Tensor, ...], sizes: dict[str, int]) -> SelectionPlan:
        """The plan from :meth:`tensors` and :meth:`sizes`."""
        names = [f.name for f in fields(cls) if f.name not in sizes]
        return cls(**dict(zip(names, tensors, strict=True)), **sizes)


def plan_sizes(h: int, total: int, topk: int, n_docs: int, block: int,
               segq: int | None = None) -> dict[str, int]:
    """The static sizes of a :class:`SelectionPlan` (:meth:`SelectionPlan.sizes`): shapes
    alone fix them."""
    segq = segment_queries(topk, block) if segq is None else segq
    nbmax = total // block + n_docs + 1
    nkeys = h * nbmax
    maxseg = -(-h * total * topk // segq) + nkeys
    return {"nbmax": nbmax, "nkeys": nkeys, "maxseg": maxseg, "segq": segq}


def plan_fakes(idx: torch.Tensor, n_docs: int, total: int, block: int) -> list[torch.Tensor]:
    """Empty tensors shaped as :meth:`SelectionPlan.tensors` of ``idx`` (fake implementations)."""
    h, _, topk = idx.shape
    sizes = plan_sizes(h, total, topk, n_docs, block)

    def i32(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int32, device=idx.device)

    nkeys, nbmax = sizes["nkeys"], sizes["nbmax"]
    return [i32(h, total, topk), i32(h * total * topk), i32(nkeys + 1), i32(sizes["maxseg"]),
            i32(nkeys + 1), i32(nbmax), i32(nbmax)]


def build_plan(idx: torch.Tensor, cu_seqlens: torch.Tensor, total: int, block: int,
               segq: int | None = None) -> SelectionPlan:
    """The :class:`SelectionPlan` of selections ``idx [h, total, T]`` (no host synchronisation);
    ``segq`` defaults to :func:`segment_queries`."""
    h, _, topk = idx.shape
    dev = idx.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int32)
    n_docs = cu.numel() - 1
    sizes = plan_sizes(h, total, topk, n_docs, block, segq)
    segq, nbmax, nkeys, maxseg = sizes["segq"], sizes["nbmax"], sizes["nkeys"], sizes["maxseg"]
    i32 = torch.int32

    nblk = torch.div(cu[1:] - cu[:-1] + (block - 1), block, rounding_mode="floor")
    boff = torch.zeros(n_docs + 1, dtype=i32, device=dev)
    boff[1:] = torch.cumsum(nblk, 0)
    n_iter = search_steps(n_docs)
    idx_c = torch.empty((h, total, topk), dtype=i32, device=dev)
    keys = torch.empty(h * total * topk, dtype=i32, device=dev)
    bt = 32
    _plan_keys_kernel[(triton.cdiv(total, bt), h)](
        idx, cu, boff, idx_c, keys, *idx.stride(), total, n_docs, n_iter, block, nbmax,
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
    return SelectionPlan(idx_c, pairs, blk_start, seg_key, seg_off, tok0, tok1,
                         nbmax, nkeys, maxseg, segq)
