"""Benchmark of the whole NSA core (issue 4) against dense attention, with a per-branch breakdown.

One process; forward and forward+backward medians (``triton.testing.do_bench``, 25 ms warm-up,
100 ms of repetitions, on a GPU; a wall-clock median of 3 calls on the CPU smoke mode) and peak
extra memory of:

* ``nsa``: :func:`fsa_train.kernels.nsa_attention` (compression, compressed, selected and window
  branches, gates) on ``backend="auto"`` — Triton where an op has a kernel; once as a standalone
  call and once per layer as the model calls it, with the batch's :func:`nsa_varlen` (document
  positions, compressed boundaries) computed beforehand, since the model shares it between layers;
* its branches one by one: ``compress`` (keys and values), ``compressed_attention``,
  ``select_blocks`` (forward only), ``selected_attention``, ``window_attention``;
* dense baselines: our ``window_attention(window=None)``, cuDNN SDPA and the SDPA flash backend
  (one document only; K/V expanded to all heads), FlexAttention with a document mask.

Default shapes: 16K, 32K, 64K and 128K tokens; G = 1, 4, 16 with 4 KV heads; d = 128; bf16;
default NSA parameters; one document and 4K-token packed documents (``--layouts one`` for one
document only). Writes ``nsa_<device>_<date>[_<tag>].{json,md}`` to ``--out`` after every shape,
so a run cut short still reports. GPU: ``python -m benchmarks run nsa``; CPU smoke test:
``--device cpu --tokens 256 --groups 2 --head_dim 32 --kv_heads 1 --tiny_nsa``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import Record, peak_mib, require_cuda, run_meta, timer, write_with_choices
from fsa_train import kernels as ops
from fsa_train.config import NSAConfig
from fsa_train.kernels import CompressionParams, nsa_attention, nsa_varlen
from fsa_train.kernels.varlen import document_ids, document_positions
from fsa_train.model.rope import Rotary

PACKED_DOC = 4096


def make_inputs(tokens: int, doc: int | None, groups: int, kv_heads: int, head_dim: int,
                nsa: NSAConfig, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random packed inputs (never zeros) for the NSA core and its branches."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lengths = [tokens] if doc is None else [doc] * (tokens // doc)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    heads = kv_heads * groups

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    width = nsa.cmp_kernel * head_dim
    pooling = torch.eye(head_dim).repeat(nsa.cmp_kernel, 1) / nsa.cmp_kernel
    return {
        "lengths": lengths,
        "cu": cu.to(device),
        "q": rand(tokens, heads, head_dim),
        "k": rand(tokens, kv_heads, head_dim),
        "v": rand(tokens, kv_heads, head_dim),
        "gates": torch.rand(tokens, heads, 3, generator=gen).to(device, dtype),
        "w_k": (pooling + 0.02 * torch.randn(kv_heads, width, head_dim, generator=gen)).to(
            device, dtype),
        "w_v": (pooling + 0.02 * torch.randn(kv_heads, width, head_dim, generator=gen)).to(
            device, dtype),
        "pe": rand(kv_heads, nsa.cmp_kernel, head_dim, scale=0.02),
        "do": rand(tokens, heads, head_dim),
    }


def fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor,
            leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn().backward(grad)

    return run


def bench_shape(inp: dict, nsa: NSAConfig, device: str, flex: bool,
                baselines: bool = True) -> list[dict]:
    """Rows for one shape: the NSA core, its branches, and the dense baselines. ``baselines``
    False: only the rows the selection mode changes (the core, select_blocks, the selected
    branch), for a second mode of the same shape."""
    time_ms = timer(device)
    rope = Rotary(inp["q"].shape[-1])
    leaves = [inp[name].requires_grad_() for name in ("q", "k", "v", "gates", "w_k", "w_v", "pe")]
    q, k, v, gates, w_k, w_v, pe = leaves
    cu, do = inp["cu"], inp["do"]
    params = CompressionParams(w_k, w_v, pe)
    rows = []

    def record(method: str, fwd: Callable[[], torch.Tensor], backward: bool = True) -> None:
        row = {"method": method}
        try:
            with torch.no_grad():
                row["fwd_ms"] = time_ms(fwd)
            if backward:
                step = fwd_bwd(fwd, do if fwd().shape == do.shape else torch.ones_like(fwd()),
                               leaves)
                row["fwd_bwd_ms"] = time_ms(step)
                row["peak_mib"] = peak_mib(step, device)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)

    record("nsa core", lambda: nsa_attention(q, k, v, gates, params, cu, nsa, rope))
    # as the model calls it: the batch's packed-layout indices computed once for all layers
    varlen = nsa_varlen(cu, q.shape[0], nsa)
    record("nsa core, per layer (shared varlen)",
           lambda: nsa_attention(q, k, v, gates, params, cu, nsa, rope, varlen=varlen))

    # branches; the attention ops take the raw leaves (same cost as RoPE'd inputs, and gradients)
    with torch.no_grad():
        positions = document_positions(cu, q.shape[0])
        k_c, cu_c = ops.compress(k, w_k, pe, cu, nsa.cmp_kernel, nsa.cmp_stride)
        v_c, _ = ops.compress(v, w_v, None, cu, nsa.cmp_kernel, nsa.cmp_stride)
        q_r = rope(q, positions)
        k_cr = rope(k_c, document_positions(cu_c, k_c.shape[0]) * nsa.cmp_stride,
                    max_position=q.shape[0])
        _, lse = ops.compressed_attention(q_r, k_cr, v_c, cu, cu_c, nsa.cmp_kernel,
                                          nsa.cmp_stride)
        idx = ops.select_blocks(q_r, k_cr, lse, cu, cu_c, nsa.cmp_kernel, nsa.cmp_stride,
                                nsa.sel_block, nsa.sel_topk, nsa.init_blocks, nsa.local_blocks,
                                selection=nsa.selection)
    if not baselines:
        record("branch: select_blocks", lambda: ops.select_blocks(
            q_r, k_cr, lse, cu, cu_c, nsa.cmp_kernel, nsa.cmp_stride, nsa.sel_block,
            nsa.sel_topk, nsa.init_blocks, nsa.local_blocks, selection=nsa.selection),
            backward=False)
        record("branch: selected_attention", lambda: ops.selected_attention(
            q, k, v, idx, cu, nsa.sel_block, partials=nsa.selected_partials,
            selection=nsa.selection))
        return rows
    record("branch: compress (k and v)", lambda: torch.cat([
        ops.compress(k, w_k, pe, cu, nsa.cmp_kernel, nsa.cmp_stride)[0],
        ops.compress(v, w_v, None, cu, nsa.cmp_kernel, nsa.cmp_stride)[0]]), backward=False)
    record("branch: compressed_attention", lambda: ops.compressed_attention(
        q, k_cr, v_c, cu, cu_c, nsa.cmp_kernel, nsa.cmp_stride)[0])
    record("branch: select_blocks", lambda: ops.select_blocks(
        q_r, k_cr, lse, cu, cu_c, nsa.cmp_kernel, nsa.cmp_stride, nsa.sel_block, nsa.sel_topk,
        nsa.init_blocks, nsa.local_blocks), backward=False)
    record("branch: selected_attention",
           lambda: ops.selected_attention(q, k, v, idx, cu, nsa.sel_block,
                                          partials=nsa.selected_partials))
    record("branch: window_attention", lambda: ops.window_attention(q, k, v, cu, nsa.window))
    record("dense: ours (window_attention None)",
           lambda: ops.window_attention(q, k, v, cu, None))
    if device == "cuda" and len(inp["lengths"]) == 1:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = q.shape[1] // k.shape[1]

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    qq = q.transpose(0, 1)[None]
                    kk = k.repeat_interleave(group, 1).transpose(0, 1)[None]
                    vv = v.repeat_interleave(group, 1).transpose(0, 1)[None]
                    out = torch.nn.functional.scaled_dot_product_attention(
                        qq, kk, vv, is_causal=True)
                    return out[0].transpose(0, 1)
            return run

        record("dense: cuDNN SDPA", sdpa(SDPBackend.CUDNN_ATTENTION))
        record("dense: FA2 (SDPA flash)", sdpa(SDPBackend.FLASH_ATTENTION))
    if flex and device == "cuda":
        try:
            rows.append(flex_row(q, k, v, cu, do, leaves, time_ms))
        except torch.OutOfMemoryError as error:
            rows.append({"method": "dense: FlexAttention doc mask", "error": str(error)[:120]})
        torch.cuda.empty_cache()
    return rows


def flex_row(q, k, v, cu, do, leaves, time_ms) -> dict:
    """FlexAttention with a causal document mask (compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    doc = document_ids(cu, total)
    # Every shape recompiles; past dynamo's default limit (8) flex would fall back to its eager
    # path, which materialises the whole score matrix and runs out of memory.
    torch._dynamo.config.cache_size_limit = 256
    compiled = torch.compile(flex_attention)

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask, None, None, total, total, device=q.device, _compile=True)

    def run():
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                       v.transpose(0, 1)[None], block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    row = {"method": "dense: FlexAttention doc mask"}
    try:
        with torch.no_grad():
            row["fwd_ms"] = time_ms(run)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd(run, do, leaves))
    except Exception as error:  # noqa: BLE001 - a baseline that fails is reported, not fatal
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the smoke mode (wall-clock medians, fp32)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--layouts", nargs="+", choices=["one", "packed"],
                        default=["one", "packed"],
                        help=f"one document, and/or packed {PACKED_DOC}-token documents")
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--tiny_nsa", action="store_true",
                        help="small NSA parameters (8/4/16, top-3, window 32) for CPU smoke runs")
    parser.add_argument("--no_flex", action="store_true")
    parser.add_argument("--selected_partials", choices=["fp32", "half"], default="fp32",
                        help="the selected branch's O/dQ partials (nsa.selected_partials)")
    parser.add_argument("--selections", nargs="+", choices=["token", "block"],
                        default=["token", "block"],
                        help="selection modes (nsa.selection); the dense baselines and the "
                             "unchanged branches run with the first")


