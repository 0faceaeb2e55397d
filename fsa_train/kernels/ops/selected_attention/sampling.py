"""Random valid selections for tests and benchmarks of the selected branch: what a trained
model's selection looks like (forced first and local blocks, distinct earlier blocks), without
running the scoring."""

from __future__ import annotations

import torch


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
