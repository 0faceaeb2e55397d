"""End-to-end training throughput: the same GPT with dense attention, NSA, and cuDNN SDPA.

Modes (issue 7):

* ``dense``: ``window_attention(window=None)`` on packed documents (the kernel of
  ``FSA_WINDOW_KERNEL``: ours, cuDNN or FlashAttention; "auto" by default);
* ``nsa``: NSA with the default parameters (``NSAConfig()``, exact token-level selection);
* ``nsa_block``: the same with block-shared selection (``NSAConfig(selection="block")``);
* ``sdpa``: the dense model with each attention's core replaced by PyTorch's causal
  ``scaled_dot_product_attention`` (cuDNN preferred, then flash, efficient, math). Valid only for
  one document per sequence (several equal-length sequences form its batch), which is what
  this benchmark feeds every mode.

Each (mode, context) row times forward + backward + AdamW step over ``--steps`` steps after
``--warmup`` steps (:class:`benchmarks.common.StepTimer`: CUDA events around the timed steps on
the GPU, wall clock on the CPU; the mean step) on random tokens: one
sequence per step, or ``--tokens_per_step N``: N // context sequences of ``context`` tokens (at
least one), as a trainer with a fixed token budget per step feeds them. It records tokens/s,
MFU (actual and dense-equivalent, ``fsa_train.flops``) and peak memory. Out of memory is
recorded as ``OOM`` for that row; with ``--activation_checkpointing auto`` a row that runs out
of memory is retried with checkpointing first. Writes
``throughput_<device>_<date>[_<tag>].{json,md,png}`` (the plot matplotlib permitting) to ``--out``.

GPU: ``python -m benchmarks run throughput``.
CPU smoke test: ``--device cpu --contexts 256 512 --n_layer 1 --d_model 64 --steps 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import REGISTRY, register
from benchmarks.common import Record, StepTimer, add_output_arguments, require_cuda, run_meta
from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.flops import batch_flops, device_peak_flops
from fsa_train.kernels.tuning import autotune_choices, choices_markdown
from fsa_train.model import GPT
from fsa_train.model.attention import Attention

MODES = ("dense", "sdpa", "nsa", "nsa_block")
DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)


class SDPAAttention(nn.Module):
    """The projections, RoPE and output of a dense :class:`Attention`, with PyTorch's causal SDPA
    as the core. K/V heads are expanded to the query heads (as MHA), which cuDNN requires."""

    def __init__(self, inner: Attention, sequences: int = 1) -> None:
        super().__init__()
        if inner.sparse:
            raise ValueError("SDPAAttention wraps a dense Attention")
        self.inner = inner
        self.sequences = sequences  # equal-length sequences per step: SDPA's batch dimension

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
        varlen: None = None, max_seqlen: int | None = None, shard: None = None,
    ) -> torch.Tensor:
        if cu_seqlens.numel() != self.sequences + 1:
            raise ValueError(f"the SDPA path takes {self.sequences} equal-length documents, "
                             f"got {cu_seqlens.numel() - 1}")
        a, cfg, total = self.inner, self.inner.cfg, x.shape[0]
        n = self.sequences
        d, H, h = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        q = a.rope(a.q_proj(x).view(total, H, d), positions)
        k = a.rope(a.k_proj(x).view(total, h, d), positions)
        v = a.v_proj(x).view(total, h, d)
        k = k.repeat_interleave(H // h, dim=1)
        v = v.repeat_interleave(H // h, dim=1)
        q, k, v = (t.view(n, total // n, H, d).transpose(1, 2) for t in (q, k, v))  # [n,H,T,d]
        with sdpa_backends():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a.o_proj(o.transpose(1, 2).reshape(total, H * d))


def sdpa_backends():
    """cuDNN first, then FlashAttention-2, memory-efficient and math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def model_config(args: argparse.Namespace, mode: str, checkpointing: bool | str) -> GPTConfig:
    """The benchmark GPT: GQA with group ``args.group``, head width ``args.head_dim``."""
    n_head = args.n_head or max(args.group, args.d_model // args.head_dim // args.group
                                * args.group)
    return GPTConfig(
        vocab_size=args.vocab, n_layer=args.n_layer, n_head=n_head,
        n_kv_head=n_head // args.group, d_model=args.d_model, head_dim=args.head_dim,
        attention="nsa" if mode.startswith("nsa") else "dense",
        nsa=NSAConfig(selection="block" if mode == "nsa_block" else "token"),
        kernel_backend=args.kernel_backend, activation_checkpointing=checkpointing,
        **fused_ops_field(args),
    )


