"""A memory model of one training step at long context (issue 21): the activation bytes one
transformer block keeps per token, and the longest packed sequence that P GPUs hold under
sequence parallelism. A prediction from counted bytes, not a measurement; where it can be
compared with H200 measurements (one GPU, ``benchmarks/results/``) it is within about 1 %.

**Per token per layer** (:func:`layer_bytes`), from what each autograd node keeps for the
backward (``benchmarks/memory.py`` lists them by node; ``docs/notes/sequence_parallel.md``
derives each term), with D = d_model, H / h query / KV heads of d, F = the SwiGLU width and
r the residual stream's bytes (4 under ``autocast``, Lightning's bf16-mixed on one GPU or DDP; 2
under ``bf16``, DeepSpeed's bf16 of ``configs/strategy/ulysses.yaml``, which casts the weights
and so every activation to bf16):

* the block's input (r·D) and the second norm's input with both norms' 1/rms (r·D + 8);
* the projections' inputs: the two norms' bf16 outputs, each shared by the linears reading it
  (2·D each: the block casts each norm's output once, ``fsa_train.model.fused.to_autocast_dtype``;
  the code before 2026-12-04, which the H200 counts of 2026-12-03 measured, let autocast cast,
  and keep, a copy per linear: q, k, v, NSA's gate, w1, w3, 2·D each; precision
  ``"autocast_per_linear"`` predicts that code); w2's input (2·F) and the output projection's
  (2·H·d, dense only);
* SwiGLU: 6·F with torch's ``silu(a) * b``, 4·F with liger's SiLU-mul (``fused_ops``);
* RoPE's cos/sin and the positions (4·d + 8);
* the attention core: q, k, v after RoPE and the log-sum-exp (2·(H + 2h)·d + 4·H); NSA adds
  its three branch outputs and gates (6·H·d + 6·H), the pre-RoPE keys that compression reads
  (2·h·d), the compressed keys and values (4·h·d / s) with their log-sum-exp (4·H), and the
  selected branch's log-sum-exp and block indices (4·H + 8·h·T; shared per block of B queries
  with ``selection: block``: 4·H + 8·h·T / B).

With activation checkpointing a block keeps only its input (r·D); its activations exist again
while its backward runs, one block at a time. Checkpointing one sub-layer
(``activation_checkpointing: attention`` or ``mlp``, :func:`kept_bytes`) keeps the other
sub-layer's tensors and the checkpointed one's input (r·D): with the attention recomputed, the
block input and the MLP's part (the second norm's input and 1/rms, w1 and w3's inputs, w2's,
SwiGLU's); with the MLP recomputed, everything else and the MLP's input. These two are
predictions from the same terms that no GPU has measured yet (the layer bytes without
checkpointing are the H200's counts, ``benchmarks/results/memory_h200_2026-12-03.md``; what
each checkpointing keeps is checked on the CPU's reference path only).

**The step's peak on one rank** holding ``N / P`` tokens of an N-token sequence
(:func:`peak_bytes`)::

    static + N/P · (L·a + t + 2·r·D)            without checkpointing
    static + N/P · (L·k + a + t + 2·r·D)        with checkpointing

a: the layer bytes above; k: what a checkpointed block keeps (r·D for whole blocks, the above
for one sub-layer), with one block's whole ``a`` again while its backward recomputes (a bound
for a sub-layer, whose kept part is already among the L·k); t: what a block's forward allocates
above what it keeps (measured on the H200, :data:`TRANSIENT`), plus, under sequence parallelism,
the all-to-all's send and receive buffers of q, k, v (4·(H + 2h)·d); 2·r·D: the last block's
output and the final norm's, kept for the loss. ``static``: 16 bytes per parameter for fp32
weights, gradients and AdamW's two moments on one GPU; under DeepSpeed ZeRO-2 with bf16 over P
ranks, 2 (bf16 weights) + 16 / P (fp32 master copy, moments and gradient partition) bytes per
parameter plus its two 2·10⁸-element bf16 buckets. Every rank also holds the whole sequence's
positions and NSA indices (tens of bytes per token of N, left out).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from benchmarks import register
from fsa_train.config import GPTConfig

GIB = 2**30
H200_BYTES = 143_771 * 2**20
"""An H200's memory as nvidia-smi reports it (140.4 GiB; "141 GB")."""
RESERVE_BYTES = 8 * GIB
"""Kept free of the model: the CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and the
caching allocator's fragmentation (torch's peak, which the model predicts, leaves them out)."""
DEEPSPEED_BUCKETS = 2 * 200_000_000 * 2
"""ZeRO-2's reduce and all-gather buckets: Lightning's 2·10⁸ elements each, bf16."""
TRANSIENT = {"dense": 2_816, "nsa": 35_540, "nsa_block": 2_816}
"""Bytes per token a block's forward allocates above what it keeps, at its peak: the forward
peak minus the saved bytes of the 0.35B block at 16K on the H200
(``benchmarks/results/memory_h200_2026-12-03.json``: dense 49,008 - 46,192; NSA 88,824 -
53,284, the selection's scores; block selection 55,847 - 53,031)."""
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _mode(cfg: GPTConfig) -> str:
    if cfg.attention != "nsa":
        return "dense"
    return "nsa_block" if cfg.nsa.selection == "block" else "nsa"


