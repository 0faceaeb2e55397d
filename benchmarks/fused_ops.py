"""RMSNorm, the SwiGLU MLP and the loss: ours against liger-kernel's fused ops and torch.compile
(issue 20), to decide what ``GPTConfig.fused_ops`` turns on.

At the 0.35B GPT's shapes (d_model 1024, the SwiGLU width ``GPTConfig`` computes, vocab 32000;
``--tokens`` 8192 and 65536 per call), each row times one forward + backward
(``torch.autograd.grad`` of the output with respect to the input and the op's parameters, so no
gradient accumulates between calls) and measures its peak memory above the inputs:

* **rmsnorm**: ours (``nn.RMSNorm``, ``fused_ops="torch"``), liger's RMSNorm
  (``fused_ops="liger"``), ``torch.compile`` of ours;
* **swiglu**: our ``SwiGLU`` MLP with torch's ``silu(a) * b``, the same Linears with liger's
  SiLU-mul kernel, ``torch.compile`` of ours;
* **loss**: ``GPT.loss`` on the final hidden states: our chunked, checkpointed cross-entropy
  (``loss_chunk`` tokens per chunk), liger's fused linear cross-entropy, and the naive
  ``cross_entropy(head(h).float())`` under ``torch.compile`` (all ``[tokens, vocab]`` logits at
  once: may run out of memory, which the table then says).

As in the model: fp32 parameters, bf16 autocast, inputs in the residual stream's fp32
(``--input_dtype``); one target in 16 is -100. Every row reports its time and peak as ratios
against ours and its relative error (output, gradients) against ours. Rows that cannot run say
why (liger-kernel missing, out of memory, a failure) instead of stopping the run. Writes
``fused_ops_<device>_<date>[_<tag>].{json,md}`` after every row.

GPU: ``python -m benchmarks run fused_ops`` (liger rows need ``pip install 'fsa-train[liger]'``).
CPU smoke test (our rows only): ``--device cpu --tokens 64 --d_model 32 --vocab 128``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import REGISTRY, register
from benchmarks.common import Record, peak_mib, rel, require_cuda, run_meta, timer
from fsa_train.config import GPTConfig
from fsa_train.model import GPT
from fsa_train.model.fused import RMSNorm, liger, liger_unavailable
from fsa_train.model.gpt import SwiGLU

OPS = ("rmsnorm", "swiglu", "loss")
METHODS = ("ours", "liger", "compiled")
LABELS = {
    ("rmsnorm", "ours"): "ours (nn.RMSNorm)",
    ("rmsnorm", "liger"): "liger RMSNorm",
    ("rmsnorm", "compiled"): "torch.compile(ours)",
    ("swiglu", "ours"): "ours (silu(a) * b)",
    ("swiglu", "liger"): "liger SiLU-mul in our Linears",
    ("swiglu", "compiled"): "torch.compile(ours)",
    ("loss", "ours"): "ours (chunked CE)",
    ("loss", "liger"): "liger fused linear CE",
    ("loss", "compiled"): "torch.compile(naive CE)",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Run = Callable[[], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
"""One forward + backward: the output and the gradients."""


def model_config(args: argparse.Namespace, fused_ops: str = "torch") -> GPTConfig:
    """The benchmark's GPT (one layer: only its norm, MLP and head are used)."""
    n_head = max(1, args.d_model // 128)
    return GPTConfig(vocab_size=args.vocab, n_layer=1, n_head=n_head, n_kv_head=1,
                     d_model=args.d_model, ffn_hidden=args.ffn_hidden, attention="dense",
                     loss_chunk=args.loss_chunk, fused_ops=fused_ops)


def not_runnable(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run here (None when it can)."""
    if method == "liger":
        if device.type != "cuda":
            return "liger-kernel runs on CUDA only"
        reason = liger_unavailable()
        if reason == "not installed":
            return "liger-kernel is not installed (pip install 'fsa-train[liger]')"
        if reason is not None:
            return f"liger-kernel {reason}"
    if method == "compiled" and device.type != "cuda":
        return "the torch.compile rows run on CUDA only (CPU smoke mode)"
    return None


class Inputs:
    """The inputs of one (op, tokens), shared by every method: the op's input ``x``
    (requires grad), the loss targets and the weights of the torch module."""

    def __init__(self, args: argparse.Namespace, op: str, tokens: int, device: torch.device):
        generator = torch.Generator().manual_seed(tokens)
        dtype = DTYPES[args.input_dtype]
        self.x = torch.randn(tokens, args.d_model, generator=generator).to(device, dtype)
        self.x.requires_grad_()
        self.targets = torch.randint(0, args.vocab, (tokens,), generator=generator).to(device)
        self.targets[::16] = -100
        torch.manual_seed(0)
        cfg = model_config(args)
        if op == "rmsnorm":
            self.module = RMSNorm(cfg.d_model, cfg.norm_eps)
            with torch.no_grad():  # not all ones, so that its gradient path counts
                self.module.weight.copy_(1 + 0.1 * torch.randn(cfg.d_model, generator=generator))
        elif op == "swiglu":
            self.module = SwiGLU(cfg.d_model, cfg.ffn_hidden)
            for linear in (self.module.w1, self.module.w3, self.module.w2):
                torch.nn.init.normal_(linear.weight, 0.0, cfg.init_std)
        else:
            self.module = GPT(cfg)
        self.module.to(device)


def make_run(args: argparse.Namespace, op: str, method: str, inputs: Inputs,
             device: torch.device) -> Run:
    """The forward + backward of ``method`` on ``inputs`` (liger modules get the torch
    module's weights; the compiled one shares them)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    module = inputs.module
    if method == "liger":
        cfg = model_config(args, "liger")
        module = {"rmsnorm": lambda: RMSNorm(cfg.d_model, cfg.norm_eps, "liger"),
                  "swiglu": lambda: SwiGLU(cfg.d_model, cfg.ffn_hidden, "liger"),
                  "loss": lambda: GPT(cfg)}[op]().to(device)
        module.load_state_dict(inputs.module.state_dict())
    x, targets = inputs.x, inputs.targets
    if op == "loss":
        head = module.head.weight
        wrt = (x, head)
        if method == "compiled":
            naive = torch.compile(naive_loss, dynamic=False)
            forward = lambda: naive(x, head, targets)  # noqa: E731
        else:
            forward = lambda: module.loss(x, targets)  # noqa: E731
    else:
        wrt = (x, *module.parameters())
        call = torch.compile(module, dynamic=False) if method == "compiled" else module
        forward = lambda: call(x)  # noqa: E731
    with autocast:
        probe = forward()
    grad_out = (None if probe.dim() == 0 else
                torch.randn(probe.shape, generator=torch.Generator().manual_seed(1))
                .to(probe.device, probe.dtype))
    del probe

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with autocast:
            out = forward()
        return out, torch.autograd.grad(out, wrt, grad_out)

    return run


def naive_loss(hidden: torch.Tensor, weight: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 of all logits at once (to be compiled)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=-100)


def measure(run: Run, device: torch.device, args: argparse.Namespace) -> dict:
    run()  # compile, autotune
    ms = timer(device.type, warmup=args.warmup_ms, rep=args.rep_ms)(run)
    return {"fwd_bwd_ms": ms, "peak_mib": peak_mib(run, device.type)}


def errors(run: Run, reference: tuple | None) -> dict:
    """Relative L2 errors of ``run``'s output and gradients against ours."""
    if reference is None:
        return {}
    out, grads = run()
    ref_out, ref_grads = reference
    return {"rel_out": rel(out, ref_out),
            "rel_grads": max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True))}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(args: argparse.Namespace, op: str, method: str, tokens: int, inputs: Inputs,
            device: torch.device, reference: tuple | None) -> tuple[dict, tuple | None]:
    """One row (``status`` "ok", "skipped: …", "OOM" or "failed: …") and, for ours, the
    output and gradients the other methods are compared with."""
    row: dict = {"op": op, "method": method, "label": LABELS[op, method], "tokens": tokens}
    reason = not_runnable(method, device)
    if reason is not None:
        return {**row, "status": f"skipped: {reason}"}, None
    status, result = "ok", None
    try:
        run = make_run(args, op, method, inputs, device)
        row.update(measure(run, device, args))
        row.update(errors(run, reference))
        if method == "ours":
            out, grads = run()
            result = (out.detach(), tuple(g.detach() for g in grads))
        del run
    except torch.OutOfMemoryError:
        status = "OOM"
    except Exception as error:  # noqa: BLE001 - report the row and go on
        status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        del error
    free(device)
    return {**row, "status": status}, result


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with ``speedup`` (ours' time / its time) and ``peak_ratio`` (its peak / ours')
    against ours at the same op and tokens (None where either did not run)."""
    ours = {(r["op"], r["tokens"]): r for r in rows if r["method"] == "ours"
            and r["status"] == "ok"}
    for r in rows:
        base = ours.get((r["op"], r["tokens"]))
        ok = r["status"] == "ok" and base is not None
        r["speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ok else None
        r["peak_ratio"] = (r["peak_mib"] / base["peak_mib"]
                           if ok and r.get("peak_mib") and base.get("peak_mib") else None)
    return rows


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def markdown(report: dict) -> str:
    """The report as Markdown: one row per (op, tokens, method), then the rows that did not
    run and why."""
    meta, s = report["meta"], report["settings"]
    libraries = ", ".join(f"{name} {version}" for name, version in
                          (meta.get("libraries") or {}).items() if version) or "none"
    lines = [
        "# Fused ops: RMSNorm, SwiGLU MLP and loss",
        "",
        f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, CUDA "
        f"{meta.get('cuda')}; libraries: {libraries}; liger-kernel: "
        f"{meta.get('liger') or 'not importable'}; {meta['date']}, commit {meta['commit']}.",
        "",
        f"d_model {s['d_model']}, SwiGLU hidden {s['ffn_hidden']}, vocab {s['vocab']}, "
        f"loss_chunk {s['loss_chunk']}; fp32 parameters, "
        f"{'bf16 autocast' if s['bf16'] else 'no autocast'}, {s['input_dtype']} inputs, one "
        "target in 16 ignored. One forward + backward (`torch.autograd.grad` of the output "
        "for the input and the op's parameters): median ms, and peak MiB above the inputs. "
        "Speed-up = ours' time / the row's; peak ratio = the row's peak / ours'; errors are "
        "relative L2 against ours (the largest over the gradients).",
        "",
        "| op | tokens | method | fwd+bwd ms | speed-up | peak MiB | peak ratio | rel err out "
        "| rel err grads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            continue
        lines.append(
            f"| {r['op']} | {r['tokens']} | {r['label']} | {r['fwd_bwd_ms']:.3f} "
            f"| {_fmt(r['speedup'], '.2f', '×')} | {_fmt(r.get('peak_mib'), '.0f')} "
            f"| {_fmt(r['peak_ratio'], '.2f', '×')} | {_fmt(r.get('rel_out'), '.1e')} "
            f"| {_fmt(r.get('rel_grads'), '.1e')} |")
    missing = [r for r in report["rows"] if r["status"] != "ok"]
    if missing:
        lines += ["", "Did not run:", ""]
        lines += [f"- {r['op']} {r['tokens']} {r['label']}: {r['status']}" for r in missing]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536],
                   help="tokens per call")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--d_model", type=int, default=1024, help="1024: the 0.35B GPT")
    p.add_argument("--ffn_hidden", type=int, default=None,
                   help="SwiGLU width (default: what GPTConfig computes from d_model)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--loss_chunk", type=int, default=GPTConfig.loss_chunk,
                   help="tokens per chunk of our cross-entropy (default: GPTConfig's)")
    p.add_argument("--input_dtype", choices=list(DTYPES), default="fp32",
                   help="dtype of the inputs (fp32: the residual stream under autocast)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on the CPU)")
    p.add_argument("--warmup_ms", type=int, default=25)
    p.add_argument("--rep_ms", type=int, default=100)
    p.add_argument("--device", default="cuda", help="cpu: the smoke mode (our rows only)")


@register("fused_ops", summary="RMSNorm, SwiGLU and loss: ours vs liger-kernel's fused ops and "
          "torch.compile", arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        require_cuda("fused_ops")
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    ops = liger()
    meta = {**run_meta(device.type), "liger": ops.version if ops else None}
    cfg = model_config(args)
    settings = {"d_model": cfg.d_model, "ffn_hidden": cfg.ffn_hidden, "vocab": cfg.vocab_size,
                "loss_chunk": cfg.loss_chunk, "bf16": args.bf16,
                "input_dtype": args.input_dtype, "config": dataclasses.asdict(cfg)}
    record = Record("fused_ops", meta, args.out, args.tag)
    report = {"meta": meta, "settings": settings, "args": vars(args), "rows": []}
    for tokens in args.tokens:
        for op in args.ops:
            inputs = Inputs(args, op, tokens, device)
            reference = None
            for method in ["ours", *(m for m in args.methods if m != "ours")]:  # ours first
                row, result = run_row(args, op, method, tokens, inputs, device, reference)
                reference = result if method == "ours" else reference
                report["rows"].append(row)
                with_ratios(report["rows"])
                print(f"{op:>8} {tokens:>6} {row['label']:<32} {row['status']:<8} "
                      f"{_fmt(row.get('fwd_bwd_ms'), '.3f')} ms "
                      f"{_fmt(row.get('peak_mib'), '.0f')} MiB", flush=True)
                record.write(report, markdown(report))
            del inputs, reference
            free(device)
    print(markdown(report))
    return report


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["fused_ops"].run()
