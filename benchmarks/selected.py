"""Selected-attention benchmark: ours vs the reference, dense SDPA (cuDNN, FA2) and FlexAttention.

Times forward and forward+backward (median of ``triton.testing.do_bench``, 25 ms warm-up, 100 ms
of repetitions) and measures the peak extra memory of one forward+backward, in one process, on
one GPU: 16K and 64K tokens; G = 1, 2, 4, 8, 16 with 4 KV heads and d = 128; (block, topk) =
(64, 16) and (128, 8); one document and packed documents of 4K and 1K tokens. Selections are
realistic random valid ones (first block, the two local blocks, the rest random among earlier
blocks), generated on the GPU. Dense SDPA baselines cannot mask documents, so they are reported
once per (tokens, G) for one document; FlexAttention gets a document-causal block mask.

``--selections coherent:S`` gives every span of S tokens (S dividing the block) the selection of
its first token, the regime where neighbouring queries share their blocks (what a trained model
does is measured by ``selection_overlap``); ``random`` (default) shares only the forced blocks.
``--parts`` adds ``profile`` (per-kernel device time) and ``tune`` (launch configurations of the
block-major kernels, passed as ``KernelSettings.selected_fwd_config`` / ``selected_bwd_config``).

``--sweep-partials`` instead runs the partials sweep: fp32 against half-precision O/dQ partials
(``partials=``, in training ``model.config.nsa.selected_partials``), time and accuracy side by
side: forward and forward+backward medians (10 ms warm-up, 60 ms of repetitions) and the
relative L2 error of o, dq, dk, dv of each against the same kernels run on the inputs cast to
fp32 (exact "ieee" dots, fp32 partials); bf16, d = 128, 4 KV heads, block 64, top-16.

Writes ``selected_<device>_<date>[_<tag>].{json,md}`` (the sweep: tag ``partials_sweep``) to
``--out``. ``--deadline`` (seconds) skips what is left once it passes (marked "skipped: time"),
so the run fits a device lease.

    python -m benchmarks run selected --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import math
import time

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import (
    Record,
    bench,
    join_tags,
    peak_mib,
    rel,
    require_cuda,
    run_meta,
    run_shapes,
)

# Quoted from ../shared/docs/kernels.md (H200, torch 2.11, Triton 3.6, bf16, d=128, 4 KV heads,
# one document, B=64, T=16): forward+backward ms of the selected branch. Not measured here.
QUOTED = {
    65536: {"fsa": {1: 20.4, 2: 28.8, 4: 40.2, 8: 65.3, 16: 135.9},
            "nsa": {1: 45.0, 2: 45.8, 4: 46.8, 8: 50.7, 16: 59.7}},
    16384: {"fsa": {1: 8.9, 16: 50.6}, "nsa": {1: 11.4, 16: 14.1}},
}
MODES = "auto"
"""The ``modes`` label of our rows (the block-major paths; the query-major ones are gone)."""

START = time.time()


def elapsed() -> float:
    return time.time() - START


def triton_op():
    """The Triton selected-attention module (imported on first use: GPU runs only)."""
    return importlib.import_module("fsa_train.kernels.ops.selected_attention.triton")


def random_selection(*args):
    from fsa_train.kernels.ops.selected_attention.sampling import random_selection

    return random_selection(*args)


def base_settings():
    from fsa_train.kernels.settings import default_settings

    return default_settings()


def layouts(n: int, which: list[str]) -> list[tuple[str, list[int]]]:
    out = []
    for name in which:
        doc = {"one": n, "4k": 4096, "1k": 1024}[name]
        out.append((f"{n // doc}x{doc // 1024}K" if doc < n else "1 doc", [doc] * (n // doc)))
    return out


def timed_pair(fwd, fwdbwd, leaves):
    """(fwd ms, fwd+bwd ms, peak extra GiB) or an error string."""
    try:
        f = bench(fwd)
        fb = bench(fwdbwd, grad_to_none=leaves)
        for x in leaves:
            x.grad = None
        mem = peak_mib(fwdbwd) / 1024
        for x in leaves:
            x.grad = None
        return {"fwd_ms": f, "fwdbwd_ms": fb, "peak_gib": mem}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except Exception as error:  # a baseline that does not run on this build
        torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}


def make(n, G, dtype=torch.bfloat16, h=4, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n, h * G, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(n, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(n, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(n, h * G, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def coherent_selection(idx: torch.Tensor, cu: torch.Tensor, span: int, block: int) -> torch.Tensor:
    """``idx`` with every document-aligned span of ``span`` tokens given its first token's
    selection. ``span`` divides ``block``, so a span never crosses a block and the first
    token's selection (forced blocks included) is valid for the whole span."""
    if block % span:
        raise SystemExit(f"selected: error: coherent span {span} must divide the block "
                         f"{block}")
    total = idx.shape[1]
    cu64 = cu.to(torch.int64)
    tok = torch.arange(total, device=idx.device)
    doc = torch.searchsorted(cu64[1:].contiguous(), tok, right=True)
    local = tok - cu64[doc]
    return idx[:, cu64[doc] + local // span * span].contiguous()


def selections(args, cu, topk, block, gen):
    """(name, idx) for every ``--selections`` kind."""
    base = random_selection(cu, 4, topk, block, gen)
    for kind in args.selections:
        if kind == "random":
            yield kind, base
        else:
            yield kind, coherent_selection(base, cu, int(kind.split(":")[1]), block)


def run_ours(args, results):
    sa = triton_op()
    for n in args.tokens:
        for G in args.groups:
            q, k, v, do = make(n, G)
            for block, topk in args.configs:
                for lname, lengths in layouts(n, args.layouts):
                    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()],
                                      dtype=torch.int32, device="cuda")
                    gen = torch.Generator(device="cuda").manual_seed(n + G + block)
                    for (kind, idx), way in itertools.product(
                            selections(args, cu, topk, block, gen), args.forced):
                        label = MODES if kind == "random" else f"{MODES} @{kind}"
                        if way == "dense":
                            label += ", forced dense"
                        key = dict(tokens=n, G=G, block=block, topk=topk, layout=lname,
                                   impl="ours", modes=label)
                        if elapsed() > args.deadline:
                            results.append({**key, "error": "skipped: time"})
                            continue
                        # the selections hold the forced (1, 2) blocks (random_selection's)
                        options = dict(forced_blocks=(1, 2), settings=dataclasses.replace(
                            base_settings(), selected_forced=way))

                        def fwd(q=q, k=k, v=v, cu=cu, idx=idx, block=block, options=options):
                            return sa.selected_attention(q, k, v, idx, cu, block, **options)

                        def fwdbwd(fwd=fwd, do=do):
                            fwd().backward(do)

                        r = timed_pair(fwd, fwdbwd, [q, k, v])
                        results.append({**key, **r})
                        print(json.dumps(results[-1]), flush=True)
                        del idx
            del q, k, v, do
            torch.cuda.empty_cache()