PRECISIONS = ("autocast", "bf16", "autocast_per_linear")
"""``precision`` values: bf16-mixed on fp32 weights (Lightning's, one GPU or DDP), DeepSpeed's
bf16 weights, and bf16-mixed as the code before 2026-12-04 ran it (a cast per linear)."""


def residual_bytes(precision: str) -> int:
    """Bytes of one residual-stream element: 4 on fp32 weights (autocast), 2 under bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return 2 if precision == "bf16" else 4


def layer_bytes(cfg: GPTConfig, precision: str = "autocast") -> dict[str, float]:
    """Bytes per token one block keeps for its backward on the GPU path, by part (the module
    docstring gives each term). ``precision``: one of :data:`PRECISIONS`."""
    D, H, h, d, F = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden
    r = residual_bytes(precision)
    nsa = cfg.attention == "nsa"
    if precision == "autocast_per_linear":
        normed = 2 * D * (3 + nsa + 2)  # q, k, v (, gate), w1, w3 each cast their input
    else:
        normed = 2 * D * 2  # the two norms' bf16 outputs, shared by the linears reading them
    parts = {
        "block input": r * D,
        "norms": r * D + 8,
        "projections": normed + 2 * F + (0 if nsa else 2 * H * d),
        "SwiGLU": (6 if cfg.fused_ops == "torch" else 4) * F,
        "RoPE": 4 * d + 8,
        "attention core": 2 * (H + 2 * h) * d + 4 * H,
    }
    if nsa:
        s = cfg.nsa.cmp_stride
        # the window output and the gates, the pre-RoPE keys, the compressed keys and values,
        # and what recomputing the sparse branches drops
        parts["NSA branches"] = (2 * H * d + 6 * H + 2 * h * d + 4 * h * d / s
                                 + sparse_branch_bytes(cfg))
    return parts


def sparse_branch_bytes(cfg: GPTConfig) -> float:
    """What NSA's compressed and selected branches alone keep per token: their outputs, their
    log-sum-exps and the selection (all that ``activation_checkpointing: sparse_branches``
    recomputes instead)."""
    H, h, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B, T = cfg.nsa.sel_block, cfg.nsa.sel_topk
    indices = 8 * h * T / (B if cfg.nsa.selection == "block" else 1)
    return 4 * H * d + 4 * H + 4 * H + indices


CHECKPOINTING = (False, "sparse_branches", "attention", "mlp", True)
"""The values of ``GPTConfig.activation_checkpointing``, from keeping everything to keeping the
least (``sparse_branches``: NSA only)."""


def mlp_bytes(cfg: GPTConfig, precision: str = "autocast") -> float:
    """The part of :func:`layer_bytes` that the MLP sub-layer keeps: its norm's input and 1/rms,
    the inputs of w1 and w3 (the norm's one bf16 output; a copy per linear under
    ``"autocast_per_linear"``) and of w2, and SwiGLU's."""
    D, F = cfg.d_model, cfg.ffn_hidden
    r = residual_bytes(precision)
    casts = 2 if precision == "autocast_per_linear" else 1
    return r * D + 4 + 2 * D * casts + 2 * F + layer_bytes(cfg, precision)["SwiGLU"]


def kept_bytes(cfg: GPTConfig, precision: str = "autocast",
               checkpointing: bool | str = False) -> float:
    """Bytes per token one block keeps from its forward to its backward under
    ``activation_checkpointing`` ``checkpointing`` (:data:`CHECKPOINTING`): all of
    :func:`layer_bytes`; the input alone (whole block, ``True``); or, with one sub-layer
    recomputed, its input and the other sub-layer's tensors; with NSA's sparse branches
    recomputed, all but :func:`sparse_branch_bytes` (predictions: not measured)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    layer = sum(layer_bytes(cfg, precision).values())
    r = residual_bytes(precision)
    if checkpointing is True:
        return r * cfg.d_model
    if checkpointing == "attention":
        return r * cfg.d_model + mlp_bytes(cfg, precision)
    if checkpointing == "mlp":
        return layer - mlp_bytes(cfg, precision) + r * cfg.d_model
    if checkpointing == "sparse_branches":
        if cfg.attention != "nsa":
            raise ValueError("sparse_branches checkpointing is NSA's; the model is dense")
        return layer - sparse_branch_bytes(cfg)
    return layer


def parameters(cfg: GPTConfig) -> int:
    """The model's parameter count (built on the meta device)."""
    from fsa_train.model import GPT

    with torch.device("meta"):
        return GPT(cfg).num_parameters(exclude_embeddings=False)


