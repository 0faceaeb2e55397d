"""``select_blocks`` variants side by side: top-k merge (bitonic, sort) × key-tile width
(``TILE_BLOCKS`` 16, 32, 64), each autotuned, with the compressed-attention forward as the yardstick
(issue 4: scoring + top-k no slower than it) and an identity check of every variant's indices
against the first one.

bf16, d = 128, 4 KV heads, default NSA parameters; shapes as in ``bench_compressed.py``. Writes
``topk_sweep.json`` and ``topk_sweep.md`` to ``--out`` and prints the fastest variant per shape.
The 2026-12-02 run is ``results/topk_sweep_2026-12-02.md``: it set ``topk.TILE_BLOCKS``' default
(32 blocks from G = 16).
Usage: ``PYTHONPATH=$PWD python3 benchmarks/sweep_topk.py --out $OUT``.
"""

from __future__ import annotations

import torch
from bench_compressed import INIT, LOCAL, B, L, S, T, bench, ca, make_case, tk
from sweep_common import run_sweep

VARIANTS = [("bitonic", 16), ("sort", 16), ("bitonic", 32), ("sort", 32), ("bitonic", 64)]
SHAPES = [("16K 1 doc G=1", [16384], 1), ("16K 1 doc G=4", [16384], 4),
          ("64K 1 doc G=1", [65536], 1), ("64K 1 doc G=4", [65536], 4),
          ("64K 1 doc G=16", [65536], 16), ("64K 16x4K G=4", [4096] * 16, 4)]


def run_shape(lengths: list[int], G: int) -> dict:
    c = make_case(lengths, G)
    cu, cuc = c["cu"], c["cuc"]
    with torch.no_grad():
        _, lse = ca.compressed_attention(c["q"], c["k"], c["v"], cu, cuc, L, S)
    row: dict = {"cmp_fwd_ms": bench(lambda: ca.compressed_attention(c["q"], c["k"], c["v"], cu,
                                                                     cuc, L, S))}
    first = None
    for merge, tile_blocks in VARIANTS:
        tk.MERGE, tk.TILE_BLOCKS = merge, tile_blocks

        def select():
            return tk.select_blocks(c["q"], c["k"], lse, cu, cuc, L, S, B, T, INIT, LOCAL)

        idx = select()
        first = idx if first is None else first
        name = f"{merge}/{tile_blocks}"
        row[name] = {"ms": bench(select), "same_indices": bool(torch.equal(idx, first))}
        row[name]["over_cmp_fwd"] = row[name]["ms"] / row["cmp_fwd_ms"]
    return row


def markdown(results: dict) -> str:
    meta = results["meta"]
    names = [f"{m}/{t}" for m, t in VARIANTS]
    lines = [
        "# select_blocks variants: merge / key-tile blocks",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}. "
        "bf16, d = 128, 4 KV heads, l/s/B/T = 32/16/64/16. Median ms (ratio to the compressed "
        "attention forward); every variant's indices are compared with the first column's.",
        "",
        "| shape | cmp fwd ms | " + " | ".join(names) + " | identical |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for shape, row in results["shapes"].items():
        cells = [f"{row[n]['ms']:.3f} ({row[n]['over_cmp_fwd']:.2f}×)" for n in names]
        same = all(row[n]["same_indices"] for n in names)
        lines.append(f"| {shape} | {row['cmp_fwd_ms']:.3f} | " + " | ".join(cells)
                     + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    results = run_sweep(__doc__.splitlines()[0], "topk_sweep", SHAPES, run_shape, markdown)
    for shape, row in results["shapes"].items():
        fastest = min((f"{m}/{t}" for m, t in VARIANTS), key=lambda n: row[n]["ms"])
        print("fastest", shape, fastest)


if __name__ == "__main__":
    main()
