"""How much do neighbouring queries of a trained NSA model select the same blocks?

The selected branch's kernel design depends on it (``docs/notes/selected.md``,
``docs/notes/core.md``): the block-major kernel (FSA's order) writes an fp32 partial output per
(query, selected block) and costs the same whatever the pattern, while a query-major kernel over a
tile of M consecutive queries would load the *union* of the blocks its queries chose and mask the
rest: no partials, but it does ``union × M`` block-rows of work where the sparse branch needs only
the selected ones. Random selections (what the kernel benchmarks feed) share nothing beyond the
forced blocks; a trained model's may share most. This script measures it on real text.

For every NSA layer and KV head it records the selections ``select_blocks`` makes during a
forward over validation windows and reports, per query-tile size M (tiles of M consecutive
tokens inside a document):

* ``union``: mean number of distinct blocks the queries of a tile select (``topk`` means all
  queries of the tile chose the same blocks; ``M · topk`` that they share none);
* ``inflation``: ``Σ_tiles union · rows / Σ_queries selected`` — the work of a query-major tile
  kernel over the union relative to the sparse work (1 is free, larger is wasted work);
* ``adjacent_jaccard``: mean Jaccard similarity of the selections of adjacent tokens.

``python -m benchmarks run selection_overlap EXPORTED DATASET --seq_len 8192 --batches 8
--out overlap.json`` (``fsa-train export`` writes EXPORTED, ``fsa-train prepare-data`` DATASET);
``loss_parity evaluate`` runs it on every NSA run and keeps the JSON in the run's directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import fsa_train.kernels.api as ops
from benchmarks import REGISTRY, register
from fsa_train.evaluate.runtime import PRECISIONS, pick_device, precision
from fsa_train.kernels.varlen import document_ids, document_positions

DEFAULT_TILES = (16, 64, 128)


@contextlib.contextmanager
def recorded_selections() -> Iterator[list[torch.Tensor]]:
    """Every ``select_blocks`` result (``[h, total, topk]``, -1 padded) made inside the block,
    in call order (one per NSA layer per forward). ``nsa_attention`` looks the op up on
    ``fsa_train.kernels.api`` at each call, so wrapping it there sees every layer."""
    real = ops.select_blocks
    calls: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        idx = real(*args, **kwargs)
        calls.append(idx.detach().clone())
        return idx

    ops.select_blocks = recording
    try:
        yield calls
    finally:
        ops.select_blocks = real


def overlap_stats(idx: torch.Tensor, cu_seqlens: torch.Tensor, tile: int) -> dict[str, float]:
    """Union size, work inflation and adjacent-token Jaccard of one layer's selections.

    ``idx [h, total, topk]`` holds document-local block ids (valid ones first, then -1);
    ``cu_seqlens`` the documents. Tiles are ``tile`` consecutive tokens of one document, aligned
    to the document's start (as the kernels tile each document)."""
    h, total, _ = idx.shape
    device = idx.device
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = document_ids(cu, total)
    local = document_positions(cu, total)
    lengths = cu[1:] - cu[:-1]
    tiles_per_doc = (lengths + tile - 1) // tile
    tile_base = torch.cumsum(tiles_per_doc, 0) - tiles_per_doc
    tile_of = tile_base[doc] + local // tile  # [total]
    n_tiles = int(tiles_per_doc.sum())
    max_blocks = int(idx.max().item()) + 1 if idx.numel() else 1
    blocks_per_doc = max(max_blocks, 1)
    valid = idx >= 0  # [h, total, topk]
    selected = int(valid.sum())
    # a global id per (document, block): unions never mix documents
    gblock = doc[None, :, None] * blocks_per_doc + idx.clamp_min(0).to(torch.int64)
    key = (torch.arange(h, device=device)[:, None, None] * n_tiles + tile_of[None, :, None]) \
        * (len(lengths) * blocks_per_doc) + gblock
    unique = torch.unique(key[valid])
    union_per_tile = torch.bincount(unique // (len(lengths) * blocks_per_doc),
                                    minlength=h * n_tiles).view(h, n_tiles)
    rows_per_tile = torch.bincount(tile_of, minlength=n_tiles)
    occupied = union_per_tile > 0
    union_work = int((union_per_tile * rows_per_tile[None, :]).sum())
    # Jaccard of token t and t-1 of the same document (sets of valid ids)
    same_doc = (local[1:] > 0)
    a, b = idx[:, 1:], idx[:, :-1]
    a_valid, b_valid = a >= 0, b >= 0
    hits = ((a[..., :, None] == b[..., None, :]) & a_valid[..., :, None]
            & b_valid[..., None, :]).sum((-1, -2))
    size_union = a_valid.sum(-1) + b_valid.sum(-1) - hits
    jaccard = (hits / size_union.clamp_min(1)).float()[:, same_doc]
    return {
        "union": float(union_per_tile[occupied].float().mean()) if occupied.any() else 0.0,
        "inflation": union_work / selected if selected else 0.0,
        "adjacent_jaccard": float(jaccard.mean()) if jaccard.numel() else 0.0,
    }


