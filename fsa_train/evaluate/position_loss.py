"""Validation loss bucketed by token position: does the model keep up late in long documents?

The position of a token is its index in its packed segment (``cu_seqlens``), i.e. how many
earlier tokens the model could attend to: the same positions the model itself uses. A target
at position ``p`` is predicted from ``p + 1`` tokens of context.

Most tokens of natural text are predicted as well from a few hundred tokens as from thousands,
so the mean loss hides long-range ability. ``short_context=C`` also scores every token with at
most ``C`` tokens of context (documents cut every C tokens, twice with cuts C/2 apart, keeping
for each token the run where it saw more: between C/2 and C tokens) and reports the **key
tokens**: those beyond position C whose loss drops by more than ``key_threshold`` nats with the
full context. Their full-context loss, and how many there are, is what separates a model that
uses distant context from one that does not. The key tokens can be chosen by a ``reference``
model (for example the dense run) so that every model is scored on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

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


def cut_every(cu_seqlens: torch.Tensor, total: int, context: int,
              offset: int = 0) -> torch.Tensor:
    """``cu_seqlens`` with each document also cut at its positions ``offset + k·context``."""
    pos = document_positions(cu_seqlens, total)
    cut = (pos > 0) & (pos >= offset) & ((pos - offset) % context == 0)
    starts = torch.nonzero(cut).flatten()
    return torch.unique(torch.cat([cu_seqlens.long(), starts])).to(cu_seqlens.dtype)


def short_context_losses(model: torch.nn.Module, input_ids: torch.Tensor,
                         targets: torch.Tensor, cu_seqlens: torch.Tensor,
                         context: int) -> torch.Tensor:
    """Per-token losses with between ``context // 2 + 1`` and ``context`` tokens of context (all
    of them below position ``context // 2``): two forwards on documents cut every ``context``
    tokens, the cuts of the second shifted by half of it."""
    total = input_ids.numel()
    half = max(1, context // 2)
    first = token_losses(model, input_ids, targets, cut_every(cu_seqlens, total, context))
    second = token_losses(model, input_ids, targets,
                          cut_every(cu_seqlens, total, context, half))
    pos = document_positions(cu_seqlens, total)
    seen_first = pos % context
    seen_second = torch.where(pos >= half, (pos - half) % context, pos)
    return torch.where(seen_first >= seen_second, first, second)


class KeyTokens:
    """Counts and loss sums of the key tokens (beyond ``context``, gain > ``threshold``), and the
    mask of which tokens they were (``masks``, one boolean array per batch, for a key-token
    file)."""

    def __init__(self, context: int, threshold: float) -> None:
        self.context, self.threshold = context, threshold
        self.candidates = self.tokens = 0
        self.loss = self.short_loss = 0.0
        self.masks: list[np.ndarray] = []

    def update(self, full: torch.Tensor, short: torch.Tensor, chooser_full: torch.Tensor | None,
               chooser_short: torch.Tensor | None, positions: torch.Tensor,
               targets: torch.Tensor, chosen: torch.Tensor | None = None) -> None:
        """Add one batch: ``full``/``short`` losses of the scored model; the key tokens are
        chosen from the ``chooser``'s losses (the same model, or a reference), or given as the
        mask ``chosen`` (a key-token file's)."""
        candidate = (targets != IGNORE_INDEX) & (positions >= self.context)
        if chosen is None:
            key = candidate & (chooser_short - chooser_full > self.threshold)
        else:
            key = candidate & chosen.to(candidate.device)
        self.masks.append(key.cpu().numpy())
        self.candidates += int(candidate.sum())
        self.tokens += int(key.sum())
        self.loss += float(full[key].double().sum())
        self.short_loss += float(short[key].double().sum())

    def result(self) -> dict:
        n = self.tokens
        return {"short_context": self.context, "threshold": self.threshold,
                "candidates": self.candidates, "tokens": n,
                "fraction": n / self.candidates if self.candidates else None,
                "loss": self.loss / n if n else None,
                "short_loss": self.short_loss / n if n else None}


KEY_FILE_FIELDS = ("split", "seq_len", "batch_size", "batches", "short_context", "threshold",
                   "document_mask")
"""What a key-token file must share with the evaluation that reads it (and its token count)."""


def write_key_tokens(path: str | Path, masks: Sequence[np.ndarray], meta: dict) -> None:
    """The key-token mask of every evaluated token, in batch order, as a compressed ``.npz``
    (packed bits; ``meta``: the :data:`KEY_FILE_FIELDS` and where it came from), written to a
    temporary name and renamed, so that a cut run leaves no half-written file."""
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, bits=np.packbits(mask), tokens=np.int64(mask.size),
                        meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


def read_key_tokens(path: str | Path, expected: dict) -> np.ndarray:
    """The boolean mask of a key-token file, after checking that it was written for the same
    evaluation (:data:`KEY_FILE_FIELDS`); a mismatch or an unreadable file is one line."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            tokens = int(data["tokens"])
            mask = np.unpackbits(data["bits"])[:tokens].astype(bool)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a key-token file ({error})") from None
    differ = [f"{k}={meta.get(k)!r} (here {expected[k]!r})" for k in KEY_FILE_FIELDS
              if meta.get(k) != expected[k]]
    if differ:
        raise ValueError(f"{path}: key tokens of another evaluation: {', '.join(differ)}")
    return mask


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
    short_context: int | None = None,
    key_threshold: float = 2.0,
    reference: torch.nn.Module | None = None,
    key_mask: np.ndarray | None = None,
    key_masks_out: list[np.ndarray] | None = None,
) -> dict:
    """Mean loss per position bucket over ``batches`` (dicts with ``input_ids``, ``targets``,
    ``cu_seqlens``, as ``TextDataModule`` yields them); with ``short_context``, also the key
    tokens (module docstring), chosen by ``reference`` when given, or given as ``key_mask``
    (one flag per evaluated token in batch order: a key-token file's); ``key_masks_out``
    receives the key tokens used, one boolean array per batch (for :func:`write_key_tokens`)."""
    device = device or next(model.parameters()).device
    if key_mask is not None and reference is not None:
        raise ValueError("key tokens come from a reference model or from a file, not both")
    totals = PositionLoss(edges)
    keys = KeyTokens(short_context, key_threshold) if short_context else None
    offset = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        targets = batch["targets"].to(device)
        cu_seqlens = batch["cu_seqlens"].to(device)
        positions = document_positions(cu_seqlens, ids.numel())
        with precision(device, precision_name):
            losses = token_losses(model, ids, targets, cu_seqlens,
                                  max_seqlen=batch.get("max_seqlen"))
            if keys is not None:
                short = short_context_losses(model, ids, targets, cu_seqlens, short_context)
                if key_mask is not None:
                    chosen = key_mask[offset:offset + ids.numel()]
                    if chosen.size != ids.numel():
                        raise ValueError(f"the key-token mask holds {key_mask.size} tokens, "
                                         f"fewer than this evaluation's")
                    keys.update(losses, short, None, None, positions, targets,
                                torch.from_numpy(chosen))
                else:
                    chooser = (losses, short) if reference is None else (
                        token_losses(reference, ids, targets, cu_seqlens,
                                     max_seqlen=batch.get("max_seqlen")),
                        short_context_losses(reference, ids, targets, cu_seqlens,
                                             short_context))
                    keys.update(losses, short, *chooser, positions, targets)
        offset += ids.numel()
        totals.update(losses, positions, targets)
    if key_mask is not None and offset != key_mask.size:
        raise ValueError(f"the key-token mask holds {key_mask.size} tokens, this evaluation "
                         f"{offset}")
    result = totals.result()
    if key_masks_out is not None and keys is not None:
        key_masks_out.extend(keys.masks)
    if keys is not None:
        chosen_by = ("file" if key_mask is not None
                     else "reference" if reference is not None else "itself")
        result["key_tokens"] = {**keys.result(), "chosen_by": chosen_by}
    return result


def format_buckets(result: dict) -> str:
    """A Markdown table of the buckets."""
    lines = ["| positions | tokens | loss |", "|---|---|---|"]
    for b in result["buckets"]:
        span = f"{b['start']}–{b['end'] - 1}" if b["end"] is not None else f"{b['start']}+"
        loss = f"{b['loss']:.4f}" if b["loss"] is not None else "–"
        lines.append(f"| {span} | {b['tokens']} | {loss} |")
    overall = f"{result['loss']:.4f}" if result["loss"] is not None else "–"
    lines.append(f"\noverall: {overall} over {result['tokens']} tokens")
    key = result.get("key_tokens")
    if key is not None:
        if key["tokens"]:
            lines.append(f"key tokens (chosen by {key['chosen_by']}: loss drops by more than "
                         f"{key['threshold']:g} nats from {key['short_context']} tokens of "
                         f"context to all): {key['tokens']} of {key['candidates']} "
                         f"({key['fraction']:.2%}), loss {key['loss']:.4f} with the full "
                         f"context, {key['short_loss']:.4f} with the short one")
        else:
            lines.append(f"key tokens: none of {key['candidates']} tokens beyond position "
                         f"{key['short_context']} gains {key['threshold']:g} nats from the "
                         "full context")
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
    parser.add_argument("--short_context", type=int, default=None,
                        help="also report the key tokens: those whose loss drops most from "
                             "this many tokens of context to all (two more forwards a batch)")
    parser.add_argument("--key_threshold", type=float, default=2.0,
                        help="nats a key token's loss must drop by")
    parser.add_argument("--reference", default=None,
                        help="an exported model that chooses the key tokens (default: the model "
                             "itself), so that several models are scored on the same tokens")
    parser.add_argument("--key_tokens", default=None,
                        help="a key-token file (--key_tokens_out of an earlier evaluation of "
                             "the same split, windows and --short_context) naming the key "
                             "tokens, instead of --reference")
    parser.add_argument("--key_tokens_out", default=None,
                        help="write the key tokens used to this .npz, for later --key_tokens")
    args = parser.parse_args(argv)
    if args.short_context is not None and args.short_context < 2:
        parser.error("--short_context must be >= 2")
    if (args.key_tokens or args.key_tokens_out) and args.short_context is None:
        parser.error("--key_tokens and --key_tokens_out need --short_context")
    if args.key_tokens and args.reference:
        parser.error("give --reference or --key_tokens, not both")
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
    reference = None
    if args.reference is not None:
        from fsa_train.export import load_exported

        reference, _ = load_exported(args.reference, device)
    key_meta = {"split": args.split, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "batches": n_batches, "short_context": args.short_context,
                "threshold": args.key_threshold, "document_mask": args.document_mask}
    key_mask = read_key_tokens(args.key_tokens, key_meta) if args.key_tokens else None
    masks: list[np.ndarray] = []
    result = position_loss(model, batches, bucket_edges(args.buckets, args.seq_len), device,
                           args.precision, args.short_context, args.key_threshold, reference,
                           key_mask, masks)
    result.update(exported=str(args.exported), dataset=str(args.dataset), split=args.split,
                  seq_len=args.seq_len, batches=n_batches, batch_size=args.batch_size)
    if args.key_tokens:
        result["key_tokens"]["file"] = str(args.key_tokens)
    print(format_buckets(result))
    if args.key_tokens_out:
        write_key_tokens(args.key_tokens_out, masks,
                         {**key_meta, "chosen_by": result["key_tokens"]["chosen_by"],
                          "exported": str(args.exported)})
    write_result(result, args.out)
