"""Fixed-length training windows over a split's token stream, in the packed varlen layout.

Window ``w`` reads stream positions ``[w*seq_len, (w+1)*seq_len]`` (``seq_len + 1`` tokens): the
first ``seq_len`` are the inputs, the last ``seq_len`` the next-token targets. Windows tile the
stream without overlap or padding; only the final remainder (fewer than ``seq_len + 1`` tokens)
is never read as input. ``cu_seqlens`` marks where documents start inside the window, so the
model's attention never crosses documents; a document cut by a window edge simply continues as
a new segment in the next window (its positions restart there, as the model derives positions
from ``cu_seqlens``).

Documents are stored as ``[BOS] + tokens + [EOS]`` (see ``shards``), so a segment that starts a
document starts with BOS, and the EOS target teaches the model where documents end; the target
of a document's last position (its EOS, predicting the next document's BOS) is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from fsa_train.config import ConfigError
from fsa_train.data.shards import TokenDataset

if TYPE_CHECKING:
    from fsa_train.config import NSAConfig
    from fsa_train.data.retrieval_mix import RetrievalMix

IGNORE_INDEX = -100


def check_seq_len(seq_len: int, nsa_cfg: NSAConfig | None) -> None:
    """Raise ``ConfigError`` (one line) unless ``seq_len`` suits the NSA config (None: dense).

    NSA works per document, so any document length is valid; the window length is what the
    kernels tile: it must be a whole number of selection blocks (so every window has the same
    block grid and no partial block at its end) and hold at least one compression window.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"data.seq_len must be a positive integer, got {seq_len!r}")
    if nsa_cfg is None:
        return
    block = nsa_cfg.sel_block
    if seq_len % block:
        raise ConfigError(
            f"data.seq_len={seq_len} must be a multiple of model.config.nsa.sel_block="
            f"{nsa_cfg.sel_block} (e.g. {max(1, round(seq_len / nsa_cfg.sel_block)) * block})"
        )
    if seq_len < nsa_cfg.cmp_kernel:
        raise ConfigError(
            f"data.seq_len={seq_len} is shorter than model.config.nsa.cmp_kernel="
            f"{nsa_cfg.cmp_kernel}: no compressed token would fit in a window"
        )


class PackedWindows(Dataset):
    """Windows of ``seq_len`` tokens over ``tokens``; items are dicts of tensors.

    Item keys: ``input_ids`` int64 [seq_len], ``targets`` int64 [seq_len], ``cu_seqlens`` int32
    [n_segments + 1] (0 first, seq_len last). With ``document_mask=True`` a target that would
    come from the next document is ``IGNORE_INDEX``; with ``False`` the window is one segment and
    targets are the plain next tokens. ``retrieval``: replaces the windows it chooses by
    synthetic retrieval documents (:mod:`~fsa_train.data.retrieval_mix`; training split only).
    """

    def __init__(self, tokens: TokenDataset, seq_len: int, document_mask: bool = True,
                 retrieval: RetrievalMix | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data = tokens
        self.seq_len = seq_len
        self.document_mask = document_mask
        self.retrieval = retrieval
        if retrieval is not None:
            retrieval.check_fits(seq_len)

    def __len__(self) -> int:
        return max(0, (self.data.n_tokens - 1) // self.seq_len)

    def __getitem__(self, w: int) -> dict[str, torch.Tensor]:
        if not 0 <= w < len(self):
            raise IndexError(f"window {w} out of range for {len(self)} windows")
        L = self.seq_len
        start = w * L
        chunk = self.data.read(start, start + L + 1).astype(np.int64)
        if self.retrieval is not None and self.retrieval.chooses(w):
            return self.retrieval.window(w, chunk)
        input_ids = torch.from_numpy(chunk[:-1].copy())
        targets = torch.from_numpy(chunk[1:].copy())
        if not self.document_mask:
            return {
                "input_ids": input_ids,
                "targets": targets,
                "cu_seqlens": torch.tensor([0, L], dtype=torch.int32),
            }
        offsets = self.data.doc_offsets
        # Document starts inside the window (exclusive of its first position): segment edges.
        lo = np.searchsorted(offsets, start, side="right")
        hi = np.searchsorted(offsets, start + L, side="left")
        inner = np.unique(offsets[lo:hi]) - start  # unique: empty documents add no segment
        cu = np.concatenate(([0], inner, [L])).astype(np.int32)
        # Target p is token p+1; it is ignored when p+1 starts a document (p+1 may be L).
        hi_t = np.searchsorted(offsets, start + L, side="right")
        targets[torch.from_numpy(offsets[lo:hi_t] - start - 1)] = IGNORE_INDEX
        return {"input_ids": input_ids, "targets": targets, "cu_seqlens": torch.from_numpy(cu)}


def collate_packed(windows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """Concatenate B windows into one packed batch (no batch dimension).

    Returns ``input_ids`` and ``targets`` int64 [B*seq_len], ``cu_seqlens`` int32 holding every
    window's segments with offsets shifted (a segment never spans two windows), ``max_seqlen``
    (the longest segment, a host int: attention kernels size their grid with it without reading
    ``cu_seqlens`` back from the GPU) and ``n_windows`` = B.
    """
    if not windows:
        raise ValueError("collate_packed needs at least one window")
    cu_parts = [torch.zeros(1, dtype=torch.int32)]
    offset = 0
    for win in windows:
        cu_parts.append(win["cu_seqlens"][1:] + offset)
        offset += win["input_ids"].numel()
    cu_seqlens = torch.cat(cu_parts).to(torch.int32)
    return {
        "input_ids": torch.cat([win["input_ids"] for win in windows]),
        "targets": torch.cat([win["targets"] for win in windows]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0,
        "n_windows": len(windows),
    }
