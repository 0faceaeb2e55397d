"""Token-mode selections split into their forced part and their free part (issue 18).

Every token of query block ``j`` selects the same forced blocks: the first ``init`` blocks and
the ``local`` blocks ending at ``j`` (``select_blocks`` gives them an infinite score). Attention
over a union of key sets is the LSE-weighted merge of attention over each set, so the forced
part can run as block-sparse FlashAttention over query tiles (:mod:`.block_sparse`, no
per-(token, slot) partials) and only the free slots go through the token kernels, whose
partial-output traffic grows with the slots; their merge kernel starts from the forced part's
``(o, lse)``. The backward passes both kernels the merged
output and LSE, which makes each compute its share of the union softmax's gradients exactly.

The split is valid only when every token's selection holds its forced blocks, which
``select_blocks`` guarantees: the caller says so by passing ``forced=(init, local)``.
All helpers run on the device with static shapes (no host synchronisation).
"""

from __future__ import annotations

import torch

from fsa_train.kernels.varlen import block_row_owners, block_rows, document_positions

_PAD = torch.iinfo(torch.int32).max  # sorts after every block id


def forced_count(init_blocks: int, local_blocks: int) -> int:
    """Slots of every full selection that the forced blocks take."""
    return init_blocks + local_blocks


def _sorted_with_padding(ids: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """The kept ids ascending, then -1, in ``width`` slots (int32)."""
    ids = torch.where(keep, ids.to(torch.int32), _PAD)
    ids = torch.sort(ids, dim=-1).values[..., :width]
    return torch.where(ids == _PAD, -1, ids)


def forced_rows(cu_seqlens: torch.Tensor, total: int, block: int, h: int, init_blocks: int,
                local_blocks: int) -> torch.Tensor:
    """The forced blocks of every query block in the block-shared layout
    (:func:`~fsa_train.kernels.varlen.block_rows`): ``[h, total // B + n_docs, init + local]``
    int32, ascending, each block once, -1 padded (padding rows all -1)."""
    n_rows = block_rows(total, cu_seqlens.numel() - 1, block)
    _, j, exists = block_row_owners(cu_seqlens, block, n_rows)
    dev = j.device
    init = torch.arange(init_blocks, device=dev).expand(n_rows, init_blocks)
    local = j[:, None] - local_blocks + 1 + torch.arange(local_blocks, device=dev)[None, :]
    ids = torch.cat([init, local], dim=1)
    keep = exists[:, None] & (ids >= 0) & (ids <= j[:, None])
    keep[:, init_blocks:] &= local >= init_blocks  # a local block that is an init block: once
    rows = _sorted_with_padding(ids, keep, forced_count(init_blocks, local_blocks))
    return rows[None].expand(h, n_rows, rows.shape[1]).contiguous()


def free_selection(idx: torch.Tensor, cu_seqlens: torch.Tensor, block: int, init_blocks: int,
                   local_blocks: int) -> torch.Tensor:
    """``idx [h, total, T]`` without each token's forced blocks (and without entries the kernels
    ignore: -1 and blocks past the token's own), ascending, -1 padded, in ``T - init - local``
    slots: a selection that holds its forced blocks has at most that many others."""
    total = idx.shape[1]
    own = (document_positions(cu_seqlens, total) // block)[None, :, None]
    forced = (idx < init_blocks) | (idx > own - local_blocks)
    keep = (idx >= 0) & (idx <= own) & ~forced
    width = max(0, idx.shape[2] - forced_count(init_blocks, local_blocks))
    return _sorted_with_padding(idx, keep, width)