def shape_layouts(tokens: int, layouts: list[str]) -> list[int | None]:
    """The document lengths (None: one document) of one token count, in the order measured."""
    docs = []
    if "one" in layouts:
        docs.append(None)
    if "packed" in layouts:
        docs.append(PACKED_DOC if tokens > PACKED_DOC else None)
    return list(dict.fromkeys(docs))  # a packed layout of one document is the one document


@register("nsa", summary="the whole NSA core (and each branch) against dense attention",
          arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    if args.device == "cuda":
        require_cuda("nsa")
    nsa = (NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, window=32,
                     selected_partials=args.selected_partials)
           if args.tiny_nsa else NSAConfig(selected_partials=args.selected_partials))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    meta = {**run_meta(args.device), "dtype": "bf16" if args.device == "cuda" else "fp32",
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "nsa": vars(nsa),
            "merge": ops.default_settings().topk_merge}
    record = Record("nsa", meta, args.out, args.tag)
    results: list[dict] = []
    data = {"meta": meta, "rows": results}
    for tokens in args.tokens:
        for groups in args.groups:
            for doc in shape_layouts(tokens, args.layouts):
                inp = make_inputs(tokens, doc, groups, args.kv_heads, args.head_dim, nsa,
                                  args.device, dtype)
                layout = "1 doc" if doc is None else f"{tokens // doc}x{doc // 1024}K"
                start = time.perf_counter()
                for i, selection in enumerate(args.selections):
                    mode = dataclasses.replace(nsa, selection=selection)
                    for row in bench_shape(inp, mode, args.device, not args.no_flex, i == 0):
                        row.update(tokens=tokens, G=groups, doc=doc, layout=layout,
                                   selection=selection)
                        results.append(row)
                        print(f"  {_method(row)}: fwd {_cell(row, 'fwd_ms')} ms, "
                              f"fwd+bwd {_cell(row, 'fwd_bwd_ms')} ms", flush=True)
                print(f"{tokens} G={groups} {layout}: {time.perf_counter() - start:.1f}s",
                      flush=True)
                del inp
                write_with_choices(record, data, markdown)  # after every shape
    print(f"results: {record.path('.md')}")
    return data


