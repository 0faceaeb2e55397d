"""Registers, stack (spills), shared memory and SASS size of our hot Triton kernels, compiled
offline for Hopper (sm_90) on a machine without a GPU.

Spills are the recurring suspect in our slow kernels (``docs/notes/window.md``,
``docs/notes/compressed.md``), and a GPU session is short: this checks each launch configuration in
the autotune lists, and candidates for them, before any device time is spent. It needs the
NVIDIA backend of the local Triton (its bundled ``cuobjdump``). The GPU image's Triton (3.6)
allocates registers differently from a newer one, so check with that version too; it installs
beside the project's without touching it:

    python -m benchmarks run kernel_resources [--kernels select selected_fwd ...] [--out DIR]
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python -m benchmarks run kernel_resources --tag triton36

Writes ``kernel_resources_sm90_<date>[_<tag>].{json,md}`` to ``--out``.

It is a guide, not a measurement: the autotuner and the benchmarks decide.

Every kernel runs at the benchmark shape: bf16, d = 128, G = 4 and default NSA parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from benchmarks import REGISTRY, register
from benchmarks.common import Record, run_meta

TARGET = GPUTarget("cuda", 90, 32)
DEVICE = "sm90"
"""The device part of the result names: the offline compile's target."""


SMALL_INTS = ("n_docs", "n_iter", "G", "h", "h_kv", "kernel", "stride", "block", "topk",
              "init_blocks", "local_blocks", "window", "segq", "nbmax", "nkeys", "s_split")
"""Scalar arguments whose values are not multiples of 16 at the benchmark shape; every other
integer (strides, token counts) gets the 16-divisibility hint Triton's launcher would give it."""


@dataclass
class Spec:
    """One kernel: its JIT function, pointer element types, constexprs, and configurations
    given as ``(constexpr overrides, num_warps, num_stages)``."""

    load: Callable[[], object]
    pointers: dict[str, str]
    constexprs: dict[str, object]
    configs: list[tuple[dict, int, int]]
    floats: tuple[str, ...] = ()
    note: str = ""
    small: tuple[str, ...] = SMALL_INTS
    upper_ints: tuple[str, ...] = ()
    """Upper-case integer arguments that are not pointers (``H``)."""


def signature(fn, spec: Spec, constexprs: dict) -> tuple[dict, dict]:
    """Triton types of every argument (pointers by name, floats listed, other scalars i32) and
    the 16-divisibility hints of a real launch (pointers, strides, token counts)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = spec.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in spec.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in spec.small:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def resources(fn, spec: Spec, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    sig, attrs = signature(fn, spec, constexprs)
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(found[1]), "stack_bytes": int(found[2]),
            "shared_bytes": kernel.metadata.shared,
            "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M))}


def _module(op: str):
    """The Triton module of ``op`` (``fsa_train.kernels.ops.<op>.triton``)."""
    import importlib

    return importlib.import_module(f"fsa_train.kernels.ops.{op}.triton")


def _block_sparse():
    """The block-shared selected kernels' module."""
    import importlib

    return importlib.import_module("fsa_train.kernels.ops.selected_attention.block_sparse")


BF16 = "*bf16"
F32 = "*fp32"
I32 = "*i32"