def fused_ops_field(args: argparse.Namespace) -> dict:
    """``{"fused_ops": ...}`` when ``--fused_ops`` was given (else GPTConfig's default)."""
    value = getattr(args, "fused_ops", None)  # benchmarks that share model_config may lack it
    return {"fused_ops": value} if value else {}


def sequences_per_step(args: argparse.Namespace, context: int) -> int:
    return max(1, args.tokens_per_step // context) if args.tokens_per_step else 1


def build_model(cfg: GPTConfig, mode: str, device: torch.device, sequences: int = 1) -> GPT:
    """A GPT on ``device``; ``sdpa`` swaps every attention for :class:`SDPAAttention`."""
    torch.manual_seed(0)
    model = GPT(cfg)
    if mode == "sdpa":
        for block in model.blocks:
            block.attn = SDPAAttention(block.attn, sequences)
    return model.to(device)


def compile_blocks(model: GPT, mode: str = "default") -> None:
    """Each block compiled whole (``fullgraph=True``, Inductor), as ``model.compile: true``
    does: the NSA and RoPE kernels are custom ops, so nothing breaks the graph."""
    from fsa_train.kernels.registry import preload_triton_modules

    preload_triton_modules()
    # a fresh Dynamo per row: the rows of one process (modes x contexts) would otherwise add up
    # to the recompile limit (8 per code object), which fullgraph turns into an error
    # (results/throughput_h200_2026-12-03_compile_fused_auto.md lost its 64K NSA rows to it)
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(fullgraph=True, mode=None if mode == "default" else mode)


class BlockStack(nn.Module):
    """The GPT's blocks as one module of the hidden states alone, the batch layout (documents,
    positions, NSA's compressed indices) fixed: what ``torch.cuda.make_graphed_callables``
    captures (it takes tensor arguments only, and a static shape)."""

    def __init__(self, model: GPT, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        super().__init__()
        self.blocks = model.blocks
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen
        self.positions, self.varlen = model.batch_layout(cu_seqlens, int(cu_seqlens[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.cu_seqlens, self.positions, self.varlen, self.max_seqlen, None)
        return x


def graph_blocks(model: GPT, ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 autocast) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The forward + loss of one step with every block's forward and backward replayed from
    CUDA graphs (``torch.cuda.make_graphed_callables`` over :class:`BlockStack`; its warm-up
    iterations autotune before the capture). Embedding, final norm, loss and optimizer stay
    eager: liger's fused loss reads a count on the host, which a graph cannot hold."""
    if model.cfg.activation_checkpointing:
        raise ValueError("--cuda_graph captures the blocks without activation checkpointing")
    stack = BlockStack(model, cu_seqlens, max_seqlen)
    with autocast:
        sample = model.embed(ids).detach().requires_grad_(True)
        graphed = torch.cuda.make_graphed_callables(stack, (sample,), num_warmup_iters=3)

    def loss(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model.loss(model.norm(graphed(model.embed(ids))), targets)

    return loss


def graph_step(update: Callable[[], None],
               optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``update`` (forward, loss, backward and ``optimizer``'s step on fixed input tensors)
    captured as one CUDA graph; returns its replay. Three eager updates on a side stream first
    (they autotune, allocate the optimizer's state and the gradients' pool) and then the
    capture, as PyTorch's whole-network recipe does; gradients set to None before the capture
    are written, not accumulated, on every replay. The tensors ``update`` reads are the graph's
    static inputs: copy new batches into them. The optimizer must be ``capturable``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            update()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update()
    return graph.replay


def time_training(args: argparse.Namespace, mode: str, context: int, checkpointing: bool | str,
                  device: torch.device) -> dict:
    """Seconds per training step and peak memory of one (mode, context, checkpointing)."""
    cfg = model_config(args, mode, checkpointing)
    sequences = sequences_per_step(args, context)
    model = build_model(cfg, mode, device, sequences)
    if args.compile:
        compile_blocks(model, args.compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda",
                                  capturable=args.cuda_graph == "step")
    generator = torch.Generator().manual_seed(context)
    total = sequences * context
    tokens = torch.randint(0, cfg.vocab_size, (total + 1,), generator=generator).to(device)
    ids, targets = tokens[:-1], tokens[1:]
    cu_seqlens = torch.arange(0, total + 1, context, dtype=torch.int32, device=device)
    # CUDA graphs need autocast's weight-cast cache off (a cached cast would outlive capture)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16,
                              cache_enabled=False if args.cuda_graph else None)
    graphed_loss = (graph_blocks(model, ids, cu_seqlens, context, autocast)
                    if args.cuda_graph == "blocks" else None)

    def update() -> None:  # forward, loss, backward and AdamW on this step's batch
        with autocast:
            if graphed_loss is not None:
                loss = graphed_loss(ids, targets)
            else:
                loss = model.loss(model(ids, cu_seqlens, context), targets)
        loss.backward()
        optimizer.step()

    replay = []  # --cuda_graph step: the captured update, made by the first call

    def step() -> None:
        if args.cuda_graph == "step":
            if not replay:
                replay.append(graph_step(update, optimizer))
            replay[0]()
            return
        if args.compile and args.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration of Inductor's graphs
        update()
        optimizer.zero_grad(set_to_none=True)

    first_start = time.perf_counter()
    step()  # the first step: compilation and autotuning (the tuning cache may skip the latter)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - first_start
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(device)
    timer.start()
    for _ in range(args.steps):
        step()
    seconds = timer.stop() / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"cfg": cfg, "params": model.num_parameters(exclude_embeddings=False),
            "step_s": seconds, "peak_gib": peak, "first_step_s": first_step_s}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(args: argparse.Namespace, mode: str, context: int, device: torch.device,
            peak_flops: float | None) -> dict:
    """One benchmark row; ``status`` is ``ok`` or ``OOM``."""
    sequences = sequences_per_step(args, context)
    row: dict = {"mode": mode, "context": context, "sequences": sequences}
    plans = {"off": [False], "on": [True], "auto": [False, True], "attention": ["attention"],
             "mlp": ["mlp"], "sparse_branches": ["sparse_branches"]}[args.activation_checkpointing]
    if plans == ["sparse_branches"] and not mode.startswith("nsa"):
        plans = [False]  # NSA's branches only: dense rows run without checkpointing
    if args.cuda_graph:
        plans = [False]  # the graphs hold every block's activations (no checkpointing)
    for checkpointing in plans:
        try:
            timing = time_training(args, mode, context, checkpointing, device)
        except torch.OutOfMemoryError:
            timing = None  # free only after the except block has released the traceback
        free_memory(device)
        if timing is None:
            row.update(status="OOM", activation_checkpointing=checkpointing)
            continue
        flops = batch_flops(timing["cfg"], [context] * sequences)
        step_s = timing["step_s"]
        row.update(
            status="ok", activation_checkpointing=checkpointing, params=timing["params"],
            step_ms=step_s * 1e3, tokens_per_s=sequences * context / step_s,
            peak_gib=timing["peak_gib"], first_step_s=timing["first_step_s"],
            tflops_actual=flops.actual / step_s / 1e12,
            mfu=flops.actual / step_s / peak_flops if peak_flops else None,
            mfu_dense_equiv=flops.dense_equivalent / step_s / peak_flops if peak_flops else None,
        )
        break
    return row


def environment(device: torch.device) -> dict:
    """Device, versions, date and commit for the report (:func:`benchmarks.common.run_meta`)."""
    info = run_meta(device.type)
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    from fsa_train.kernels.settings import default_settings

    info["window_kernel"] = default_settings().window_kernel  # FSA_WINDOW_KERNEL
    return info


def compiled(report: dict) -> str:
    """How the blocks were compiled, for the report's settings line."""
    if not report.get("compile"):
        return ""
    mode = report["args"].get("compile_mode", "default")
    return ", blocks compiled (fullgraph" + ("" if mode == "default" else f", {mode}") + ")"


def checkpointing_cell(value: bool | str) -> str:
    """``yes``/``no`` for whole blocks or none, else the checkpointed sub-layer."""
    return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


def _per_step(report: dict) -> str:
    budget = report["args"].get("tokens_per_step") or 0
    if not budget:
        return "one sequence per step"
    return f"{budget:,} tokens per step (context × {budget} // context sequences, at least one)"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def kernel_sentence(env: dict) -> str:
    """Which ``window_attention`` kernel ran, for reports that recorded it (older ones did not)."""
    if "window_kernel" not in env:
        return ""
    installed = [f"{name} {version}" for name, version in env.get("libraries", {}).items()
                 if version]
    return (f" `window_attention` kernel (dense mode, NSA's window branch): "
            f"{env['window_kernel']}; libraries: {', '.join(installed) or 'none'}.")


def fused_sentence(cfg: dict) -> str:
    """Which fused ops the model used, for reports that recorded them (older ones did not)."""
    return f" Fused ops (`fused_ops`): {cfg['fused_ops']}." if "fused_ops" in cfg else ""


def markdown(report: dict) -> str:
    """The report as Markdown: settings, one row per (mode, context), NSA speed-ups."""
    env, cfg = report["environment"], report["model"]
    first = any("first_step_s" in r for r in report["rows"])  # older reports did not time it
    lines = [
        f"# Training throughput ({env['device']}, torch {env['torch']}, "
        f"Triton {env['triton']}, {env['date'][:10]})",
        "",
        f"GPT: {cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} query / "
        f"{cfg['n_kv_head']} KV heads, d = {cfg['head_dim']}, vocab {cfg['vocab_size']}; "
        f"{'bf16 autocast' if report['bf16'] else 'fp32'}"
        f"{compiled(report)}"
        f"{graph_sentence(report.get('cuda_graph'))}; "
        f"one document per sequence, "
        f"{_per_step(report)}; "
        f"{report['steps']} timed steps after {report['warmup']} warm-up (fwd + bwd + AdamW"
        f"{'; the first warm-up step also timed alone' if first else ''})."
        + kernel_sentence(env) + fused_sentence(cfg),
        "",
    ]
    lines += [
        "| mode | context | tokens/s | step ms | MFU | MFU dense-equiv | peak GiB | ckpt |"
        + (" first step s |" if first else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if first else ""),
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['context']} | {r['status']} | | | | | |"
                         + (" |" if first else ""))
            continue
        lines.append(
            f"| {r['mode']} | {r['context']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['mfu_dense_equiv'], '.1%')} | "
            f"{_fmt(r['peak_gib'], '.1f')} | {checkpointing_cell(r['activation_checkpointing'])} |"
            + (f" {_fmt(r.get('first_step_s'), '.1f')} |" if first else "")
        )
    speedups = speedup_rows(report["rows"])
    if speedups:
        block = any(row[3] is not None for row in speedups)  # older runs had no block mode
        lines += ["", "| context | NSA / dense (ours) | NSA / SDPA |"
                  + (" NSA block / SDPA |" if block else ""), "|---|---|---|"
                  + ("---|" if block else "")]
        for context, vs_dense, vs_sdpa, block_vs_sdpa in speedups:
            lines.append(f"| {context} | {_fmt(vs_dense, '.2f')} | {_fmt(vs_sdpa, '.2f')} |"
                         + (f" {_fmt(block_vs_sdpa, '.2f')} |" if block else ""))
    lines += choices_markdown(report.get("autotune", {}))
    return "\n".join(lines) + "\n"


def speedup_rows(rows: list[dict]) -> list[tuple[int, float | None, float | None, float | None]]:
    """Per context where an NSA mode ran: NSA (token) tokens/s over dense (ours) and over SDPA,
    and NSA block over SDPA (None where a mode did not run)."""
    rate = {(r["mode"], r["context"]): r.get("tokens_per_s") for r in rows if r["status"] == "ok"}
    contexts = sorted({c for (mode, c) in rate if mode.startswith("nsa")})

    def ratio(mode: str, base: str, context: int) -> float | None:
        top, bottom = rate.get((mode, context)), rate.get((base, context))
        return top / bottom if top and bottom else None

    return [(c, ratio("nsa", "dense", c), ratio("nsa", "sdpa", c), ratio("nsa_block", "sdpa", c))
            for c in contexts]


def plot(report: dict, path: Path) -> str:
    """Tokens/s against context per mode (log-log) as a PNG; a message says what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        points = [(r["context"], r["tokens_per_s"]) for r in report["rows"]
                  if r["mode"] == mode and r["status"] == "ok"]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"{report['environment']['device']}: GPT training throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--d_model", type=int, default=1024,
                   help="1024: the 0.35B GPT of the README's tables (24 layers, 8 / 2 heads)")
    p.add_argument("--n_head", type=int, default=None,
                   help="query heads (default: d_model / head_dim, a multiple of --group)")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head (G)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens_per_step", type=int, default=0,
                   help="tokens per step: tokens_per_step // context sequences of context "
                        "tokens each (0: one sequence per step)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation_checkpointing", default="auto",
                   choices=["off", "on", "auto", "attention", "mlp", "sparse_branches"],
                   help="on: whole blocks; attention / mlp: that sub-layer of each block; "
                        "sparse_branches: NSA's compressed and selected branches (dense rows: "
                        "off); auto: off, and on for a row that runs out of memory")
    p.add_argument("--kernel_backend", choices=["auto", "reference", "triton"], default="auto")
    add_fused_ops_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="compile each block (torch.compile, fullgraph=True; warmup compiles)")
    p.add_argument("--compile_mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode with --compile (reduce-overhead: Inductor's CUDA "
                        "graphs per block)")
    p.add_argument("--cuda_graph", nargs="?", const="blocks", choices=["blocks", "step"],
                   default=None,
                   help="blocks (the flag alone): replay every block's forward and backward "
                        "from CUDA graphs (torch.cuda.make_graphed_callables); step: the whole "
                        "step (embedding, blocks, loss, backward, AdamW) as one graph (needs "
                        "--fused_ops torch); CUDA only, no checkpointing, no --compile")
    p.add_argument("--device", default="cuda", help="cpu: the smoke mode (wall-clock timing)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on the CPU)")


def add_fused_ops_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fused_ops", choices=["auto", "liger", "torch"], default=None,
                   help="model.config.fused_ops: RMSNorm, SwiGLU and loss on liger-kernel or "
                        f"torch (default: the config's, {GPTConfig.fused_ops!r})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags (``python -m benchmarks run throughput --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks run throughput",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    add_output_arguments(p)
    return with_defaults(p.parse_args(argv))


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """bf16 autocast on CUDA and off on the CPU unless ``--bf16`` / ``--no-bf16`` said."""
    if args.bf16 is None:
        args.bf16 = torch.device(args.device).type == "cuda"
    return args


@register("throughput", summary="end-to-end training throughput: dense, cuDNN SDPA and NSA GPT",
          arguments=add_arguments)
def run(args: argparse.Namespace) -> dict:
    """Run every (mode, context) row, write JSON, Markdown and the plot; returns the report."""
    args = with_defaults(args)
    device = torch.device(args.device)
    check_cuda_graph_flags(args)
    if device.type == "cuda":
        require_cuda("throughput")
    elif args.cuda_graph:
        raise ValueError("--cuda_graph needs --device cuda (CUDA graphs)")
    env = environment(device)
    record = Record("throughput", env, args.out, args.tag)
    peak = device_peak_flops(env["device"], "bf16-mixed" if args.bf16 else "32-true")
    rows = []
    for context in args.contexts:
        for mode in args.modes:
            row = run_row(args, mode, context, device, peak)
            rows.append(row)
            rate = f"{row['tokens_per_s']:,.0f} tokens/s" if row["status"] == "ok" else "OOM"
            print(f"{mode:>5} {context:>7}: {rate}", flush=True)
            write_report(record, args, env, peak, rows, final=False)  # a cut run still reports
    return write_report(record, args, env, peak, rows, final=True)


def check_cuda_graph_flags(args: argparse.Namespace) -> None:
    """The flags ``--cuda_graph`` cannot run with, each a one-line error."""
    if args.cuda_graph and args.activation_checkpointing not in ("off", "auto"):
        raise ValueError("--cuda_graph captures the blocks without activation checkpointing: "
                         "use --activation_checkpointing off")
    if args.cuda_graph and args.compile:
        raise ValueError("--cuda_graph does not combine with --compile (Inductor's own graphs: "
                         "--compile --compile_mode reduce-overhead)")
    if args.cuda_graph == "step" and (args.fused_ops or GPTConfig.fused_ops) != "torch":
        raise ValueError("--cuda_graph step captures the loss too, and liger's fused loss reads "
                         "a count on the host: use --fused_ops torch")


def main(argv: list[str] | None = None) -> dict:
    """``run`` on the command-line flags ``argv``."""
    return run(parse_args(argv))


def graph_sentence(cuda_graph: bool | str | None) -> str:
    """The header's words for ``--cuda_graph`` (older reports stored True for ``blocks``)."""
    if cuda_graph in (True, "blocks"):
        return ", blocks replayed from CUDA graphs"
    if cuda_graph == "step":
        return (", the whole step (forward, loss, backward, AdamW) replayed from one CUDA graph "
                "(the first step: three eager steps and the capture)")
    return ""


def write_report(record: Record, args: argparse.Namespace, env: dict, peak: float | None,
                 rows: list[dict], final: bool) -> dict:
    """Write JSON and Markdown (and, when ``final``, the plot) for the rows so far."""
    report = {
        "environment": env, "peak_flops": peak, "bf16": args.bf16, "compile": args.compile,
        "cuda_graph": args.cuda_graph,
        "steps": args.steps,
        "warmup": args.warmup, "model": dataclasses.asdict(model_config(args, "dense", False)),
        "nsa": dataclasses.asdict(NSAConfig()), "args": vars(args), "rows": rows,
        "autotune": autotune_choices(),
    }
    record.write_text(json.dumps(report, indent=1) + "\n", ".json")
    record.write_text(markdown(report))
    if final:
        print(markdown(report))
        print(plot(report, record.path(".png")))
    return report


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["throughput"].run()