def run_reference(args, results):
    from fsa_train.kernels import reference

    for n in args.ref_tokens:
        for G in args.ref_groups:
            q, k, v, do = make(n, G)
            block, topk = args.configs[0]
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            gen = torch.Generator(device="cuda").manual_seed(1)
            idx = random_selection(cu, 4, topk, block, gen)
            key = dict(tokens=n, G=G, block=block, topk=topk, layout="1 doc", impl="reference")
            if elapsed() > args.deadline:
                results.append({**key, "error": "skipped: time"})
                continue

            def fwd(q=q, k=k, v=v, idx=idx, cu=cu, block=block):
                return reference.selected_attention(q, k, v, idx, cu, block)

            def fwdbwd(fwd=fwd, do=do):
                fwd().backward(do)

            results.append({**key, **timed_pair(fwd, fwdbwd, [q, k, v])})
            print(json.dumps(results[-1]), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


def run_dense(args, results):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for n in args.tokens:
        for G in args.groups:
            H = 4 * G
            g = torch.Generator(device="cuda").manual_seed(2)
            shape = (1, H, n, 128)
            q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_()
            for name, backend in (("dense cuDNN SDPA", SDPBackend.CUDNN_ATTENTION),
                                  ("dense FA2 (SDPA flash)", SDPBackend.FLASH_ATTENTION)):
                key = dict(tokens=n, G=G, layout="1 doc", impl=name)
                if elapsed() > args.deadline:
                    results.append({**key, "error": "skipped: time"})
                    continue

                def fwd(q=q, k=k, v=v, backend=backend):
                    with sdpa_kernel(backend):
                        return sdpa(q, k, v, is_causal=True)

                def fwdbwd(fwd=fwd, do=do):
                    fwd().backward(do)

                results.append({**key, **timed_pair(fwd, fwdbwd, [q, k, v])})
                print(json.dumps(results[-1]), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


def run_flex(args, results):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for n in args.tokens:
        for G in args.flex_groups:
            H = 4 * G
            g = torch.Generator(device="cuda").manual_seed(3)
            q, do = (torch.randn(1, H, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(2))
            k, v = (torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
            for x in (q, k, v):
                x.requires_grad_()
            for lname, lengths in layouts(n, args.layouts):
                key = dict(tokens=n, G=G, layout=lname, impl="FlexAttention (doc mask)")
                if elapsed() > args.deadline:
                    results.append({**key, "error": "skipped: time"})
                    continue
                doc = torch.repeat_interleave(
                    torch.arange(len(lengths), device="cuda"),
                    torch.tensor(lengths, device="cuda"),
                )

                def mask_mod(b, h, qi, ki, doc=doc):
                    return (doc[qi] == doc[ki]) & (qi >= ki)

                mask = create_block_mask(mask_mod, 1, 1, n, n, device="cuda")

                def fwd(q=q, k=k, v=v, mask=mask):
                    return flex(q, k, v, block_mask=mask, enable_gqa=True)

                def fwdbwd(fwd=fwd, do=do):
                    fwd().backward(do)

                results.append({**key, **timed_pair(fwd, fwdbwd, [q, k, v])})
                print(json.dumps(results[-1]), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


def _shapes(args):
    return [(n, G, b, t) for n in args.tokens for G in args.groups for b, t in args.configs]


def run_profile(args, results):
    """Per-kernel device time of one forward+backward (torch.profiler), one document."""
    from torch.profiler import ProfilerActivity, profile

    sa = triton_op()
    for n, G, block, topk in _shapes(args):
        q, k, v, do = make(n, G)
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        idx = random_selection(cu, 4, topk, block, torch.Generator(device="cuda").manual_seed(5))

        def step(q=q, k=k, v=v, do=do, idx=idx, cu=cu, block=block):
            sa.selected_attention(q, k, v, idx, cu, block).backward(do)

        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        rows = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows[e.key[:60]] = t / 3 / 1000
        top = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:14])
        results.append(dict(tokens=n, G=G, block=block, topk=topk, layout="1 doc",
                            impl="profile", kernels_ms=top))
        print(f"profile {n} G={G} ({block},{topk}):", flush=True)
        for name, ms in top.items():
            print(f"   {ms:8.3f} ms  {name}", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


FWD_CFGS = [(64, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2), (64, 8, 3)]
BWD_CFGS = [(64, 8, 2), (64, 4, 2), (32, 4, 2), (64, 8, 1), (128, 8, 2)]


def launch_config(cfg: tuple[int, ...]) -> dict:
    """``(BLOCK_M, num_warps, num_stages[, prefetch])`` as a selected kernel's launch config."""
    bm, warps, stages = cfg[:3]
    return {"BLOCK_M": bm, "num_warps": warps, "num_stages": stages,
            "PREFETCH": len(cfg) > 3 and bool(cfg[3])}


def tune_settings(which: str, cfg: tuple[int, ...]):
    """The process's settings with the forward (``which="fwd"``) or backward launch config."""
    field = "selected_fwd_config" if which == "fwd" else "selected_bwd_config"
    return dataclasses.replace(base_settings(), **{field: launch_config(cfg)})


def run_tune(args, results):
    """Forward and forward+backward time of the block-major kernels under several configs."""
    sa = triton_op()
    for n, G, block, topk in _shapes(args):
        q, k, v, do = make(n, G)
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        idx = random_selection(cu, 4, topk, block, torch.Generator(device="cuda").manual_seed(6))
        for which, cfgs in (("fwd", args.fwd_cfgs), ("bwd", args.bwd_cfgs)):
            for cfg in cfgs:
                if elapsed() > args.deadline:
                    break
                settings = tune_settings(which, cfg)

                def fwd(q=q, k=k, v=v, idx=idx, cu=cu, block=block, settings=settings):
                    return sa.selected_attention(q, k, v, idx, cu, block, settings=settings)

                def fwdbwd(fwd=fwd, do=do):
                    fwd().backward(do)

                try:
                    ms = bench(fwd) if which == "fwd" else bench(fwdbwd, grad_to_none=[q, k, v])
                except Exception as error:
                    ms = f"{type(error).__name__}: {str(error)[:100]}"
                results.append(dict(tokens=n, G=G, block=block, topk=topk, impl="tune",
                                    kernel=which, cfg=list(cfg), ms=ms))
                print(json.dumps(results[-1]), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown(meta, results) -> str:
    lines = [
        "# Selected attention benchmark",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, Triton {meta['triton']}; "
        f"{meta['date']}.",
        "bf16, d = 128, 4 KV heads; median of `triton.testing.do_bench` (warmup 25, rep 100 ms);",
        "peak = extra GiB allocated by one forward+backward. Measured here unless labelled quoted.",
        "",
        "## Ours (selected branch, forward+backward and forward)",
        "",
        "| tokens | G | (B, T) | layout | paths | fwd ms | fwd+bwd ms | peak GiB | target ms "
        "| met | packed / 1 doc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = [r for r in results if r["impl"] == "ours"]
    results = [r for r in results if r["impl"] not in ("profile", "tune")]
    one_doc = {}
    for r in ours:
        if r.get("layout") == "1 doc" and "fwdbwd_ms" in r:
            k = (r["tokens"], r["G"], r["block"], r["topk"], r["modes"])
            one_doc[k] = r["fwdbwd_ms"]
    for r in ours:
        target = None
        q = QUOTED.get(r["tokens"])
        if q and (r["block"], r["topk"]) == (64, 16) and r["G"] in q["fsa"] and (
            r["layout"] == "1 doc"
        ):
            target = min(q["fsa"][r["G"]] / 4, q["nsa"][r["G"]] / 2)
        fb = r.get("fwdbwd_ms")
        met = "" if target is None or fb is None else ("yes" if fb <= target else
                                                        f"no ({fb / target:.2f}x)")
        ratio = ""
        base = one_doc.get((r["tokens"], r["G"], r["block"], r["topk"], r["modes"]))
        if r["layout"] != "1 doc" and base and fb:
            ratio = f"{fb / base:.2f}" + (" ok" if fb <= 1.2 * base else " over 1.2")
        head = f"| {r['tokens']} | {r['G']} | ({r['block']}, {r['topk']}) | {r['layout']} "
        if "error" in r:
            lines.append(head + f"| {r['modes']} | {r['error']} | | | | | |")
            continue
        lines.append(
            head + f"| {r['modes']} | {fmt(r['fwd_ms'])} | {fmt(fb)} | {fmt(r['peak_gib'])} "
            f"| {fmt(target)} | {met} | {ratio} |"
        )
    lines += [
        "",
        "## Baselines (measured in the same process)",
        "",
        "| tokens | G | layout | implementation | fwd ms | fwd+bwd ms | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["impl"] == "ours":
            continue
        head = f"| {r['tokens']} | {r['G']} | {r['layout']} | {r['impl']} "
        if "error" in r:
            lines.append(head + f"| {r['error']} | | |")
        else:
            lines.append(head + f"| {fmt(r['fwd_ms'])} | {fmt(r['fwdbwd_ms'])} "
                         f"| {fmt(r['peak_gib'])} |")
    lines += [
        "",
        "## Quoted from kernels.md (H200), not measured here: fwd+bwd ms, one document, (64, 16)",
        "",
        "| tokens | G | official FSA | NSA reference | target = min(FSA/4, NSA/2) |",
        "|---|---|---|---|---|",
    ]
    for n, q in QUOTED.items():
        for G in q["fsa"]:
            t = min(q["fsa"][G] / 4, q["nsa"][G] / 2)
            lines.append(f"| {n} | {G} | {q['fsa'][G]} | {q['nsa'][G]} | {t:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ partials sweep

SWEEP_SHAPES = [("16K 1 doc G=1", 16384, 1), ("16K 1 doc G=4", 16384, 4),
                ("64K 1 doc G=1", 65536, 1), ("64K 1 doc G=4", 65536, 4),
                ("16K 1 doc G=16", 16384, 16)]
KV_HEADS, D, BLOCK, TOPK = 4, 128, 64, 16


def sweep_bench(fn) -> float:
    """The sweeps' budget: 10 ms warm-up, 60 ms of repetitions (as the compressed benchmark)."""
    return bench(fn, warmup=10, rep=60)


def grads(q, k, v, do, idx, cu, partials="fp32"):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = triton_op().selected_attention(q, k, v, idx, cu, BLOCK, partials=partials)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def partials_shape(n: int, G: int) -> dict:
    sa = triton_op()
    gen = torch.Generator(device="cuda").manual_seed(G)
    H = KV_HEADS * G
    q, do = (torch.randn(n, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
             for _ in range(2))
    k, v = (torch.randn(n, KV_HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    idx = random_selection(cu, KV_HEADS, TOPK, BLOCK, gen)
    truth = grads(*(x.float() for x in (q, k, v, do)), idx, cu)
    row: dict = {}
    for partials in ("fp32", "half"):
        ours = grads(q, k, v, do, idx, cu, partials)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def fwd(leaves=leaves, partials=partials):
            return sa.selected_attention(*leaves, idx, cu, BLOCK, partials=partials)

        def fwd_bwd(fwd=fwd, leaves=leaves):
            return torch.autograd.grad(fwd(), leaves, do)

        row[partials] = {
            "fwd_ms": sweep_bench(fwd),
            "fwd_bwd_ms": sweep_bench(fwd_bwd),
            **{f"rel_err_{name}": rel(a, b)
               for name, a, b in zip(("o", "dq", "dk", "dv"), ours, truth, strict=True)},
        }
    row["fwd_bwd_speedup"] = row["fp32"]["fwd_bwd_ms"] / row["half"]["fwd_bwd_ms"]
    return row


def partials_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Selected attention: fp32 against half (bf16) O/dQ partials",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}. "
        f"bf16, d = {D}, {KV_HEADS} KV heads, block {BLOCK}, top-{TOPK}, one document, block-"
        "major paths; errors are relative L2 against the same kernels on fp32 inputs.",
        "",
        "| shape | partials | fwd ms | fwd+bwd ms | err o | err dq | err dk | err dv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, row in results["shapes"].items():
        for partials in ("fp32", "half"):
            r = row[partials]
            lines.append(
                f"| {shape} | {partials} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                f"{r['rel_err_o']:.2e} | {r['rel_err_dq']:.2e} | {r['rel_err_dk']:.2e} | "
                f"{r['rel_err_dv']:.2e} |")
        lines.append(f"| {shape} | fp32 / half (fwd+bwd) | | {row['fwd_bwd_speedup']:.2f}× | | | "
                     "| |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- the runner

RUNNERS = {"ours": run_ours, "dense": run_dense, "flex": run_flex, "reference": run_reference,
           "profile": run_profile, "tune": run_tune}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--configs", nargs="+", default=["64:16", "128:8"], help="block:topk pairs")
    p.add_argument("--layouts", nargs="+", choices=["one", "4k", "1k"],
                   default=["one", "4k", "1k"])
    p.add_argument("--selections", nargs="+", default=["random"],
                   help="random, or coherent:S (spans of S tokens share one selection)")
    p.add_argument("--parts", nargs="+", choices=sorted(RUNNERS),
                   default=["ours", "dense", "flex", "reference"])
    p.add_argument("--flex-groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--ref-tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--ref-groups", type=int, nargs="+", default=[1])
    p.add_argument("--deadline", type=float, default=1e9)
    p.add_argument("--fwd-cfgs", nargs="+", default=[",".join(map(str, c)) for c in FWD_CFGS],
                   help="tune: forward BLOCK_M,num_warps,num_stages[,prefetch]")
    p.add_argument("--bwd-cfgs", nargs="+", default=[",".join(map(str, c)) for c in BWD_CFGS])
    p.add_argument("--forced", nargs="+", choices=["sparse", "dense"], default=["sparse"],
                   help="KernelSettings.selected_forced of our rows: the forced blocks through "
                        "the token kernels (sparse) or as block-sparse query tiles (dense)")
    p.add_argument("--sweep-partials", action="store_true",
                   help="the fp32 / half partials sweep instead (fixed shapes; tag "
                        "partials_sweep)")


def parse_lists(args: argparse.Namespace) -> argparse.Namespace:
    """The ``a:b`` and ``a,b,c`` flags as tuples of ints."""
    args.configs = [tuple(int(x) for x in c.split(":")) for c in args.configs]
    args.fwd_cfgs = [tuple(int(x) for x in c.split(",")) for c in args.fwd_cfgs]
    args.bwd_cfgs = [tuple(int(x) for x in c.split(",")) for c in args.bwd_cfgs]
    for kind in args.selections:
        if kind != "random" and not (kind.startswith("coherent:")
                                     and kind.split(":", 1)[1].isdigit()):
            raise SystemExit(f"selected: error: --selections takes random or coherent:S, "
                             f"got {kind!r}")
    return args


@register("selected", summary="selected attention (and --sweep-partials) against the reference "
          "and dense SDPA / FlexAttention", arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    global START
    args = parse_lists(args)
    require_cuda("selected")
    START = time.time()
    if args.sweep_partials:
        record = Record("selected", run_meta(), args.out, join_tags("partials_sweep", args.tag))
        return run_shapes(record, record.meta, SWEEP_SHAPES, partials_shape, partials_markdown)
    meta = {**run_meta(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    record = Record("selected", meta, args.out, args.tag)
    results: list[dict] = []
    for part in args.parts:
        RUNNERS[part](args, results)
    meta["seconds"] = elapsed()
    record.write({"meta": meta, "quoted_from_kernels_md_H200": QUOTED, "results": results},
                 default=str)
    md = markdown(meta, results)
    record.write_text(md)
    print(md)
    assert not math.isnan(meta["seconds"])
    return {"meta": meta, "results": results}


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["selected"].run()