@torch.no_grad()
def measure(model: torch.nn.Module, batches: Sequence[dict], tiles: Sequence[int],
            device: torch.device, precision_name: str = "auto") -> dict:
    """Per-layer and overall overlap statistics over ``batches`` (packed dicts)."""
    if model.cfg.attention != "nsa":
        raise ValueError("selection overlap needs an NSA model (attention: nsa)")
    per_layer: dict[int, dict[int, list[dict]]] = {}
    for batch in batches:
        ids = batch["input_ids"].to(device)
        cu_seqlens = batch["cu_seqlens"].to(device)
        with recorded_selections() as calls, precision(device, precision_name):
            model(ids, cu_seqlens)
        for layer, idx in enumerate(calls):
            for tile in tiles:
                per_layer.setdefault(layer, {}).setdefault(tile, []).append(
                    overlap_stats(idx, cu_seqlens, tile))
    layers = []
    for layer, by_tile in sorted(per_layer.items()):
        layers.append({"layer": layer, "tiles": {
            str(tile): {name: statistics.fmean(r[name] for r in rows) for name in rows[0]}
            for tile, rows in by_tile.items()}})
    overall = {str(tile): {name: statistics.fmean(layer["tiles"][str(tile)][name]
                                                  for layer in layers)
                           for name in ("union", "inflation", "adjacent_jaccard")}
               for tile in tiles}
    nsa = model.cfg.nsa
    return {"topk": nsa.sel_topk, "block": nsa.sel_block, "forced": nsa.init_blocks +
            nsa.local_blocks, "tiles": list(tiles), "layers": layers, "overall": overall}


def markdown(result: dict) -> str:
    lines = [f"Selections of a trained model (top-{result['topk']} blocks of "
             f"{result['block']}, {result['forced']} forced): distinct blocks per query tile "
             "(union), query-major work over sparse work (inflation), adjacent-token Jaccard.",
             "", "| layer | " + " | ".join(f"M = {t}: union / inflation" for t in
                                           result["tiles"]) + " | adjacent Jaccard |",
             "|---" * (len(result["tiles"]) + 2) + "|"]
    rows = [*result["layers"], {"layer": "mean", "tiles": result["overall"]}]
    for row in rows:
        cells = [f"{row['tiles'][str(t)]['union']:.1f} / {row['tiles'][str(t)]['inflation']:.1f}"
                 for t in result["tiles"]]
        jaccard = row["tiles"][str(result["tiles"][0])]["adjacent_jaccard"]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + f" | {jaccard:.2f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("exported", help="file written by `fsa-train export` (an NSA model)")
    parser.add_argument("dataset", help="directory written by `fsa-train prepare-data`")
    parser.add_argument("--split", default="val", choices=["val", "train"])
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=8, help="windows to run")
    parser.add_argument("--tiles", type=int, nargs="+", default=list(DEFAULT_TILES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


@register("selection_overlap", summary="how much neighbouring queries of a trained NSA model "
          "select the same blocks", arguments=add_arguments, gpu=False, record=False)
def main(args: argparse.Namespace) -> dict:
    from fsa_train.data.packing import PackedWindows, check_seq_len, collate_packed
    from fsa_train.data.shards import load_split
    from fsa_train.export import load_exported

    device = pick_device(args.device)
    model, _ = load_exported(args.exported, device)
    if model.cfg.attention != "nsa":
        raise SystemExit(f"selection_overlap: error: {args.exported} is a "
                         f"{model.cfg.attention} model; it needs attention: nsa")
    check_seq_len(args.seq_len, model.cfg.nsa)
    windows = PackedWindows(load_split(args.dataset, args.split), args.seq_len, True)
    count = min(len(windows), args.batches)
    if count == 0:
        raise SystemExit(f"selection_overlap: error: no window of {args.seq_len} tokens in the "
                         f"{args.split} split of {args.dataset}")
    result = measure(model, [collate_packed([windows[i]]) for i in range(count)], args.tiles,
                     device, args.precision)
    result.update(exported=str(args.exported), dataset=str(args.dataset), seq_len=args.seq_len,
                  windows=count)
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"results: {args.out}")
    return result



if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["selection_overlap"].run()
