"""Attention layers: dense (causal per document) and Native Sparse Attention (docs/nsa.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsa_train.config import SPARSE_BRANCHES, GPTConfig
from fsa_train.kernels import (
    CompressionParams,
    NSABranchInputs,
    NSAVarlen,
    gate_mix,
    gated_projection,
    nsa_attention,
    nsa_branch_inputs,
    nsa_sparse_branches,
    nsa_varlen,
    nsa_window_branch,
    window_attention,
)
from fsa_train.model.rope import Rotary
from fsa_train.parallel.sequence import SequenceShard


class OutputProjection(nn.Linear):
    """The attention's output projection ``[total, H·d] → [total, D]``, a linear layer without
    bias. NSA calls it with its three branch outputs and gates instead of their gated sum: the
    sum is formed inside (:func:`fsa_train.kernels.gated_projection`), so the step does not
    keep it from forward to backward (one ``[total, H, d]`` tensor per layer less; the branches
    keep their outputs for their own backward anyway). Still called as a module, so that
    parameter hooks (DeepSpeed ZeRO-3's gathering) see it."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias=False)
        self.backend = backend

    def forward(self, o: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                gates: torch.Tensor | None = None) -> torch.Tensor:
        """``o``: the mixed heads ``[total, H·d]``, or ``(o_cmp, o_sel, o_win)`` each
        ``[total, H, d]`` with ``gates [total, H, 3]``."""
        if gates is None:
            return super().forward(o)
        return gated_projection(*o, gates, self.weight, backend=self.backend)


class Attention(nn.Module):
    """Grouped-query self-attention over a packed batch, dense or NSA by ``cfg.attention``.

    Dense attention is ``window_attention(window=cfg.window)``: causal within each document (over
    the last ``cfg.window`` keys when set). NSA adds the compression weights ``[h, l·d, d]`` for
    keys and values, the intra-window position embedding ``pe [h, l, d]`` and a per-head
    sigmoid gate for each of the three branches.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, H, h = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        self.q_proj = nn.Linear(cfg.d_model, H * d, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, h * d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, h * d, bias=False)
        self.o_proj = OutputProjection(H * d, cfg.d_model, cfg.kernel_backend)
        self.rope = Rotary(d, cfg.rope_base)
        self.sparse = cfg.attention == "nsa"
        self.recompute_sparse = cfg.activation_checkpointing == SPARSE_BRANCHES
        """Recompute the compressed and selected branches and the output projection (the gate
        mix under sequence parallelism) in backward (:meth:`_recomputed_sparse`)."""
        if self.sparse:
            l = cfg.nsa.cmp_kernel
            self.w_ck = nn.Parameter(torch.empty(h, l * d, d))
            self.w_cv = nn.Parameter(torch.empty(h, l * d, d))
            self.pe = nn.Parameter(torch.empty(h, l, d))
            self.gate = nn.Linear(cfg.d_model, 3 * H, bias=False)

    @torch.no_grad()
    def reset_compression(
        self, generator: Callable[[str, torch.device], torch.Generator] | None = None
    ) -> None:
        """Start compression as mean pooling over the window plus small noise.

        ``generator(param_name, device)`` gives the random generator of each parameter (the
        GPT's name-keyed initialisation); None draws from the global RNG.
        """
        if not self.sparse or self.pe.is_meta:
            return

        def gen(name: str, param: torch.Tensor) -> torch.Generator | None:
            return None if generator is None else generator(name, param.device)

        l, d = self.cfg.nsa.cmp_kernel, self.cfg.head_dim
        pooling = torch.eye(d).repeat(l, 1) / l
        for name, weight in (("w_ck", self.w_ck), ("w_cv", self.w_cv)):
            noise = torch.randn(weight.shape, generator=gen(name, weight), device=weight.device,
                                dtype=weight.dtype)
            weight.copy_(pooling.expand_as(weight))
            weight.add_(noise * (self.cfg.init_std / math.sqrt(l)))
        self.pe.normal_(0.0, self.cfg.init_std, generator=gen("pe", self.pe))

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
        varlen: NSAVarlen | None = None, max_seqlen: int | None = None,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """``x [total, D]`` → ``[total, D]``; documents never attend to each other.

        ``varlen`` (NSA only): the batch's :func:`fsa_train.kernels.nsa_varlen`, shared by all
        layers; computed here when None. ``max_seqlen``: the longest document, when the data
        knows it (library attention kernels size their grid with it). ``shard``: sequence
        parallelism (:mod:`fsa_train.parallel.sequence`): ``x`` is this rank's slice of the
        sequence, ``cu_seqlens``, ``positions`` and ``varlen`` are the whole sequence's."""
        total = x.shape[0]
        d, H, h = self.cfg.head_dim, self.cfg.n_head, self.cfg.n_kv_head
        q = self.q_proj(x).view(total, H, d)
        k = self.k_proj(x).view(total, h, d)
        v = self.v_proj(x).view(total, h, d)
        gates = torch.sigmoid(self.gate(x)).view(total, H, 3) if self.sparse else None
        if shard is None and self.recompute_sparse and torch.is_grad_enabled():
            # the gated projection inside the checkpoint: it would keep both branch outputs
            return self._recomputed_sparse(
                q, k, v, gates, self._compression(), cu_seqlens, positions, varlen, max_seqlen,
                lambda o_cmp, o_sel, o_win, gates: self.o_proj((o_cmp, o_sel, o_win), gates))
        if shard is None and self.sparse:
            branches = self.core(q, k, v, gates, cu_seqlens, positions, varlen, max_seqlen,
                                 mix=False)
            return self.o_proj(branches, gates)
        if shard is None:
            o = self.core(q, k, v, gates, cu_seqlens, positions, varlen, max_seqlen)
        else:
            o = self._sequence_parallel_core(q, k, v, gates, cu_seqlens, positions, varlen,
                                             max_seqlen, shard)
        return self.o_proj(o.reshape(total, H * d))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor | None,
             cu_seqlens: torch.Tensor, positions: torch.Tensor, varlen: NSAVarlen | None,
             max_seqlen: int | None, kv_heads: slice = slice(None), mix: bool = True):
        """The attention core on pre-RoPE ``q [total, H', d]``, ``k, v [total, h', d]`` (and
        NSA's ``gates [total, H', 3]``) of whole documents; ``kv_heads``: which of the layer's KV
        heads ``k`` holds (their slice of the compression weights). ``mix=False`` (NSA): the
        three branch outputs, for :class:`OutputProjection` to mix."""
        backend = self.cfg.kernel_backend
        if self.sparse:
            params = self._compression(kv_heads)
            if varlen is None:
                varlen = nsa_varlen(cu_seqlens, q.shape[0], self.cfg.nsa, positions)
            if mix and self.recompute_sparse and torch.is_grad_enabled():
                # sequence parallelism: the gate mix inside the checkpoint (the output
                # projection keeps the mixed output, which it would keep anyway)
                return self._recomputed_sparse(q, k, v, gates, params, cu_seqlens, positions,
                                               varlen, max_seqlen,
                                               partial(gate_mix, backend=backend))
            return nsa_attention(
                q, k, v, gates, params, cu_seqlens, self.cfg.nsa, self.rope, backend=backend,
                varlen=varlen, max_seqlen=max_seqlen, mix=mix,
            )
        q = self.rope(q, positions)
        k = self.rope(k, positions)
        return window_attention(q, k, v, cu_seqlens, self.cfg.window, None, max_seqlen,
                                backend=backend)

    def _compression(self, kv_heads: slice = slice(None)) -> CompressionParams:
        """The compression weights and position embedding of ``kv_heads``."""
        return CompressionParams(self.w_ck[kv_heads], self.w_cv[kv_heads], self.pe[kv_heads])

    def _recomputed_sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor,
        params: CompressionParams, cu_seqlens: torch.Tensor, positions: torch.Tensor,
        varlen: NSAVarlen | None, max_seqlen: int | None, combine: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """``combine(o_cmp, o_sel, o_win, gates)`` with the compressed and selected branches
        (and the block selection between them) and ``combine`` itself in a checkpoint
        (``activation_checkpointing: sparse_branches``): backward recomputes them from the
        rotated q, k, v, the compressed keys and values, the window output and the gates, which
        the window branch keeps anyway or which are small, so the step keeps neither sparse
        branch's output, log-sum-exp nor the selection. ``combine``: the gated output
        projection, or under sequence parallelism the gate mix."""
        cfg, backend = self.cfg.nsa, self.cfg.kernel_backend
        if varlen is None:
            varlen = nsa_varlen(cu_seqlens, q.shape[0], cfg, positions)
        x = nsa_branch_inputs(q, k, v, params, cu_seqlens, cfg, self.rope, varlen,
                              backend=backend)
        o_win = nsa_window_branch(x, cu_seqlens, cfg, max_seqlen=max_seqlen, backend=backend)

        def sparse_and_combine(q, k, v, k_c, v_c, o_win, gates):
            o_cmp, o_sel = nsa_sparse_branches(
                NSABranchInputs(q, k, v, k_c, v_c), cu_seqlens, varlen.cu_seqlens_c, cfg,
                max_seqlen=max_seqlen, backend=backend)
            return combine(o_cmp, o_sel, o_win, gates)

        return checkpoint(sparse_and_combine, x.q, x.k, x.v, x.k_c, x.v_c, o_win, gates,
                          use_reentrant=False)

    def _sequence_parallel_core(self, q, k, v, gates, cu_seqlens, positions, varlen,
                                max_seqlen, shard: SequenceShard) -> torch.Tensor:
        """:meth:`core` on the whole sequence for this rank's heads, through DeepSpeed's
        all-to-all (gates travel with q, as extra channels)."""
        d = self.cfg.head_dim
        kv_heads = shard.head_slice(self.cfg.n_kv_head)
        if gates is not None:
            q = torch.cat([q, gates.to(q.dtype)], dim=-1)

        def local(q, k, v, *_):
            q, k, v = q[:, 0], k[:, 0], v[:, 0]
            q, g = (q[..., :d], q[..., d:]) if gates is not None else (q, None)
            o = self.core(q, k, v, g, cu_seqlens, positions, varlen, max_seqlen, kv_heads)
            return o[:, None]

        o = shard.attention(local)(q[:, None], k[:, None], v[:, None], 1)
        return o[:, 0]
