"""Benchmark of the window_attention Triton kernel against dense attention baselines.

One process, ``triton.testing.do_bench`` medians (25 ms warm-up, 100 ms of repetitions), forward
and forward+backward, peak memory:

* ours: ``window_attention`` with ``window=None`` (dense causal per document) and ``window=512``;
  also the split backward schedule (two kernels) and the atomic-dq one, for comparison with the
  default fused one (``KernelSettings.window_bwd``);
* ``window_attention`` on the library kernels (``KernelSettings.window_kernel``): cuDNN through
  nvidia-cudnn-frontend and FlashAttention-2 through torch's ``varlen_attn``, packed layout with
  GQA, the same two windows (the rows that rank "auto"'s order, ``ops/window_attention/backends``);
* cuDNN SDPA and the SDPA flash backend (FlashAttention-2), causal, on ``[B, H, L, d]``: one
  document is B = 1; equal-length packed documents are a batch (B = n_docs), which is exactly the
  block-diagonal causal mask. K/V are expanded to the H query heads (GQA as MHA; the reduction of
  dK/dV over a group is not timed);
* FlexAttention (``torch.compile``) with a document mask, and a sliding-window + document mask.

Shapes: 16K and 64K tokens; G = 1, 4, 16 with 4 KV heads; d = 128; bf16; one document and packed
4K-token documents. Writes ``window_<device>_<date>[_<tag>].{json,md}`` to ``--out``.
Usage: ``python -m benchmarks run window``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import time

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import Record, bench, peak_mib, rel, require_cuda, run_meta

D = 128
KV_HEADS = 4
DOC = 4096
WINDOW = 512


def triton_op():
    return importlib.import_module("fsa_train.kernels.ops.window_attention.triton")


def causal_pairs(lengths: list[int], window: int | None) -> int:
    """Visible (query, key) pairs of the packed batch."""
    total = 0
    for n in lengths:
        if window is None or window >= n:
            total += n * (n + 1) // 2
        else:
            total += window * (window + 1) // 2 + (n - window) * window
    return total


class Case:
    def __init__(self, n: int, layout: str, G: int, seed: int = 0):
        self.n, self.layout, self.G = n, layout, G
        self.H = G * KV_HEADS
        self.lengths = [n] if layout == "doc" else [DOC] * (n // DOC)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        dt = torch.bfloat16

        def rnd(*shape):
            return torch.randn(*shape, device="cuda", dtype=dt, generator=gen)

        self.q = rnd(n, self.H, D)
        self.k = rnd(n, KV_HEADS, D)
        self.v = rnd(n, KV_HEADS, D)
        self.do = rnd(n, self.H, D)
        cu = [0]
        for length in self.lengths:
            cu.append(cu[-1] + length)
        self.cu = torch.tensor(cu, dtype=torch.int32, device="cuda")

    def name(self) -> str:
        docs = "1 doc" if self.layout == "doc" else f"{len(self.lengths)}x{DOC // 1024}K"
        return f"{self.n // 1024}K {docs} G={self.G}"


def ours(case: Case, window, settings):
    """Forward and forward+backward of ``window_attention`` on the kernel of ``settings``
    (``window_kernel``: ours or a library's) with its backward schedule."""
    wa = triton_op()
    q, k, v = (x.detach().requires_grad_() for x in (case.q, case.k, case.v))
    longest = max(case.lengths)

    def fwd():
        return wa.window_attention(q, k, v, case.cu, window, None, longest, settings=settings)

    def fwd_bwd():
        o = wa.window_attention(q, k, v, case.cu, window, None, longest, settings=settings)
        return torch.autograd.grad(o, (q, k, v), case.do)

    return fwd, fwd_bwd


def sdpa(case: Case, backend):
    from torch.nn.attention import sdpa_kernel

    B, L = len(case.lengths), case.lengths[0]

    def bhld(x):
        x = x.repeat_interleave(case.G, dim=1) if x.shape[1] != case.H else x
        return x.view(B, L, case.H, D).transpose(1, 2).contiguous()

    q, k, v = (bhld(x).requires_grad_() for x in (case.q, case.k, case.v))
    do = bhld(case.do)

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        return torch.autograd.grad(run(), (q, k, v), do)

    def output():  # packed layout [n, H, d], to compare with ours
        return run().transpose(1, 2).reshape(case.n, case.H, D)

    return run, fwd_bwd, output


_flex = None


def flex(case: Case, window):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention)
    doc_id = torch.repeat_interleave(
        torch.arange(len(case.lengths), device="cuda"),
        torch.tensor(case.lengths, device="cuda"),
    )

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, case.n, case.n, device="cuda")

    def t(x):
        return x.transpose(0, 1).unsqueeze(0).contiguous()

    q, k, v = (t(x).requires_grad_() for x in (case.q, case.k, case.v))
    do = t(case.do)

    def run():
        return _flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    def fwd_bwd():
        return torch.autograd.grad(run(), (q, k, v), do)

    return run, fwd_bwd