def static_bytes(n_params: int, ranks: int, strategy: str) -> float:
    """Weights, gradients and optimizer state on one rank: ``"single"`` (one GPU or DDP, fp32
    AdamW) or ``"zero2"`` (DeepSpeed ZeRO-2, bf16, state sharded over ``ranks``)."""
    if strategy == "single":
        return 16.0 * n_params
    if strategy == "zero2":
        return 2.0 * n_params + 16.0 * n_params / ranks + DEEPSPEED_BUCKETS
    raise ValueError(f"strategy must be 'single' or 'zero2', got {strategy!r}")


def token_bytes(cfg: GPTConfig, precision: str, checkpointing: bool | str,
                degree: int = 1) -> float:
    """Activation bytes per token held on a rank at the step's peak (see :func:`peak_bytes`);
    ``checkpointing``: one of :data:`CHECKPOINTING`."""
    a = sum(layer_bytes(cfg, precision).values())
    r = residual_bytes(precision)
    D, H, h, d = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    transient = TRANSIENT[_mode(cfg)] + (4 * (H + 2 * h) * d if degree > 1 else 0)
    kept = cfg.n_layer * kept_bytes(cfg, precision, checkpointing)
    if checkpointing == "sparse_branches":
        kept += sparse_branch_bytes(cfg)  # the branches of the block whose backward runs
    elif checkpointing is not False:
        kept += a  # the block whose backward runs, recomputed
    return kept + transient + 2 * r * D


def peak_bytes(cfg: GPTConfig, tokens: int, degree: int = 1, *,
               checkpointing: bool | str = False,
               precision: str = "autocast", strategy: str = "single",
               n_params: int | None = None) -> float:
    """Predicted peak of torch's allocations on one of ``degree`` sequence-parallel ranks
    sharing a packed sequence of ``tokens`` (ZeRO's state sharded over those ranks)."""
    n_params = parameters(cfg) if n_params is None else n_params
    return (static_bytes(n_params, degree, strategy)
            + tokens / degree * token_bytes(cfg, precision, checkpointing, degree))


def longest_sequence(cfg: GPTConfig, degree: int, *, checkpointing: bool | str,
                     precision: str = "bf16", strategy: str = "zero2",
                     gpu_bytes: float = H200_BYTES, reserve: float = RESERVE_BYTES,
                     n_params: int | None = None, multiple: int = 1024) -> int:
    """The longest packed sequence (a multiple of ``multiple`` tokens) whose predicted peak
    fits ``gpu_bytes - reserve`` on each of ``degree`` GPUs."""
    n_params = parameters(cfg) if n_params is None else n_params
    free = gpu_bytes - reserve - static_bytes(n_params, degree, strategy)
    per_token = token_bytes(cfg, precision, checkpointing, degree) / degree
    return max(0, int(free / per_token) // multiple * multiple)


def preset(name: str) -> GPTConfig:
    """``model.config`` of ``configs/model/<name>.yaml`` (a GPTConfig)."""
    import yaml

    values = yaml.safe_load((PRESETS / f"{name}.yaml").read_text(encoding="utf-8"))
    return GPTConfig(**values["model"]["config"])


def markdown(name: str, cfg: GPTConfig, degrees: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """The README's table for ``cfg`` dense and NSA, without checkpointing, with the attention or
    the MLP of each block checkpointed (predictions not yet measured) and with whole blocks
    checkpointed: bytes per token per layer (autocast · bf16), and the longest sequence on one
    H200 without sequence parallelism (autocast, fp32 AdamW) and on P H200s under the
    sequence-parallel preset (ZeRO-2, bf16); ``*``: P does not divide ``cfg.n_kv_head``."""
    lines = [
        f"| {name} | bytes/token/layer, autocast · bf16 | 1 GPU, bf16-mixed | "
        + " | ".join(f"ulysses, P = {p}" + ("*" if cfg.n_kv_head % p else "") for p in degrees)
        + " |",
        "|---|---|---|" + "---|" * len(degrees),
    ]
    for attention in ("dense", "nsa"):
        model = dataclasses.replace(cfg, attention=attention)
        n_params = parameters(model)
        for checkpointing in CHECKPOINTING:
            if checkpointing == "sparse_branches" and attention != "nsa":
                continue
            a = {p: kept_bytes(model, p, checkpointing) for p in ("autocast", "bf16")}
            plain = longest_sequence(model, 1, checkpointing=checkpointing, precision="autocast",
                                     strategy="single", n_params=n_params)
            cells = [longest_sequence(model, p, checkpointing=checkpointing, n_params=n_params)
                     for p in degrees]
            label = attention + {False: "", True: ", checkpointed"}.get(
                checkpointing, f", {checkpointing} checkpointed")
            lines.append(f"| {label} | {a['autocast']:,.0f} · {a['bf16']:,.0f} | "
                         + " | ".join(f"{n // 1024:,}K" for n in [plain, *cells]) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt-350m-nsa",
                   help="a model preset of configs/model (its attention is set to both kinds)")


@register("memory_model", summary="predicted activation bytes per token per layer and the "
          "longest sequence on P H200s (no measurement)", arguments=add_arguments, gpu=False,
          record=False)
def main(args: argparse.Namespace) -> str:
    table = markdown(args.preset, preset(args.preset))
    print(table)
    return table