SPECS: dict[str, Spec] = {
    "select": Spec(
        load=lambda: _module("select_blocks")._select_kernel,
        pointers={"Q": BF16, "K": BF16, "LSE": F32, "IDX": I32, "CU": I32, "CUC": I32},
        floats=("qk_scale",),
        constexprs={"HEAD_DIM": 128, "DOT_PREC": "tf32", "A": 2, "BS": 4, "NBT": 16, "TP": 16,
                    "BITONIC": False, "LOG_TP": 4, "BLOCK_M": 64, "BLOCK_MODE": False},
        configs=[({"BLOCK_M": 64}, 4, 2), ({"BLOCK_M": 128}, 8, 2), ({"BLOCK_M": 64}, 8, 2),
                 ({"BLOCK_M": 64, "BITONIC": True}, 4, 2),
                 ({"BLOCK_M": 64, "BITONIC": True}, 8, 2)],
        note="select_blocks: the tuned list, then FSA_TOPK_MERGE=bitonic",
    ),
    "selected_fwd": Spec(
        load=lambda: _module("selected_attention")._fwd_block_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "OP": F32, "LP": F32, "PAIRS": I32,
                  "BLK_START": I32, "SEG_KEY": I32, "SEG_OFF": I32, "TOK0": I32, "TOK1": I32},
        floats=("scale_log2",),
        constexprs={"T": 16, "G": 4, "H": 16, "D": 128, "BLOCK_N": 64, "BLOCK_M": 64,
                    "IEEE": False, "PREFETCH": False},
        configs=[({}, 4, 3), ({"BLOCK_M": 128}, 8, 3), ({"BLOCK_M": 128}, 8, 2),
                 ({"BLOCK_M": 64}, 8, 3)],
        note="selected attention forward, block-major (table: 64 rows / 4 warps / 3 stages)",
    ),
    "selected_bwd": Spec(
        load=lambda: _module("selected_attention")._bwd_block_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "LSE": F32, "DELTA": F32,
                  "DKP": F32, "DVP": F32, "DQP": F32, "PAIRS": I32, "BLK_START": I32,
                  "SEG_KEY": I32, "SEG_OFF": I32, "TOK0": I32, "TOK1": I32},
        floats=("scale", "scale_log2"),
        constexprs={"T": 16, "G": 4, "H": 16, "D": 128, "BLOCK_N": 64, "BLOCK_M": 128,
                    "IEEE": False, "PREFETCH": False},
        configs=[({}, 8, 3), ({"BLOCK_M": 64}, 8, 3), ({"BLOCK_M": 64}, 4, 3),
                 ({"BLOCK_M": 128}, 8, 2)],
        note="selected attention backward, block-major (table: 128 rows / 8 warps / 3 stages)",
    ),
    "block_fwd": Spec(
        load=lambda: _block_sparse()._fwd_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "LSE": F32, "IDX": I32, "CU": I32},
        floats=("qk_scale",),
        constexprs={"G": 4, "GP": 2, "D": 128, "B": 64, "T": 16, "TP": 16, "SPLIT": 1, "PACK": 1,
                    "IEEE": False},
        configs=[({}, 8, 3), ({"PACK": 0}, 4, 3), ({"SPLIT": 2}, 4, 3), ({"PACK": 0}, 4, 2)],
        note="block-shared selected attention forward (the tuned list)",
        small=(*SMALL_INTS, "n_rows"),
    ),
    "block_dq": Spec(
        load=lambda: _block_sparse()._dq_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "LSE": F32, "DELTA": F32,
                  "DQ": BF16, "IDX": I32, "CU": I32},
        floats=("scale", "qk_scale"),
        constexprs={"G": 4, "GP": 2, "D": 128, "B": 64, "T": 16, "TP": 16, "SPLIT": 1, "PACK": 1,
                    "IEEE": False},
        configs=[({}, 8, 3), ({"SPLIT": 2}, 4, 3), ({"PACK": 0}, 4, 3)],
        note="block-shared selected attention dQ (the tuned list)",
        small=(*SMALL_INTS, "n_rows"),
    ),
    "block_dkdv": Spec(
        load=lambda: _block_sparse()._dkdv_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "LSE": F32, "DELTA": F32,
                  "DK": BF16, "DV": BF16, "DKP": F32, "DVP": F32, "QROWS": I32, "KEY_START": I32,
                  "SEG_KEY": I32, "COUNTS": I32, "ENDS": I32, "CU": I32},
        floats=("scale", "qk_scale"),
        constexprs={"G": 4, "GP": 2, "D": 128, "B": 64, "SPLIT": 1, "PACK": 1, "IEEE": False,
                    "KSPLIT": 1},
        configs=[({}, 8, 2), ({"PACK": 0}, 4, 2), ({"PACK": 0}, 8, 3), ({"SPLIT": 2}, 8, 2),
                 ({"KSPLIT": 2}, 8, 2), ({"KSPLIT": 2}, 4, 2)],  # tuned list, then KSPLIT
        note="block-shared selected attention dK/dV (the tuned list)",
        small=(*SMALL_INTS, "n_rows"),
    ),
    "compressed_dkdv": Spec(
        load=lambda: _module("compressed_attention")._bwd_dkdv_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "DK": F32, "DV": F32,
                  "LSE": F32, "DELTA": F32, "CU": I32, "CUC": I32},
        floats=("scale", "qk_scale"),
        constexprs={"HEAD_DIM": 128, "DOT_PREC": "tf32", "BLOCK_N": 64, "BLOCK_M": 64},
        configs=[({"BLOCK_N": 64, "BLOCK_M": 64}, 8, 2), ({"BLOCK_N": 64, "BLOCK_M": 128}, 8, 2),
                 ({"BLOCK_N": 32, "BLOCK_M": 64}, 4, 2), ({"BLOCK_N": 128, "BLOCK_M": 32}, 8, 2),
                 ({"BLOCK_N": 128, "BLOCK_M": 64}, 8, 2), ({"BLOCK_N": 64, "BLOCK_M": 64}, 4, 3),
                 ({"BLOCK_N": 32, "BLOCK_M": 64}, 8, 2), ({"BLOCK_N": 32, "BLOCK_M": 32}, 4, 2)],
        note="compressed attention dK/dV (the tuned list)",
    ),
    "compressed_fwd": Spec(
        load=lambda: _module("compressed_attention")._fwd_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "LSE": F32, "CU": I32, "CUC": I32},
        floats=("qk_scale",), upper_ints=("H",),
        constexprs={"HEAD_DIM": 128, "DOT_PREC": "tf32", "BLOCK_M": 128, "BLOCK_N": 64},
        configs=[({}, 8, 3), ({"BLOCK_N": 128}, 8, 2), ({"BLOCK_M": 64}, 4, 3)],
        note="compressed attention forward (the tuned list)",
    ),
    "compressed_dq": Spec(
        load=lambda: _module("compressed_attention")._bwd_dq_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "DQ": BF16, "LSE": F32,
                  "DELTA": F32, "CU": I32, "CUC": I32},
        floats=("scale", "qk_scale"), upper_ints=("H",),
        constexprs={"HEAD_DIM": 128, "DOT_PREC": "tf32", "BLOCK_M": 128, "BLOCK_N": 64},
        configs=[({}, 8, 2), ({"BLOCK_M": 64}, 4, 2)],
        note="compressed attention dQ (the tuned list)",
    ),
    "window_fwd": Spec(
        load=lambda: _module("window_attention")._fwd_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "LSE": F32, "CU": I32},
        floats=("qk_scale",), upper_ints=("H",),
        constexprs={"HEAD_DIM": 128, "HAS_WINDOW": False, "DOT_PREC": "tf32", "BLOCK_M": 128,
                    "BLOCK_N": 64},
        configs=[({}, 8, 3), ({"BLOCK_N": 128}, 8, 2), ({"BLOCK_N": 128}, 8, 3)],
        note="dense/window forward, no window (the tuned list)",
    ),
    "window_bwd": Spec(
        load=lambda: _module("window_attention")._bwd_kernel,
        pointers={"Q": BF16, "K": BF16, "V": BF16, "DO": BF16, "DQ": BF16, "DK": BF16,
                  "DV": BF16, "LSE": F32, "DELTA": F32, "CU": I32},
        floats=("scale", "qk_scale"),
        constexprs={"HEAD_DIM": 128, "HAS_WINDOW": False, "DOT_PREC": "tf32", "BLOCK": 128,
                    "BLOCK_M1": 64, "BLOCK_N2": 64, "DKDV": True, "DQ_PART": True,
                    "ATOMIC_DQ": False},
        configs=[({}, 8, 2), ({"BLOCK_M1": 32}, 8, 2), ({"BLOCK_M1": 32, "BLOCK_N2": 32}, 8, 3),
                 ({"BLOCK_M1": 16, "BLOCK_N2": 32}, 8, 3),
                 ({"BLOCK": 64, "BLOCK_M1": 16, "BLOCK_N2": 32}, 4, 2)],
        note="dense/window backward, fused mode, no window (the tuned list, then BLOCK = 64)",
    ),
}