def _method(row: dict) -> str:
    """The row's method, with the selection mode where it is block-shared."""
    return row["method"] + (" [block]" if row.get("selection") == "block" else "")


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return row.get("error", "") if key == "fwd_ms" else ""
    return f"{value:.3f}"


def markdown(data: dict) -> str:
    """The table of a run (from its JSON)."""
    from fsa_train.kernels.tuning import choices_markdown

    meta, results = data["meta"], data["rows"]
    lines = [
        "# NSA core benchmark",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}; "
        f"{meta['dtype']}, d = {meta['head_dim']}, {meta['kv_heads']} KV heads, "
        f"NSA {meta['nsa']}. "
        f"Top-k merge: {meta['merge']}. Median ms; speedup = dense cuDNN (else our dense kernel) "
        "fwd+bwd over NSA fwd+bwd.",
        "",
        "| tokens | G | layout | method | fwd ms | fwd+bwd ms | peak MiB | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        same = [r for r in results if (r["tokens"], r["G"], r["layout"]) ==
                (row["tokens"], row["G"], row["layout"])]
        dense = next((r for r in same if r["method"] == "dense: cuDNN SDPA" and "fwd_bwd_ms" in r),
                     None) or next((r for r in same if r["method"].startswith("dense: ours")), {})
        speedup = ""
        if row["method"].startswith("nsa core") and "fwd_bwd_ms" in row and "fwd_bwd_ms" in dense:
            speedup = f"{dense['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}×"

        lines.append(f"| {row['tokens']} | {row['G']} | {row['layout']} | {_method(row)} | "
                     f"{_cell(row, 'fwd_ms')} | {_cell(row, 'fwd_bwd_ms')} | "
                     f"{_cell(row, 'peak_mib')} | {speedup} |")
    lines += choices_markdown(meta["autotune"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["nsa"].run()
