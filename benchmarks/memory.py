"""Where a training step's activation memory sits: the tensors one transformer block keeps for
its backward, by the autograd node that keeps them, for dense, cuDNN SDPA and NSA (issues 16, 20).

For each mode, one :class:`fsa_train.model.gpt.Block` of the benchmark GPT
(``benchmarks.throughput``'s ``model_config``: 0.35B by default) runs forward under bf16
autocast on one sequence of ``--context`` tokens. Then:

* **saved**: the autograd graph from the block's output is walked; every tensor a node holds for
  its backward (the ``_saved_*`` attributes of built-in nodes, ``saved_tensors`` and tensor
  attributes of custom functions' contexts) is counted once per storage, attributed to the first
  node that holds it, if autograd packed it during the forward (saved-tensor hooks: a
  checkpointed region's tensors are recomputed, not kept). The table's *packed* column is
  everything autograd packed: the walk's *found* total should equal it, plus only custom
  functions' context attributes. Parameters are left out; the bf16 weight copies autocast
  makes are listed as ``weight casts`` (per layer, not per token). The block's input (the
  residual stream, which any model keeps) is its own row.
* **held** (CUDA only): ``torch.cuda.memory_allocated`` after the forward minus before, with the
  output kept, i.e. everything the forward left allocated, whoever holds it; and the forward's
  peak above the start.

``--checkpointing`` measures the block with activation checkpointing too (a row per mode and
choice): ``attention`` or ``mlp`` recomputes that sub-layer in backward
(``GPTConfig.activation_checkpointing``; ``sparse_branches``: NSA's compressed and selected
branches, NSA rows only), ``block`` the whole block (what ``true`` does in the
GPT). What a checkpoint keeps to recompute from (its tensor inputs: the sub-layer's or block's
input, the positions) is packed but held by the checkpoint rather than a node: it is listed
under the block input, under the recomputed node that saves it again (the walk's unpacking
recomputes each checkpointed region once), or else as ``checkpoint inputs``.

Bytes are reported per token of the sequence, so a row times the step's tokens and the layer
count is that part of the training step's activation memory. Writes
``memory_<device>_<date>[_<tag>].{json,md}`` to ``--out``.

GPU: ``python -m benchmarks run memory``; CPU smoke test (reference kernels, fp32 unless
``--bf16``): ``--device cpu --context 256 --d_model 256 --head_dim 64``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections import Counter

import torch
from torch.utils.checkpoint import checkpoint

from benchmarks import REGISTRY, register
from benchmarks.common import Record, require_cuda, run_meta
from benchmarks.throughput import MODES, SDPAAttention, add_fused_ops_argument, model_config
from fsa_train.kernels.nsa import nsa_varlen
from fsa_train.kernels.varlen import document_positions
from fsa_train.model.gpt import Block

BLOCK_INPUT = "block input"
WEIGHT_CASTS = "weight casts"
CHECKPOINT_INPUTS = "checkpoint inputs"
CHECKPOINTING = {"none": False, "attention": "attention", "mlp": "mlp", "block": True,
                 "sparse_branches": "sparse_branches"}
"""``--checkpointing`` choices → ``GPTConfig.activation_checkpointing`` (``block``: the
benchmark wraps the block in a checkpoint, as the GPT does for ``true``)."""


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def node_tensors(node: object) -> list[tuple[torch.Tensor, bool]]:
    """The tensors an autograd node keeps for its backward, each with whether it is a custom
    function's context attribute (kept without being packed)."""
    found: list[torch.Tensor] = []
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                found += _tensors(getattr(node, name))
            except RuntimeError:  # freed already, or not a tensor the node can unpack
                continue
    attributes: list[torch.Tensor] = []
    if hasattr(node, "saved_tensors"):  # a custom autograd.Function's context
        try:
            found += _tensors(node.saved_tensors)
        except RuntimeError:
            pass
        attributes = [t for value in vars(node).values() for t in _tensors(value)]
    return [(t, False) for t in found] + [(t, True) for t in attributes]