# the selected kernels with ``partials="half"``: bf16 O / dQ partial buffers, the table configs
SPECS["selected_fwd_half"] = replace(
    SPECS["selected_fwd"], pointers={**SPECS["selected_fwd"].pointers, "OP": BF16},
    configs=SPECS["selected_fwd"].configs[:1], note="selected forward with bf16 O partials")
SPECS["selected_bwd_half"] = replace(
    SPECS["selected_bwd"], pointers={**SPECS["selected_bwd"].pointers, "DQP": BF16},
    configs=SPECS["selected_bwd"].configs[:1], note="selected backward with bf16 dQ partials")


def validate(name: str) -> None:
    """The spec still matches its kernel: every constexpr given, only real arguments named, and
    every upper-case runtime argument (``G`` aside) declared a pointer (kernels change; specs
    must follow)."""
    spec = SPECS[name]
    fn = spec.load()
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    named = set(spec.pointers) | set(spec.floats) | set(spec.constexprs)
    for overrides, _, _ in spec.configs:
        named |= set(overrides)
    problems = []
    if constexprs - set(spec.constexprs):
        problems.append(f"constexprs not given: {sorted(constexprs - set(spec.constexprs))}")
    if named - set(fn.arg_names):
        problems.append(f"not arguments of the kernel: {sorted(named - set(fn.arg_names))}")
    pointers = {n for n in fn.arg_names
                if n not in constexprs and n.isupper() and n not in spec.small
                and n not in spec.upper_ints}
    if pointers != set(spec.pointers):
        problems.append(f"pointers {sorted(pointers)} != declared {sorted(spec.pointers)}")
    if problems:
        raise SystemExit(f"kernel_resources: spec {name!r} is out of date: {'; '.join(problems)}")


