"""The whole NSA attention core: compression, compressed, selected and window branches, gates.

Takes q and k *before* RoPE (compression must see un-rotated keys, docs/nsa.md step 2) and applies
the rotary embedding itself: tokens at their document positions, compressed keys at ``i·stride``.
Each branch runs on the backend chosen per op by :mod:`fsa_train.kernels.registry`, with the
kernels' launch switches ``settings`` passed down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fsa_train.kernels import api as ops
from fsa_train.kernels.varlen import compressed_lengths, document_positions

if TYPE_CHECKING:
    from fsa_train.config import NSAConfig
    from fsa_train.kernels.settings import KernelSettings

Rope = Callable[..., torch.Tensor]
"""``rope(x [n, heads, d], positions [n] int64, max_position=None) -> x rotated``.

``max_position`` is an exclusive bound on the positions (default: n); passed for the compressed
keys, whose positions ``i·stride`` exceed their count."""


@dataclass
class NSAVarlen:
    """Packed-layout indices that depend only on the batch's ``cu_seqlens`` (not on the layer):
    computed once per forward by the model and shared by all its NSA layers.

    Attributes:
        positions: each token's position in its document ``[total]`` int64.
        cu_seqlens_c: compressed-token boundaries ``[n_docs + 1]`` int32.
        positions_c: each compressed token's RoPE position ``i·stride`` ``[total // stride]``.
    """

    positions: torch.Tensor
    cu_seqlens_c: torch.Tensor
    positions_c: torch.Tensor


def nsa_varlen(
    cu_seqlens: torch.Tensor, total: int, cfg: NSAConfig, positions: torch.Tensor | None = None
) -> NSAVarlen:
    """The :class:`NSAVarlen` of a batch (device ops only, no host synchronisation).

    ``positions_c`` has ``total // stride`` rows, the static size of the GPU ``compress`` output
    (rows past ``cu_seqlens_c[-1]`` are padding; the reference's output is a prefix of it).
    """
    if positions is None:
        positions = document_positions(cu_seqlens, total)
    cu_c = compressed_lengths(cu_seqlens, cfg.cmp_kernel, cfg.cmp_stride)
    positions_c = document_positions(cu_c, total // cfg.cmp_stride) * cfg.cmp_stride
    return NSAVarlen(positions, cu_c, positions_c)


@dataclass
class CompressionParams:
    """Learned compression parameters of one NSA layer.

    Attributes:
        w_k: key compression weight ``[h, l·d, d]``.
        w_v: value compression weight ``[h, l·d, d]``.
        pe: intra-window position embedding added to keys before compression ``[h, l, d]``.
    """

    w_k: torch.Tensor
    w_v: torch.Tensor
    pe: torch.Tensor


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    params: CompressionParams,
    cu_seqlens: torch.Tensor,
    cfg: NSAConfig,
    rope: Rope,
    scale: float | None = None,
    backend: str = "auto",
    varlen: NSAVarlen | None = None,
    settings: KernelSettings | None = None,
    max_seqlen: int | None = None,
    mix: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSA core output ``[total, H, d]`` (``mix=False``: the three branch outputs
    ``(o_cmp, o_sel, o_win)`` unmixed, for :func:`~fsa_train.kernels.gated_projection`).

    Args:
        q: queries before RoPE ``[total, H, d]``.
        k, v: keys (before RoPE) and values ``[total, h, d]``.
        gates: branch gates after the sigmoid ``[total, H, 3]``, order (cmp, sel, win).
        params: compression weights and position embedding.
        cu_seqlens: document boundaries ``[n_docs + 1]`` int32.
        cfg: NSA parameters.
        rope: rotary embedding, applied here at per-document positions.
        scale: softmax scale (default ``1/sqrt(d)``).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        varlen: the batch's :func:`nsa_varlen`, if the caller has it already (the model computes
            it once for all layers); computed here otherwise.
        settings: the Triton kernels' launch switches (default: from the environment).
        max_seqlen: the longest document as a host integer, if known (library kernels size
            their grid with it).
    """
    if varlen is None:
        varlen = nsa_varlen(cu_seqlens, q.shape[0], cfg)
    run = {"backend": backend, "settings": settings}
    x = nsa_branch_inputs(q, k, v, params, cu_seqlens, cfg, rope, varlen, **run)
    o_cmp, o_sel = nsa_sparse_branches(x, cu_seqlens, varlen.cu_seqlens_c, cfg, scale,
                                       max_seqlen, **run)
    o_win = nsa_window_branch(x, cu_seqlens, cfg, scale, max_seqlen, **run)
    if not mix:
        return o_cmp, o_sel, o_win
    return ops.gate_mix(o_cmp, o_sel, o_win, gates, **run)


@dataclass
class NSABranchInputs:
    """What the three branches read: queries, keys and compressed keys after RoPE, values and
    compressed values.

    Attributes:
        q: ``[total, H, d]``; k, v: ``[total, h, d]``; k_c, v_c: ``[total_c, h, d]``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_c: torch.Tensor
    v_c: torch.Tensor


def nsa_branch_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CompressionParams,
    cu_seqlens: torch.Tensor, cfg: NSAConfig, rope: Rope, varlen: NSAVarlen,
    backend: str = "auto", settings: KernelSettings | None = None,
) -> NSABranchInputs:
    """Compression (of the un-rotated keys, docs/nsa.md step 2) and RoPE: tokens at their
    document positions, compressed keys at ``i·stride``."""
    run = {"backend": backend, "settings": settings}
    k_c, _ = ops.compress(
        k, params.w_k, params.pe, cu_seqlens, cfg.cmp_kernel, cfg.cmp_stride,
        cu_seqlens_c=varlen.cu_seqlens_c, **run,
    )
    v_c, _ = ops.compress(
        v, params.w_v, None, cu_seqlens, cfg.cmp_kernel, cfg.cmp_stride,
        cu_seqlens_c=varlen.cu_seqlens_c, **run,
    )
    positions_c = varlen.positions_c[: k_c.shape[0]]  # the reference's output has fewer rows
    return NSABranchInputs(rope(q, varlen.positions), rope(k, varlen.positions), v,
                           rope(k_c, positions_c, max_position=q.shape[0]), v_c)


def nsa_sparse_branches(
    x: NSABranchInputs, cu_seqlens: torch.Tensor, cu_seqlens_c: torch.Tensor, cfg: NSAConfig,
    scale: float | None = None, max_seqlen: int | None = None, backend: str = "auto",
    settings: KernelSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed and the selected branch ``(o_cmp, o_sel)``, with the block selection
    between them (it reads the compressed branch's log-sum-exp)."""
    run = {"backend": backend, "settings": settings}
    o_cmp, lse = ops.compressed_attention(
        x.q, x.k_c, x.v_c, cu_seqlens, cu_seqlens_c, cfg.cmp_kernel, cfg.cmp_stride, scale,
        max_seqlen, **run,
    )
    with torch.no_grad():
        idx = ops.select_blocks(
            x.q.detach(), x.k_c.detach(), lse.detach(), cu_seqlens, cu_seqlens_c,
            cfg.cmp_kernel, cfg.cmp_stride, cfg.sel_block, cfg.sel_topk,
            cfg.init_blocks, cfg.local_blocks, scale, selection=cfg.selection, **run,
        )
    o_sel = ops.selected_attention(x.q, x.k, x.v, idx, cu_seqlens, cfg.sel_block, scale,
                                   partials=cfg.selected_partials, selection=cfg.selection,
                                   forced_blocks=(cfg.init_blocks, cfg.local_blocks), **run)
    return o_cmp, o_sel


def nsa_window_branch(
    x: NSABranchInputs, cu_seqlens: torch.Tensor, cfg: NSAConfig, scale: float | None = None,
    max_seqlen: int | None = None, backend: str = "auto",
    settings: KernelSettings | None = None,
) -> torch.Tensor:
    """The sliding-window branch ``o_win [total, H, d]``."""
    return ops.window_attention(x.q, x.k, x.v, cu_seqlens, cfg.window, scale, max_seqlen,
                                backend=backend, settings=settings)