LIBRARY_VARIANTS = {
    "cudnn": {"window_kernel": "cudnn"},
    "cudnn_any_order": {"window_kernel": "cudnn", "window_bwd": "atomic"},
    "flash": {"window_kernel": "flash"},
    "fa4": {"window_kernel": "fa4"},
}
"""``window_attention`` on the library kernels: the settings of each row variant."""

LIBRARY_NAMES = {"cudnn": "cuDNN frontend (packed)",
                 "cudnn_any_order": "cuDNN frontend (packed, any-order bwd)",
                 "flash": "FA2 (torch varlen)",
                 "fa4": "FA4 (flash-attn-4, packed)"}
"""Row names of the variants (any-order: cuDNN's non-deterministic backward)."""


def library_unsupported(variant: str, case: Case) -> str | None:
    """Why the library path of ``variant`` cannot run ``case`` (None when it can)."""
    from fsa_train.kernels.ops.window_attention.backends import LIBRARY_KERNELS

    kernel = LIBRARY_VARIANTS[variant]["window_kernel"]
    return LIBRARY_KERNELS[kernel].unsupported(case.q, case.k, WINDOW)


def measure(fwd, fwd_bwd) -> dict:
    fwd_bwd()  # compile / autotune first
    fwd()
    torch.cuda.synchronize()
    out = {"fwd_ms": bench(fwd), "fwd_bwd_ms": bench(fwd_bwd)}
    out["peak_mib"] = peak_mib(fwd_bwd)
    return out


def tuner_choices() -> dict:
    """What the window-attention tuners chose: ``{tuner: {key: config}}``."""
    from fsa_train.kernels.tuning import autotune_choices

    return {name: {", ".join(entry["key"]): entry["config"] for entry in entries}
            for name, entries in autotune_choices().items()
            if name.startswith("window_attention.")}


def library_line(meta: dict) -> str:
    """"cuDNN <v>, nvidia-cudnn-frontend <v>, ..., " for results that recorded them (older ones
    did not)."""
    if "libraries" not in meta:
        return ""
    installed = [f"{name} {version}" for name, version in meta["libraries"].items() if version]
    return ", ".join([f"cuDNN {meta.get('cudnn')}", *installed]) + ", "


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# window_attention benchmark",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, "
        f"{library_line(meta)}{meta['date']}. "
        f"bf16, d = {D}, {KV_HEADS} KV heads, H = 4·G; median of `triton.testing.do_bench` "
        "(ms); peak = extra memory of one forward+backward (MiB). cuDNN and FA2 (SDPA flash) "
        "run causal on `[B, H, L, d]` with K/V expanded to H heads (packed equal-length "
        "documents as a batch); Flex = compiled FlexAttention with a document (+ window) mask.",
        "",
        "| shape | method | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB "
        "| fwd vs cuDNN | fwd+bwd vs cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cudnn = next(
            (r for r in results["rows"] if r["shape"] == row["shape"] and r["method"] == "cuDNN"),
            None,
        )
        ratio = f"{row['fwd_bwd_ms'] / cudnn['fwd_bwd_ms']:.2f}×" if cudnn else ""
        ratio_f = f"{row['fwd_ms'] / cudnn['fwd_ms']:.2f}×" if cudnn else ""
        lines.append(
            f"| {row['shape']} | {row['method']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} "
            f"| {row['fwd_tflops']:.0f} | {row['fwd_bwd_tflops']:.0f} | {row['peak_mib']:.0f} "
            f"| {ratio_f} | {ratio} |"
        )
    if results.get("skipped"):
        lines += ["", "Did not run:", ""] + [f"- {entry}" for entry in results["skipped"]]
    if results.get("checks"):
        lines += ["", "Output check, ours (window None) vs cuDNN, relative L2:", ""]
        lines += [f"- {k}: {v:.2e}" for k, v in results["checks"].items()]
    lines += ["", "Autotuner choices (key: head dim, G, window?, dtypes):", ""]
    for name, cache in results["autotune"].items():
        for key, cfg in cache.items():
            lines.append(f"- {name} {key}: {cfg}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--layouts", nargs="+", choices=["doc", "packed"],
                        default=["doc", "packed"])
    parser.add_argument("--flex-groups", type=int, nargs="*", default=[4])
    parser.add_argument("--flex-window-seqs", type=int, nargs="*", default=[16384])
    parser.add_argument("--split-groups", type=int, nargs="*", default=[])
    parser.add_argument("--atomic-groups", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--libraries", nargs="*", choices=list(LIBRARY_VARIANTS),
                        default=list(LIBRARY_VARIANTS),
                        help="window_attention on these library kernels, beside ours")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip Flex rows after this")


