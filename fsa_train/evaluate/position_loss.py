"""Validation loss bucketed by token position: does the model keep up late in long documents?

The position of a token is its index in its packed segment (``cu_seqlens``), i.e. how many
earlier tokens the model could attend to: the same positions the model itself uses. A target
at position ``p`` is predicted from ``p + 1`` tokens of context.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fsa_train.evaluate.runtime import add_model_arguments, load_model, precision, write_result
from fsa_train.kernels.varlen import document_positions

IGNORE_INDEX = -100


@torch.no_grad()
def token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk: int | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of every target (float32 ``[total]``; 0 where the target is -100).

    Logits are computed ``chunk`` tokens at a time (default: the model's ``loss_chunk``);
    ``max_seqlen``: the batch's longest document, when known.
    """
    hidden = model(input_ids, cu_seqlens, max_seqlen)
    chunk = chunk or model.cfg.loss_chunk
    parts = [
        F.cross_entropy(model.head(h).float(), t, ignore_index=IGNORE_INDEX, reduction="none")
        for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.cat(parts)


def bucket_edges(spec: str | Sequence[int], seq_len: int) -> list[int]:
    """Bucket start positions, the first 0.

    ``"pow2"``: 0, 1, 2, 4, 8, ... below ``seq_len``; an integer (or its string) ``w``: fixed
    width ``w``; a comma-separated string or a sequence: explicit starts.
    """
    if isinstance(spec, str) and spec == "pow2":
        edges = [0] + [1 << i for i in range(max(1, seq_len).bit_length()) if 1 << i < seq_len]
    elif isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        width = int(spec)
        if width < 1:
            raise ValueError(f"bucket width must be >= 1, got {width}")
        edges = list(range(0, seq_len, width))
    else:
        parts = spec.split(",") if isinstance(spec, str) else spec
        edges = sorted({int(p) for p in parts})
    if not edges or edges[0] != 0:
        edges = [0, *[e for e in edges if e > 0]]
    return edges


class PositionLoss:
    """Sums and counts of per-token losses in position buckets (float64, on the host)."""

    def __init__(self, edges: Sequence[int]) -> None:
        self.edges = np.asarray(edges, dtype=np.int64)
        if self.edges[0] != 0 or np.any(np.diff(self.edges) <= 0):
            raise ValueError(f"bucket edges must start at 0 and increase, got {list(edges)}")
        self.sums = np.zeros(len(self.edges), dtype=np.float64)
        self.counts = np.zeros(len(self.edges), dtype=np.int64)

    def update(self, losses: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the losses of one batch; targets equal to -100 are skipped."""
        keep = targets != IGNORE_INDEX
        loss = losses[keep].double().cpu().numpy()
        pos = positions[keep].cpu().numpy()
        bucket = np.searchsorted(self.edges, pos, side="right") - 1
        self.sums += np.bincount(bucket, weights=loss, minlength=len(self.edges))
        self.counts += np.bincount(bucket, minlength=len(self.edges))

    def result(self) -> dict:
        """``{"loss", "tokens", "buckets": [{"start", "end", "tokens", "loss"}, ...]}``; a
        bucket's ``end`` is exclusive (None for the last) and its loss None when it is empty."""
        buckets = []
        for i, start in enumerate(self.edges.tolist()):
            end = int(self.edges[i + 1]) if i + 1 < len(self.edges) else None
            count = int(self.counts[i])
            loss = float(self.sums[i] / count) if count else None
            buckets.append({"start": start, "end": end, "tokens": count, "loss": loss})
        total = int(self.counts.sum())
        overall = float(self.sums.sum() / total) if total else None
        return {"loss": overall, "tokens": total, "buckets": buckets}


def position_loss(
    model: torch.nn.Module,
    batches: Iterable[dict],
    edges: Sequence[int],
    device: torch.device | None = None,
    precision_name: str = "auto",
) -> dict:
    """Mean loss per position bucket over ``batches`` (dicts with ``input_ids``, ``targets``,
    ``cu_seqlens``, as ``TextDataModule`` yields them)."""
    device = device or next(model.parameters()).device
    totals = PositionLoss(edges)
    for batch in batches:
        ids = batch["input_ids"].to(device)
        targets = batch["targets"].to(device)
        cu_seqlens = batch["cu_seqlens"].to(device)
        with precision(device, precision_name):
            losses = token_losses(model, ids, targets, cu_seqlens,
                                  max_seqlen=batch.get("max_seqlen"))
        totals.update(losses, document_positions(cu_seqlens, ids.numel()), targets)
    return totals.result()


def format_buckets(result: dict) -> str:
    """A Markdown table of the buckets."""
    lines = ["| positions | tokens | loss |", "|---|---|---|"]
    for b in result["buckets"]:
        span = f"{b['start']}–{b['end'] - 1}" if b["end"] is not None else f"{b['start']}+"
        loss = f"{b['loss']:.4f}" if b["loss"] is not None else "–"
        lines.append(f"| {span} | {b['tokens']} | {loss} |")
    overall = f"{result['loss']:.4f}" if result["loss"] is not None else "–"
    lines.append(f"\noverall: {overall} over {result['tokens']} tokens")
    return "\n".join(lines)


def position_loss_main(argv: list[str]) -> None:
    """``fsa-train position-loss EXPORTED DATASET --seq_len 8192 --batches 50 --buckets pow2``."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="fsa-train position-loss",
                                     description="Validation loss bucketed by token position.")
    add_model_arguments(parser)
    parser.add_argument("dataset", help="directory written by `fsa-train prepare-data`")
    parser.add_argument("--split", default="val", choices=["val", "train"])
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=1, help="windows per batch")
    parser.add_argument("--batches", type=int, default=None, help="default: the whole split")
    parser.add_argument("--buckets", default="pow2",
                        help="'pow2', a fixed width (e.g. 1024) or comma-separated starts")
    parser.add_argument("--document_mask", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    from fsa_train.data.packing import PackedWindows, check_seq_len, collate_packed
    from fsa_train.data.shards import check_tokenizer, load_split, read_meta
    device, model, tokenizer = load_model(args, needs_tokenizer=False)
    meta = read_meta(args.dataset)
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, args.dataset)
    if meta["vocab_size"] > model.cfg.vocab_size:
        raise ValueError(f"{args.dataset}: vocabulary {meta['vocab_size']} exceeds the model's "
                         f"{model.cfg.vocab_size}")
    check_seq_len(args.seq_len, model.cfg.nsa if model.cfg.attention == "nsa" else None)
    windows = PackedWindows(load_split(args.dataset, args.split), args.seq_len,
                            args.document_mask)
    n_batches = len(windows) // args.batch_size
    if args.batches is not None:
        n_batches = min(n_batches, args.batches)
    if n_batches == 0:
        raise ValueError(f"{args.dataset}: {len(windows)} windows of {args.seq_len} tokens in "
                         f"the {args.split} split, fewer than one batch of {args.batch_size}")
    batches = (
        collate_packed([windows[b * args.batch_size + i] for i in range(args.batch_size)])
        for b in range(n_batches)
    )
    result = position_loss(model, batches, bucket_edges(args.buckets, args.seq_len), device,
                           args.precision)
    result.update(exported=str(args.exported), dataset=str(args.dataset), split=args.split,
                  seq_len=args.seq_len, batches=n_batches, batch_size=args.batch_size)
    print(format_buckets(result))
    write_result(result, args.out)