def survey(names: list[str], max_configs: int | None = None) -> list[dict]:
    rows = []
    for name in names:
        validate(name)
    for name in names:
        spec = SPECS[name]
        fn = spec.load()
        for overrides, warps, stages in spec.configs[:max_configs]:
            constexprs = {**spec.constexprs, **overrides}
            row = {"kernel": name, "config": overrides, "num_warps": warps, "num_stages": stages}
            try:
                row.update(resources(fn, spec, constexprs, warps, stages))
            except Exception as error:  # noqa: BLE001 - a config that does not compile is a row
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def table(data: dict) -> str:
    """The Markdown table of a survey (from its JSON)."""
    meta, rows = data["meta"], data["rows"]
    lines = [f"# Kernel resources, offline sm_90 compile (Triton {meta['triton']}, "
             f"{meta['date'][:10]})", "",
             "bf16, d = 128, G = 4, default NSA parameters. Stack > 0 means register spills.", "",
             "| kernel | config | warps | stages | registers | stack B | shared KB | SASS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "as listed"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {cfg} | {r['num_warps']} | {r['num_stages']} | "
                         f"{r['error']} | | | |")
            continue
        lines.append(f"| {r['kernel']} | {cfg} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['registers']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{r['sass_instructions']} |")
    lines += ["", *(f"- {name}: {data['notes'][name]}" for name in dict.fromkeys(
        r["kernel"] for r in rows))]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    parser.add_argument("--max_configs", type=int, help="compile only the first N of each list")
    parser.add_argument("--validate_only", action="store_true",
                        help="check the specs against the kernels' signatures, compile nothing")


@register("kernel_resources", summary="registers, spills and shared memory of the hot kernels "
          "(offline sm_90 compile, no GPU)", arguments=add_arguments, gpu=False)
def main(args: argparse.Namespace) -> dict | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (it needs compiled kernels)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.validate_only:
        for name in args.kernels:
            validate(name)
        print(f"{len(args.kernels)} specs match their kernels")
        return None
    meta = {**run_meta("cpu"), "device": f"offline compile for {TARGET.backend} sm_{TARGET.arch}",
            "device_slug": DEVICE}
    rows = survey(args.kernels, args.max_configs)
    data = {"meta": meta, "rows": rows, "notes": {name: SPECS[name].note for name in args.kernels}}
    text = table(data)
    print(text)
    record = Record("kernel_resources", meta, args.out, args.tag)
    record.write(data, text)
    print(f"results: {record.path('.md')}")
    return data


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["kernel_resources"].run()
