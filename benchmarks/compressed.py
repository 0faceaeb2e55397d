"""Benchmark of the compressed-attention and select_blocks (scoring + top-k) Triton kernels.

One process, ``triton.testing.do_bench`` medians (ms; 10 ms warm-up, 60 ms of repetitions), bf16,
d = 128, 4 KV heads, H = 4·G, default NSA parameters (l = 32, s = 16, B = 64, T = 16, 1 init
block, 2 local blocks):

* ``compressed_attention`` forward and forward+backward (ours);
* ``select_blocks`` (ours: fused scoring + streaming top-k, fed by our LSE), against the reference
  scoring + ``torch.topk``-style selection (``reference.select_blocks``: materialises the score
  matrix in chunks; timed at 16K only, "n/a" at 64K);
* the target of issue 4: scoring plus top-k no slower than the compressed attention forward
  (ratio ``select / cmp fwd`` <= 1).

Shapes: 16K and 64K tokens in one document, and 64K as 16 packed 4K documents; G = 1, 4, 16.

``--sweep-topk`` instead runs the ``select_blocks`` variants side by side: top-k merge (bitonic,
sort) × key-tile width (``KernelSettings.topk_tile_blocks`` 16, 32, 64), each autotuned, with the
compressed-attention forward as the yardstick and an identity check of every variant's indices
against the first one; it prints the fastest variant per shape. The 2026-12-02 sweep
(``results/compressed_h200_2026-12-02_topk_sweep.md``) set the tile width's default (32 blocks
from G = 16).

Writes ``compressed_<device>_<date>[_<tag>].{json,md}`` (the sweep: tag ``topk_sweep``) to
``--out``. Usage: ``python -m benchmarks run compressed [--sweep-topk]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
import traceback

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import Record, bench, join_tags, require_cuda, run_meta, run_shapes

D = 128
LIBRARY_KERNELS = {"flex": "FlexAttention (compiled, `compressed_kernel=flex`)",
                   "cudnn": "cuDNN over compressed positions (`compressed_kernel=cudnn`)"}
"""The maintained kernels timed beside ours (``KernelSettings.compressed_kernel``)."""
KV_HEADS = 4
L, S, B, T, INIT, LOCAL = 32, 16, 64, 16, 1, 2


def ops():
    """The Triton modules (compressed attention, select_blocks), imported on first use."""
    return (importlib.import_module("fsa_train.kernels.ops.compressed_attention.triton"),
            importlib.import_module("fsa_train.kernels.ops.select_blocks.triton"))


def base_settings():
    from fsa_train.kernels.settings import default_settings

    return default_settings()


def timed(fn) -> float:
    """This benchmark's budget: 10 ms warm-up, 60 ms of repetitions."""
    return bench(fn, warmup=10, rep=60)