def _storage(tensor: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr(), storage.nbytes()


class PackedStorages:
    """The storages autograd packs for the backward while active (saved-tensor hooks): what
    the forward really keeps. A checkpointed region packs nothing here (it recomputes), though
    unpacking its nodes' tensors in a walk would recompute and show them."""

    def __init__(self) -> None:
        self.pointers: dict[int, int] = {}
        """Storage address → bytes."""

    def __enter__(self) -> PackedStorages:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = _storage(tensor)
            if key is not None:
                self.pointers[key[0]] = key[1]
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _one_recomputation() -> contextlib.AbstractContextManager:
    """Unpacking a checkpointed node's saved tensor outside a backward recomputes the region,
    once per access; inside one ``GraphExecGroup`` (torch ≥ 2.10) once per region."""
    group = getattr(torch.utils.checkpoint, "GraphExecGroup", None)
    return group() if group is not None else contextlib.nullcontext()


def saved_bytes(output: torch.Tensor, block_input: torch.Tensor,
                parameters: list[torch.Tensor],
                packed: PackedStorages | None = None) -> dict[str, int]:
    """Bytes kept for the backward of ``output``'s graph, by node name (each storage once).
    ``packed``: count only saved tensors autograd packed while the forward ran (plus custom
    functions' context attributes, which are not packed), and list the packed storages no node
    holds, a checkpoint's inputs, as :data:`BLOCK_INPUT` or :data:`CHECKPOINT_INPUTS`."""
    with _one_recomputation():
        return _saved_bytes(output, block_input, parameters, packed)


def _saved_bytes(output: torch.Tensor, block_input: torch.Tensor,
                 parameters: list[torch.Tensor],
                 packed: PackedStorages | None) -> dict[str, int]:
    params = {_storage(p) for p in parameters}
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        by_shape.setdefault(tuple(p.shape), []).append(p)

    def weight_cast(tensor: torch.Tensor) -> bool:
        """A half-precision copy of a parameter (autocast's, kept as is or transposed by the
        matmul that saved it), not an activation that happens to have a parameter's shape
        (e.g. ``[tokens, d_model]`` with tokens = d_model)."""
        if tensor.dtype == torch.float32:
            return False
        views = [tensor] + ([tensor.t()] if tensor.dim() == 2 else [])
        return any(torch.equal(view, p.detach().to(view.dtype))
                   for view in views for p in by_shape.get(tuple(view.shape), ()))
    seen: set[int] = set()
    skip_input = _storage(block_input)
    by_node: Counter[str] = Counter()
    stack, visited = [output.grad_fn], set()
    alive = []  # the Python wrappers of visited nodes: a freed one's id() can be reused
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        alive.append(node)
        stack += [next_node for next_node, _ in node.next_functions]
        for tensor, attribute in node_tensors(node):
            key = _storage(tensor)
            if packed is not None and not attribute and key is not None \
                    and key[0] not in packed.pointers:
                continue
            if key is None or key in params or key[0] in seen or key[1] == 0:
                continue
            seen.add(key[0])
            if key == skip_input:
                label = BLOCK_INPUT
            elif weight_cast(tensor):
                label = WEIGHT_CASTS
            else:
                label = type(node).__name__
            by_node[label] += key[1]
    if packed is not None:  # held by a checkpoint to recompute from, not by a node
        param_pointers = {key[0] for key in params if key is not None}
        for pointer, nbytes in packed.pointers.items():
            if pointer in seen or pointer in param_pointers or nbytes == 0:
                continue
            seen.add(pointer)
            is_input = skip_input is not None and pointer == skip_input[0]
            by_node[BLOCK_INPUT if is_input else CHECKPOINT_INPUTS] += nbytes
    return dict(by_node)


def build_block(args: argparse.Namespace, mode: str, device: torch.device,
                checkpointing: str = "none") -> Block:
    cfg = dataclasses.replace(model_config(args, mode, False),
                              activation_checkpointing=CHECKPOINTING[checkpointing])
    torch.manual_seed(0)
    block = Block(cfg)
    if mode == "sdpa":
        block.attn = SDPAAttention(block.attn, 1)
    return block.to(device)


def measure(args: argparse.Namespace, mode: str, device: torch.device,
            checkpointing: str = "none") -> dict:
    """One block's forward on one sequence: saved bytes by node, and (CUDA) held bytes."""
    block = build_block(args, mode, device, checkpointing)
    cfg = block.attn.cfg if mode != "sdpa" else block.attn.inner.cfg
    tokens = args.context
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    positions = document_positions(cu_seqlens, tokens)
    varlen = nsa_varlen(cu_seqlens, tokens, cfg.nsa, positions) if cfg.attention == "nsa" \
        else None
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(tokens, cfg.d_model, generator=generator) * 0.5).to(device)
    x.requires_grad_()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    cuda = device.type == "cuda"

    def forward() -> torch.Tensor:
        with autocast:
            if checkpointing == "block":
                return checkpoint(block, x, cu_seqlens, positions, varlen, tokens,
                                  use_reentrant=False)
            return block(x, cu_seqlens, positions, varlen, tokens)

    out = forward()  # warm-up: compilation, autotuning, library plans
    out.sum().backward()
    del out
    x.grad = None
    block.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with PackedStorages() as packed:
        out = forward()
    row: dict = {"mode": mode, "checkpointing": checkpointing, "tokens": tokens}
    if cuda:
        torch.cuda.synchronize()
        row["held_per_token"] = (torch.cuda.memory_allocated() - start) / tokens
        row["forward_peak_per_token"] = (torch.cuda.max_memory_allocated() - start) / tokens
    by_node = saved_bytes(out, x, list(block.parameters()), packed)
    row["saved_by_node"] = dict(sorted(by_node.items(), key=lambda kv: -kv[1]))
    per_token = {k: v for k, v in by_node.items() if k != WEIGHT_CASTS}
    row["saved_per_token"] = sum(per_token.values()) / tokens
    params = {_storage(p)[0] for p in block.parameters()}
    # a check of the walk: all autograd packed (the walk adds only context attributes to it)
    row["packed_bytes"] = sum(n for ptr, n in packed.pointers.items() if ptr not in params)
    row["weight_casts_bytes"] = by_node.get(WEIGHT_CASTS, 0)
    row["output_per_token"] = out.numel() * out.element_size() / tokens
    del out
    return row