@register("window", summary="window / dense varlen attention against cuDNN, FA2 and "
          "FlexAttention", arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    require_cuda("window")
    from fsa_train.kernels.settings import default_settings

    base = dataclasses.replace(default_settings(), window_kernel="triton")
    fused, split, atomic = (dataclasses.replace(base, window_bwd=mode)
                            for mode in ("fused", "split", "atomic"))
    libraries = {variant: dataclasses.replace(base, **LIBRARY_VARIANTS[variant])
                 for variant in args.libraries}
    start = time.time()
    props = torch.cuda.get_device_properties(0)
    meta = {**run_meta(), "device": f"{props.name} ({props.multi_processor_count} SMs)",
            "bwd_mode_default": base.window_bwd}
    record = Record("window", meta, args.out, args.tag)
    results = {"meta": meta, "rows": [], "checks": {}}

    def save():
        results["autotune"] = tuner_choices()
        record.write(results, markdown(results))

    def add(case, method, window, timing):
        flops = 4 * D * case.H * causal_pairs(case.lengths, window)
        row = {
            "shape": case.name(), "n": case.n, "layout": case.layout, "G": case.G,
            "method": method, "window": window, **timing,
            "fwd_tflops": flops / timing["fwd_ms"] * 1e-9,
            "fwd_bwd_tflops": 3.5 * flops / timing["fwd_bwd_ms"] * 1e-9,
        }
        results["rows"].append(row)
        print(
            f"{row['shape']:<22} {method:<22} fwd {timing['fwd_ms']:9.3f} ms  fwd+bwd "
            f"{timing['fwd_bwd_ms']:9.3f} ms  peak {timing['peak_mib']:8.0f} MiB  "
            f"[{time.time() - start:5.0f} s]",
            flush=True,
        )
        save()

    from torch.nn.attention import SDPBackend

    pending_flex = []
    for n in args.seqs:
        for layout in args.layouts:
            for G in args.groups:
                case = Case(n, layout, G)
                run, fb, output = sdpa(case, SDPBackend.CUDNN_ATTENTION)
                add(case, "cuDNN", None, measure(run, fb))
                o_ref = output().detach()
                del run, fb, output
                run, fb, _ = sdpa(case, SDPBackend.FLASH_ATTENTION)
                add(case, "FA2 (SDPA flash)", None, measure(run, fb))
                del run, fb
                torch.cuda.empty_cache()
                fwd, fb = ours(case, None, fused)
                add(case, "ours", None, measure(fwd, fb))
                results["checks"][case.name()] = rel(fwd(), o_ref)
                del o_ref
                if layout == "doc" and G in args.split_groups:
                    add(case, "ours (split bwd)", None, measure(*ours(case, None, split)))
                if G in args.atomic_groups:
                    add(case, "ours (atomic dq)", None, measure(*ours(case, None, atomic)))
                fwd, fb = ours(case, WINDOW, fused)
                add(case, f"ours W={WINDOW}", WINDOW, measure(fwd, fb))
                if G in args.atomic_groups:
                    add(case, f"ours W={WINDOW} (atomic dq)", WINDOW,
                        measure(*ours(case, WINDOW, atomic)))
                del fwd, fb
                for kernel, settings in libraries.items():
                    reason = library_unsupported(kernel, case)
                    if reason is not None:
                        print(f"{kernel} skipped at {case.name()}: {reason}")
                        results.setdefault("skipped", []).append(
                            f"{LIBRARY_NAMES[kernel]} {case.name()}: {reason}")
                        continue
                    for window in (None, WINDOW):
                        suffix = "" if window is None else f" W={window}"
                        try:
                            timing = measure(*ours(case, window, settings))
                        except Exception as error:  # noqa: BLE001 - report and go on
                            print(f"{kernel} failed at {case.name()}{suffix}: {error!r}"[:300])
                            results.setdefault("skipped", []).append(
                                f"{LIBRARY_NAMES[kernel]}{suffix} {case.name()}: failed "
                                f"({type(error).__name__}: {str(error)[:80]})")
                            del error
                            gc.collect()
                            torch.cuda.empty_cache()
                            continue
                        add(case, LIBRARY_NAMES[kernel] + suffix, window, timing)
                    torch.cuda.empty_cache()
                if G in args.flex_groups:
                    pending_flex.append((n, layout, G, None))
                    if n in args.flex_window_seqs:
                        pending_flex.append((n, layout, G, WINDOW))
                del case
                torch.cuda.empty_cache()

    for n, layout, G, window in pending_flex:
        if time.time() - start > args.budget_s:
            print(f"budget reached: skipping Flex {n} {layout} G={G} W={window}")
            results.setdefault("skipped", []).append(f"Flex {n} {layout} G={G} W={window}")
            continue
        case = Case(n, layout, G)
        try:
            run, fb = flex(case, window)
            name = "Flex doc mask" if window is None else f"Flex W={window}"
            add(case, name, window, measure(run, fb))
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"Flex failed at {case.name()} W={window}: {error!r}"[:400])
            results.setdefault("skipped", []).append(f"Flex {case.name()} W={window}: failed")
        del case
        torch.cuda.empty_cache()

    save()
    print()
    print(markdown(results))
    return results


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["window"].run()