def visible_pairs(lengths: list[int]) -> int:
    """Σ over queries of the compressed keys each one sees."""
    total = 0
    for n in lengths:
        t = torch.arange(n, dtype=torch.int64)
        total += int(torch.where(t >= L - 1, (t - L + 1) // S + 1, 0).sum())
    return total


def make_case(lengths: list[int], G: int, seed: int = 0) -> dict:
    from fsa_train.kernels.varlen import compressed_lengths

    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    cuc = compressed_lengths(cu, L, S)
    nc = int(cuc[-1])
    H = G * KV_HEADS

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    return {
        "q": rnd(n, H, D), "k": rnd(nc, KV_HEADS, D), "v": rnd(nc, KV_HEADS, D),
        "do": rnd(n, H, D), "cu": cu, "cuc": cuc, "lengths": lengths, "G": G, "H": H,
    }


def run_case(c: dict, with_reference: bool) -> dict:
    from fsa_train.kernels import reference

    ca, tk = ops()
    q, k, v = (c[x].detach().requires_grad_() for x in ("q", "k", "v"))
    cu, cuc = c["cu"], c["cuc"]

    def fwd():
        return ca.compressed_attention(q, k, v, cu, cuc, L, S)

    def fwd_bwd():
        o, _ = ca.compressed_attention(q, k, v, cu, cuc, L, S)
        return torch.autograd.grad(o, (q, k, v), c["do"])

    with torch.no_grad():
        _, lse = fwd()

    def select(settings=None):
        return tk.select_blocks(c["q"], c["k"], lse, cu, cuc, L, S, B, T, INIT, LOCAL,
                                settings=settings)

    def select_ref():
        return reference.select_blocks(c["q"], c["k"], lse, cu, cuc, L, S, B, T, INIT, LOCAL)

    out: dict = {}
    fwd_bwd()
    fwd()
    select()
    torch.cuda.synchronize()
    out["cmp_fwd_ms"] = timed(fwd)
    out["cmp_fwd_bwd_ms"] = timed(fwd_bwd)
    out["select_ms"] = timed(select)
    if c["G"] == 4:  # the autotuned launch configurations (not the default, see the notes)
        tuned = dataclasses.replace(base_settings(), topk_configs="tuned")
        select(tuned)
        out["select_tuned_ms"] = timed(lambda: select(tuned))
    longest = max(c["lengths"])
    for kernel in LIBRARY_KERNELS:  # KernelSettings.compressed_kernel: the maintained kernels
        try:
            settings = dataclasses.replace(base_settings(), compressed_kernel=kernel)

            def lib_fwd(settings=settings):
                return ca.compressed_attention(q, k, v, cu, cuc, L, S, None, longest,
                                               settings=settings)

            def lib_fwd_bwd(lib_fwd=lib_fwd):
                o, _ = lib_fwd()
                return torch.autograd.grad(o, (q, k, v), c["do"])

            lib_fwd_bwd()
            out[f"{kernel}_fwd_ms"] = timed(lib_fwd)
            out[f"{kernel}_fwd_bwd_ms"] = timed(lib_fwd_bwd)
        except Exception as error:  # noqa: BLE001 - report and go on
            out[f"{kernel}_error"] = repr(error)[:200]
    pairs = visible_pairs(c["lengths"])
    flops = 4 * D * c["H"] * pairs
    out["cmp_fwd_tflops"] = flops / out["cmp_fwd_ms"] * 1e-9
    out["cmp_fwd_bwd_tflops"] = 3.5 * flops / out["cmp_fwd_bwd_ms"] * 1e-9
    out["select_tflops"] = 0.5 * flops / out["select_ms"] * 1e-9  # q·k only
    out["select_over_fwd"] = out["select_ms"] / out["cmp_fwd_ms"]
    if with_reference:
        select_ref()
        torch.cuda.synchronize()
        out["select_ref_ms"] = timed(select_ref)
        ours, ref = select(), select_ref()
        out["select_rows_differing_from_ref"] = float((ours != ref).any(-1).float().mean())
    return out


def tuner_choices() -> dict:
    """What the compressed-attention and select_blocks tuners chose: ``{tuner: {key: config}}``."""
    from fsa_train.kernels.tuning import autotune_choices

    return {name: {", ".join(entry["key"]): entry["config"] for entry in entries}
            for name, entries in autotune_choices().items()
            if name.startswith(("compressed_attention.", "select_blocks."))}


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# compressed attention and select_blocks benchmark",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}. "
        f"bf16, d = {D}, {KV_HEADS} KV heads, H = 4·G, l = {L}, s = {S}, B = {B}, T = {T}; "
        "median of `triton.testing.do_bench` (ms). TFLOP/s count 4·d·H per visible (query, "
        "compressed key) pair forward, 3.5× that forward+backward, half of it for the scoring. "
        "`sel/fwd` is the issue-4 target (scoring + top-k no slower than the compressed "
        "attention forward: <= 1). The reference selection is timed at 16K only.",
        "",
        "| shape | cmp fwd ms | cmp fwd+bwd ms | select ms (ours) | select ms (reference) "
        "| sel/fwd | cmp fwd TFLOP/s | cmp fwd+bwd TFLOP/s | select TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["cases"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} |||||||| ")
            continue
        lines.append(
            f"| {name} | {fmt(r['cmp_fwd_ms'])} | {fmt(r['cmp_fwd_bwd_ms'])} "
            f"| {fmt(r['select_ms'])} | {fmt(r.get('select_ref_ms'))} "
            f"| {fmt(r['select_over_fwd'])} | {fmt(r['cmp_fwd_tflops'], 0)} "
            f"| {fmt(r['cmp_fwd_bwd_tflops'], 0)} | {fmt(r['select_tflops'], 0)} |"
        )
    extra = [
        f"- {name}: select with the autotuned configurations {fmt(r['select_tuned_ms'])} ms"
        for name, r in results["cases"].items()
        if "select_tuned_ms" in r
    ]
    for kernel, label in LIBRARY_KERNELS.items():
        extra += [
            f"- {name}: {label} fwd {fmt(r[kernel + '_fwd_ms'])} ms, fwd+bwd "
            f"{fmt(r[kernel + '_fwd_bwd_ms'])} ms "
            f"({r['cmp_fwd_bwd_ms'] / r[kernel + '_fwd_bwd_ms']:.2f}× ours' speed, "
            f"{r['cmp_fwd_bwd_tflops'] * r['cmp_fwd_bwd_ms'] / r[kernel + '_fwd_bwd_ms']:.0f} "
            "TFLOP/s)"
            for name, r in results["cases"].items()
            if kernel + "_fwd_bwd_ms" in r
        ]
        extra += [f"- {name}: {label} failed: {r[kernel + '_error']}"
                  for name, r in results["cases"].items() if kernel + "_error" in r]
    extra += [
        f"- {name}: rows whose selection differs from the reference's (bf16 inputs): "
        f"{r['select_rows_differing_from_ref']:.2e}"
        for name, r in results["cases"].items()
        if "select_rows_differing_from_ref" in r
    ]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


# most important first: the device time may run out before the last shapes
SHAPES = [("64K 1 doc G=4", [65536], 4, False), ("16K 1 doc G=4", [16384], 4, True)]
SHAPES += [(f"64K 1 doc G={G}", [65536], G, False) for G in (1, 16)]
SHAPES += [(f"16K 1 doc G={G}", [16384], G, True) for G in (1, 16)]
SHAPES += [("64K 16x4K G=4", [4096] * 16, 4, False)]


def run_benchmark(record: Record) -> dict:
    results = {"meta": record.meta, "cases": {}}
    for name, lengths, G, with_ref in SHAPES:
        t0 = time.time()
        try:
            results["cases"][name] = run_case(make_case(lengths, G), with_ref)
        except Exception as error:  # keep the other shapes
            traceback.print_exc()
            results["cases"][name] = {"error": repr(error)}
        print(name, f"{time.time() - t0:.1f}s", results["cases"][name], flush=True)
        torch.cuda.empty_cache()
        results["tuner"] = tuner_choices()
        record.write(results, markdown(results))
    print(markdown(results))
    return results


# ---------------------------------------------------------------------------------- top-k sweep

VARIANTS = [("bitonic", 16), ("sort", 16), ("bitonic", 32), ("sort", 32), ("bitonic", 64)]
SWEEP_SHAPES = [("16K 1 doc G=1", [16384], 1), ("16K 1 doc G=4", [16384], 4),
                ("64K 1 doc G=1", [65536], 1), ("64K 1 doc G=4", [65536], 4),
                ("64K 1 doc G=16", [65536], 16), ("64K 16x4K G=4", [4096] * 16, 4)]


def topk_shape(lengths: list[int], G: int) -> dict:
    ca, tk = ops()
    c = make_case(lengths, G)
    cu, cuc = c["cu"], c["cuc"]
    with torch.no_grad():
        _, lse = ca.compressed_attention(c["q"], c["k"], c["v"], cu, cuc, L, S)
    row: dict = {"cmp_fwd_ms": timed(lambda: ca.compressed_attention(c["q"], c["k"], c["v"], cu,
                                                                     cuc, L, S))}
    first = None
    for merge, tile_blocks in VARIANTS:
        settings = dataclasses.replace(base_settings(), topk_merge=merge,
                                       topk_tile_blocks=tile_blocks)

        def select(settings=settings):
            return tk.select_blocks(c["q"], c["k"], lse, cu, cuc, L, S, B, T, INIT, LOCAL,
                                    settings=settings)

        idx = select()
        first = idx if first is None else first
        name = f"{merge}/{tile_blocks}"
        row[name] = {"ms": timed(select), "same_indices": bool(torch.equal(idx, first))}
        row[name]["over_cmp_fwd"] = row[name]["ms"] / row["cmp_fwd_ms"]
    return row


def topk_markdown(results: dict) -> str:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep-topk", action="store_true",
                        help="the select_blocks merge × tile-width sweep instead (tag "
                             "topk_sweep)")


@register("compressed", summary="compressed attention and select_blocks (and --sweep-topk)",
          arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    require_cuda("compressed")
    if args.sweep_topk:
        record = Record("compressed", run_meta(), args.out, join_tags("topk_sweep", args.tag))
        results = run_shapes(record, record.meta, SWEEP_SHAPES, topk_shape, topk_markdown)
        for shape, row in results["shapes"].items():
            fastest = min((f"{m}/{t}" for m, t in VARIANTS), key=lambda n: row[n]["ms"])
            print("fastest", shape, fastest)
        return results
    return run_benchmark(Record("compressed", run_meta(), args.out, args.tag))


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["compressed"].run()
