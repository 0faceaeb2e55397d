"""The block-shared selected branch's plan: cleaned selections, and which query blocks chose each
key block (a CSR), built on the device in a handful of launches with static sizes (no host
synchronisation, so it runs under CUDA-graph capture).

* :func:`clean_block_selection` (forward; one kernel): each row's valid entries ascending, then
  -1 (an entry is valid if it is >= 0, not past the row's own block, not a repeat, and the row is
  a block of a document), plus the sort key ``head · rows + key-block row`` of every entry
  (``nkeys`` for invalid ones).
* :func:`build_block_csr` (backward): a stable sort of the keys (torch), one kernel for each
  key's entry range and segment counts, one ``cumsum``, one kernel for the entries' query rows
  and each segment's key. A key block that more than ``segq`` query blocks chose is cut into
  several segments (balanced dK/dV programs); only those keys get fp32 partials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fsa_train.kernels.triton_utils import count_at_most, locate_tile
from fsa_train.kernels.utils import search_steps

_BIG = tl.constexpr(2147483647)


@triton.jit
def _clean_kernel(
    IDX, CU, IDXC, KEYS,
    si_h, si_r, si_k, n_rows, n_docs, n_iter, nkeys,
    B: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, BR: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    head = tl.program_id(1)
    rv = rows < n_rows
    doc, bos, seqlen, start = locate_tile(CU, rows, n_docs, n_iter, B)
    own = start // B
    exists = rv & (start < seqlen)
    slots = tl.arange(0, TP)
    m = rv[:, None] & (slots[None, :] < T)
    ids = tl.load(IDX + head.to(tl.int64) * si_h + rows.to(tl.int64)[:, None] * si_r
                  + slots[None, :] * si_k, mask=m, other=-1).to(tl.int32)
    ok = (ids >= 0) & (ids <= own[:, None]) & exists[:, None]
    # a repeat: an earlier valid slot of the row holds the same id
    same = (ids[:, :, None] == ids[:, None, :]) & ok[:, None, :]
    earlier = slots[None, :, None] > slots[None, None, :]
    repeat = tl.max((same & earlier).to(tl.int32), 2) > 0
    ok = ok & ~repeat
    ids = tl.sort(tl.where(ok, ids, _BIG), dim=1)  # valid ids first, ascending
    valid = ids != _BIG
    flat = (head.to(tl.int64) * n_rows + rows)[:, None] * T + slots[None, :]
    tl.store(IDXC + flat, tl.where(valid, ids, -1), mask=m)
    first = bos // B + doc  # the row of the document's block 0
    key = head * n_rows + first[:, None] + ids
    tl.store(KEYS + flat, tl.where(valid, key, nkeys), mask=m)


@triton.jit
def _lower_bound(SORTED, x, n, n_iter, mask):
    """For each ``x``: how many of the ascending ``SORTED[0..n)`` are ``< x``."""
    return count_at_most(SORTED, x - 1, n, n_iter, mask)


@triton.jit
def _csr_kernel(SKEYS, KEY_START, COUNTS, n_entries, n_iter, nkeys, segq, BK: tl.constexpr):
    """Each key's first entry in the sorted keys, its segments and (keys of several segments)
    its number of fp32 partials."""
    key = tl.program_id(0) * BK + tl.arange(0, BK)
    kv = key <= nkeys
    start = _lower_bound(SKEYS, key, n_entries, n_iter, kv)
    tl.store(KEY_START + key, start, mask=kv)
    real = key < nkeys
    count = _lower_bound(SKEYS, key + 1, n_entries, n_iter, real) - start
    n_seg = (count + segq - 1) // segq
    tl.store(COUNTS + key, n_seg, mask=real)
    tl.store(COUNTS + nkeys + key, tl.where(n_seg > 1, n_seg, 0), mask=real)


@triton.jit
def _segments_kernel(PERM, Q_ROWS, ENDS, SEG_KEY, n_entries, maxseg, nkeys, n_rows, n_iter,
                     T: tl.constexpr, BE: tl.constexpr):
    """The query row of every sorted entry, and the key of every segment (``nkeys`` past the
    last)."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    ev = e < n_entries
    perm = tl.load(PERM + e, mask=ev, other=0)
    tl.store(Q_ROWS + e, ((perm // T) % n_rows).to(tl.int32), mask=ev)
    sv = e < maxseg
    seg_key = count_at_most(ENDS, e, nkeys, n_iter, sv)
    tl.store(SEG_KEY + e, seg_key, mask=sv)


def clean_block_selection(idx: torch.Tensor, cu_seqlens: torch.Tensor,
                          block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_c [h, rows, T], keys [h·rows·T])``: the valid entries of each row ascending then
    -1, and every entry's CSR key (see the module docstring). ``cu_seqlens`` int32."""
    h, n_rows, topk = idx.shape
    idx_c = torch.empty((h, n_rows, topk), dtype=torch.int32, device=idx.device)
    keys = torch.empty(h * n_rows * topk, dtype=torch.int32, device=idx.device)
    n_docs = cu_seqlens.numel() - 1
    br = 16
    _clean_kernel[(triton.cdiv(n_rows, br), h)](
        idx, cu_seqlens, idx_c, keys, *idx.stride(), n_rows, n_docs, search_steps(n_docs),
        h * n_rows, B=block, T=topk, TP=triton.next_power_of_2(max(topk, 2)), BR=br,
        num_warps=4,
    )
    return idx_c, keys


def segment_query_blocks(topk: int) -> int:
    """Query blocks per dK/dV segment: four times the average (T) of a long document's blocks, so
    a block every query chose splits into a few segments and nothing else does."""
    return max(8, 4 * topk)


@dataclass
class BlockCSR:
    """Which query blocks chose each key block (device tensors and static sizes).

    Attributes:
        q_rows: the query-block rows of every valid entry, grouped by key (ascending within one).
        key_start: ``[nkeys + 1]`` each key's first entry in ``q_rows``.
        seg_key: ``[maxseg]`` each segment's key (``nkeys`` past the real count).
        counts: ``[2, nkeys]`` each key's segments, and its fp32 partials (0 for one segment).
        ends: ``[2, nkeys]`` the inclusive cumulative sums of ``counts``.
        n_rows, nkeys, maxseg, n_part, segq: rows of the per-block layout, ``h · rows``, bounds
            on the segments and on the partials, query blocks per segment.
    """

    q_rows: torch.Tensor
    key_start: torch.Tensor
    seg_key: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    n_rows: int
    nkeys: int
    maxseg: int
    n_part: int
    segq: int

    def first_segment(self, key: int) -> int:
        """The first segment of ``key`` (host side, for tests)."""
        return int(self.ends[0, key] - self.counts[0, key])

    def partial_offset(self, key: int) -> int:
        """The first fp32 partial of ``key``, -1 for a key of one segment (host, for tests)."""
        multi = int(self.counts[1, key])
        return int(self.ends[1, key]) - multi if multi else -1


def build_block_csr(keys: torch.Tensor, h: int, n_rows: int, topk: int,
                    segq: int | None = None) -> BlockCSR:
    """The :class:`BlockCSR` of the ``keys`` of :func:`clean_block_selection` (no host sync)."""
    segq = segment_query_blocks(topk) if segq is None else segq
    dev = keys.device
    nkeys = h * n_rows
    n_entries = keys.numel()
    skeys, perm = torch.sort(keys, stable=True)
    key_start = torch.empty(nkeys + 1, dtype=torch.int32, device=dev)
    counts = torch.empty((2, nkeys), dtype=torch.int32, device=dev)
    bk = 256
    _csr_kernel[(triton.cdiv(nkeys + 1, bk),)](
        skeys, key_start, counts, n_entries, search_steps(n_entries), nkeys, segq, BK=bk,
        num_warps=4,
    )
    ends = torch.cumsum(counts, dim=1, dtype=torch.int32)
    maxseg = -(-n_entries // segq) + nkeys
    q_rows = torch.empty(n_entries, dtype=torch.int32, device=dev)
    seg_key = torch.empty(maxseg, dtype=torch.int32, device=dev)
    be = 1024
    _segments_kernel[(triton.cdiv(max(n_entries, maxseg), be),)](
        perm, q_rows, ends, seg_key, n_entries, maxseg, nkeys, n_rows, search_steps(nkeys),
        T=topk, BE=be, num_warps=4,
    )
    n_part = 2 * n_entries // segq + 1  # keys of several segments: n_seg < 2 · count / segq
    return BlockCSR(q_rows, key_start, seg_key, counts, ends, n_rows, nkeys, maxseg, n_part,
                    segq)