def markdown(report: dict) -> str:
    env, cfg, rows = report["environment"], report["model"], report["rows"]
    lines = [
        f"# Activation memory of one block ({env['device']}, torch {env['torch']}, "
        f"{env['date'][:10]})",
        "",
        f"One block of the GPT with d_model {cfg['d_model']}, {cfg['n_head']} query / "
        f"{cfg['n_kv_head']} KV heads of {cfg['head_dim']}, FFN {cfg['ffn_hidden']}; one sequence "
        f"of {report['context']:,} tokens, {'bf16 autocast' if report['bf16'] else 'fp32'}. "
        "Bytes per token. *Saved*: what the autograd graph keeps for the backward (each "
        "storage once, parameters left out, autocast's weight copies apart); *held* (CUDA): "
        "what the forward left allocated, output included.",
        "",
        "| mode | saved B/token | packed MiB (check) | found MiB | held B/token "
        "| forward peak B/token | weight casts MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "–" if v is None else f"{v:,.0f}"  # noqa: E731
    for row in rows:
        found = sum(row["saved_by_node"].values())
        lines.append(f"| {row_label(row)} | {fmt(row['saved_per_token'])} | "
                     f"{row.get('packed_bytes', 0) / 2**20:.1f} | {found / 2**20:.1f} | "
                     f"{fmt(row.get('held_per_token'))} | "
                     f"{fmt(row.get('forward_peak_per_token'))} | "
                     f"{row['weight_casts_bytes'] / 2**20:.1f} |")
    lines += ["", "Saved bytes per token by the autograd node that keeps them:", ""]
    names = list(dict.fromkeys(n for row in rows for n in row["saved_by_node"]
                               if n != WEIGHT_CASTS))
    lines += ["| node | " + " | ".join(row_label(row) for row in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for name in names:
        cells = [fmt(row["saved_by_node"].get(name, 0) / row["tokens"]) for row in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def row_label(row: dict) -> str:
    """A row's name in the tables: its mode, and what it checkpoints (runs before
    ``--checkpointing`` checkpointed nothing)."""
    checkpointing = row.get("checkpointing", "none")
    return row["mode"] if checkpointing == "none" else f"{row['mode']}, {checkpointing} ckpt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", nargs="+", choices=MODES, default=["sdpa", "dense", "nsa",
                                                                  "nsa_block"])
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--n_layer", type=int, default=24,
                   help="the model's depth (one block is measured; it scales the residual init)")
    p.add_argument("--d_model", type=int, default=1024)
    p.add_argument("--n_head", type=int, default=None)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--kernel_backend", choices=["auto", "reference", "triton"], default="auto")
    p.add_argument("--checkpointing", nargs="+", choices=list(CHECKPOINTING), default=["none"],
                   help="activation checkpointing of the block, a row per choice and mode: "
                        "none, attention or mlp (that sub-layer recomputed), block (all of it)")
    add_fused_ops_argument(p)
    p.add_argument("--device", default="cuda", help="cpu: the smoke mode (saved bytes only)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off on the CPU)")


@register("memory", summary="activation memory of one block by the autograd node that keeps it",
          arguments=add_arguments)
def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        require_cuda("memory")
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    env = run_meta(device.type)
    record = Record("memory", env, args.out, args.tag)
    rows = []
    runs = [(mode, checkpointing) for mode in args.modes for checkpointing in args.checkpointing
            if (mode != "sdpa" or device.type == "cuda")  # SDPA: a CUDA measurement
            and (checkpointing != "sparse_branches" or mode.startswith("nsa"))]
    for mode, checkpointing in runs:
        rows.append(measure(args, mode, device, checkpointing))
        print(row_label(rows[-1]), {k: v for k, v in rows[-1].items() if k != "saved_by_node"},
              flush=True)
        report = {"environment": env, "context": args.context, "bf16": args.bf16,
                  "model": dataclasses.asdict(model_config(args, "dense", False)),
                  "args": vars(args), "rows": rows}
        record.write(report, markdown(report), indent=1)
    print(markdown(report))
    return report


if __name__ == "__main__":
    REGISTRY["memory"].run()
