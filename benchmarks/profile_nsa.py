"""Kernel-level profile of the NSA core's forward+backward (torch.profiler, CUDA time).

Prints, per shape, the CUDA kernels sorted by total time and the step's total, so the fixed
costs (compression, RoPE, gate mixing, layout copies) can be told apart from the attention
kernels. ``--host`` instead measures the host side: the eager step's median time against the
same step replayed from a CUDA graph (GPU time alone; ``triton.testing.do_bench``, 25 ms warm-up,
200 ms of repetitions), and a cProfile of the eager steps. Writes
``profile_nsa_<device>_<date>[_<tag>].{json,md}`` (``--host``: tag ``host``) to ``--out``.
GPU only: ``python -m benchmarks run profile_nsa [--host]``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import Record, bench, join_tags, require_cuda, run_meta


def make_step(tokens: int, groups: int, doc: int | None, kv_heads: int,
              selection: str = "token"):
    """A fwd+bwd step of the NSA core on random inputs, warmed up."""
    from benchmarks.nsa import make_inputs
    from fsa_train.config import NSAConfig
    from fsa_train.kernels import CompressionParams, nsa_attention
    from fsa_train.model.rope import Rotary

    nsa = NSAConfig(selection=selection)
    inp = make_inputs(tokens, doc, groups, kv_heads, 128, nsa, "cuda", torch.bfloat16)
    leaves = [inp[n].requires_grad_() for n in ("q", "k", "v", "gates", "w_k", "w_v", "pe")]
    q, k, v, gates, w_k, w_v, pe = leaves
    rope = Rotary(128)
    params = CompressionParams(w_k, w_v, pe)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        nsa_attention(q, k, v, gates, params, inp["cu"], nsa, rope,
                      max_seqlen=doc or tokens).backward(inp["do"])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def host_shape(tokens: int, groups: int, doc: int | None, kv_heads: int, rows: int,
               selection: str = "token") -> str:
    """Eager step time vs CUDA-graph replay (the GPU's share), and where the host time goes."""
    import cProfile
    import io
    import pstats

    step = make_step(tokens, groups, doc, kv_heads, selection)
    eager = bench(step, warmup=25, rep=200)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = bench(graph.replay, warmup=25, rep=200)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    layout = "1 doc" if doc is None else f"{tokens // doc} x {doc}"
    return (f"## host: {tokens} tokens, G = {groups}, {kv_heads} KV heads, {layout}\n\n"
            f"eager fwd+bwd {eager:.3f} ms, CUDA-graph replay {replay:.3f} ms\n\n"
            f"cProfile of 20 eager steps (tottime):\n\n```\n{text.getvalue()[-6000:]}\n```\n")


def profile_shape(tokens: int, groups: int, doc: int | None, kv_heads: int, rows: int,
                  selection: str = "token") -> str:
    from torch.profiler import ProfilerActivity, profile

    step = make_step(tokens, groups, doc, kv_heads, selection)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows,
                                      max_name_column_width=90)
    layout = "1 doc" if doc is None else f"{tokens // doc} x {doc}"
    title = f"## {kv_heads} KV heads, {tokens} tokens, G = {groups}, {layout} (5 steps)"
    return f"{title}\n\n```\n{table}\n```\n"


def parse_shape(text: str) -> tuple[int, int, int, int | None]:
    """``tokens:G[:kv_heads[:doc]]`` → (tokens, G, kv_heads (default 4), doc (None: one))."""
    try:
        fields = [int(x) for x in text.split(":")]
    except ValueError:
        fields = []
    if not 2 <= len(fields) <= 4:
        raise argparse.ArgumentTypeError(f"a shape is tokens:G[:kv_heads[:doc]], got {text!r}")
    tokens, groups = fields[:2]
    kv_heads = fields[2] if len(fields) > 2 else 4
    doc = fields[3] if len(fields) > 3 else None
    return tokens, groups, kv_heads, doc


def markdown(data: dict) -> str:
    meta = data["meta"]
    header = f"# NSA core profile\n\n{meta['device']}, torch {meta['torch']}\n\n"
    return header + "\n".join(data["parts"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in ("16384:4", "65536:4", "16384:1")],
                        help="tokens:G[:kv_heads[:doc]]")
    parser.add_argument("--host", action="store_true", help="host overhead instead of kernels")
    parser.add_argument("--selection", choices=["token", "block"], default="token",
                        help="NSA's selection granularity (NSAConfig.selection)")


@register("profile_nsa", summary="kernel-level (or --host: host-side) profile of the NSA core",
          arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    require_cuda("profile_nsa")
    record = Record("profile_nsa", run_meta(), args.out,
                    join_tags("host" if args.host else None, args.tag))
    data = {"meta": record.meta, "host": args.host, "rows": args.rows,
            "selection": args.selection,
            "shapes": [list(s) for s in args.shapes], "parts": []}
    for tokens, groups, kv_heads, doc in args.shapes:
        run = host_shape if args.host else profile_shape
        text = run(tokens, groups, doc, kv_heads, args.rows, args.selection)
        print(text, flush=True)
        data["parts"].append(text)
    record.write(data, markdown(data))
    return data


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["profile_nsa"].run()
