"""The selected branch with fp32 against half-precision O/dQ partials (``partials=``, in training
``model.config.nsa.selected_partials``):
time and accuracy side by side, for the numerics decision the partials need (issue 3 asks for
fp32; they are most of the branch's memory traffic).

For each shape: forward and forward+backward medians (``triton.testing.do_bench``) of both
settings, and the relative L2 error of o, dq, dk, dv of each against the same kernels run on the
inputs cast to fp32 (exact "ieee" dots, fp32 partials; tested against the reference on the CPU).
bf16, d = 128, 4 KV heads, block 64, top-16, random valid selections. Writes
``partials_sweep.json`` and ``partials_sweep.md`` to ``--out``.
Usage: ``PYTHONPATH=$PWD python3 benchmarks/sweep_partials.py --out $OUT``.
"""

from __future__ import annotations

import importlib

import torch
from bench_compressed import bench
from bench_window import rel
from sweep_common import run_sweep

sa = importlib.import_module("fsa_train.kernels.triton.selected_attention")

SHAPES = [("16K 1 doc G=1", 16384, 1), ("16K 1 doc G=4", 16384, 4), ("64K 1 doc G=1", 65536, 1),
          ("64K 1 doc G=4", 65536, 4), ("16K 1 doc G=16", 16384, 16)]
KV_HEADS, D, BLOCK, TOPK = 4, 128, 64, 16


def grads(q, k, v, do, idx, cu, partials="fp32"):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = sa.selected_attention(q, k, v, idx, cu, BLOCK, fwd_mode="block", dq_mode="block",
                              partials=partials)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def run_shape(n: int, G: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(G)
    H = KV_HEADS * G
    q, do = (torch.randn(n, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
             for _ in range(2))
    k, v = (torch.randn(n, KV_HEADS, D, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    idx = sa.random_selection(cu, KV_HEADS, TOPK, BLOCK, gen)
    truth = grads(*(x.float() for x in (q, k, v, do)), idx, cu)
    row: dict = {}
    for partials in ("fp32", "half"):
        ours = grads(q, k, v, do, idx, cu, partials)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def fwd(leaves=leaves, partials=partials):
            return sa.selected_attention(*leaves, idx, cu, BLOCK, fwd_mode="block",
                                         dq_mode="block", partials=partials)

        def fwd_bwd(fwd=fwd, leaves=leaves):
            return torch.autograd.grad(fwd(), leaves, do)

        row[partials] = {
            "fwd_ms": bench(fwd),
            "fwd_bwd_ms": bench(fwd_bwd),
            **{f"rel_err_{name}": rel(a, b)
               for name, a, b in zip(("o", "dq", "dk", "dv"), ours, truth, strict=True)},
        }
    row["fwd_bwd_speedup"] = row["fp32"]["fwd_bwd_ms"] / row["half"]["fwd_bwd_ms"]
    return row


def markdown(results: dict) -> str:
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


def main() -> None:
    run_sweep(__doc__.splitlines()[0], "partials_sweep", SHAPES, run_shape, markdown)


if __name__ == "__main__":
    main()
