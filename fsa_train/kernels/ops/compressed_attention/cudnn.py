"""``compressed_attention`` as cuDNN's causal attention over compressed positions.

The query at local position ``t`` of a document sees compressed token ``i`` iff
``i·s + l - 1 <= t``, so it sees tokens ``0 .. r(t)`` with ``r(t) = (t - l + 1) // s``: the ``s``
consecutive queries ``t = r·s + l - 1 .. r·s + l - 2 + s`` of *row* ``r`` all see the same keys
``0 .. r``, and a document of ``n_c`` compressed tokens has exactly ``n_c`` rows. Stacking each
row's ``s`` queries as ``s`` extra query heads makes the branch an ordinary causal attention
of ``n_c`` positions per document against the ``n_c`` compressed keys, with ``s·G`` query
heads per KV head: cuDNN's packed-sequence kernels (:mod:`..window_attention.cudnn`) run it at
dense-attention speed, exactly (no extra FLOPs but the last row's padding). Queries before
``l - 1`` see nothing: output 0, LSE ``-inf``, as in the naive op.

Only the slot layout is built here: gathers of q (and, in the backward, of o and dO) into rows
and of the rows' outputs back to tokens, with maps computed on the GPU from ``cu_seqlens`` (no
host synchronisation when ``max_seqlen`` is given). The forward keeps q and its own output
(which the other NSA branches and the gate mix keep anyway) and re-gathers the rows in the
backward instead of keeping them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fsa_train.kernels.ops.window_attention import cudnn as cudnn_window
from fsa_train.kernels.utils import as_int32


class SlotMaps(NamedTuple):
    """Where each query lives in the row layout.

    Attributes:
        slot_token: ``[total_c, s]`` the token of each row slot (clamped to 0 where none).
        slot_valid: ``[total_c, s]`` whether the slot holds a token.
        token_slot: ``[total]`` the slot ``row·s + u`` of each token (0 where it sees nothing).
        token_valid: ``[total]`` whether the token sees a compressed key.
    """

    slot_token: torch.Tensor
    slot_valid: torch.Tensor
    token_slot: torch.Tensor
    token_valid: torch.Tensor


def slot_maps(cu_seqlens: torch.Tensor, cu_seqlens_c: torch.Tensor, total: int, total_c: int,
              kernel: int, stride: int) -> SlotMaps:
    """The :class:`SlotMaps` of a batch, from its document boundaries (all on the device)."""
    device = cu_seqlens.device
    cu, cuc = cu_seqlens.long(), cu_seqlens_c.long()
    rows = torch.arange(total_c, device=device)
    row_doc = torch.searchsorted(cuc[1:], rows, right=True)
    first = cu[row_doc] + (rows - cuc[row_doc]) * stride + kernel - 1
    slot_token = first[:, None] + torch.arange(stride, device=device)
    slot_valid = slot_token < cu[row_doc + 1][:, None]
    tokens = torch.arange(total, device=device)
    token_doc = torch.searchsorted(cu[1:], tokens, right=True)
    shifted = tokens - cu[token_doc] - (kernel - 1)
    token_valid = shifted >= 0
    shifted = shifted.clamp(min=0)
    token_slot = (cuc[token_doc] + shifted // stride) * stride + shifted % stride
    return SlotMaps(torch.where(slot_valid, slot_token, 0), slot_valid,
                    torch.where(token_valid, token_slot, 0), token_valid)


def to_rows(x: torch.Tensor, maps: SlotMaps, zero_empty: bool = False) -> torch.Tensor:
    """``x [total, H, d]`` → rows ``[total_c, H·s, d]`` (head ``j·s + u`` holds slot ``u``
    of query head ``j``, so KV head ``(j·s + u) // (s·G)`` is ``j // G``). ``zero_empty``: 0 in
    the slots that hold no token (else some other token's values)."""
    total_c, s = maps.slot_token.shape
    H, d = x.shape[1], x.shape[2]
    heads = torch.arange(H, device=x.device)
    index = (maps.slot_token[:, None, :] * H + heads[None, :, None]).reshape(-1)
    rows = x.reshape(-1, d).index_select(0, index).view(total_c, H * s, d)
    if zero_empty:
        rows = rows * maps.slot_valid[:, None, :].expand(total_c, H, s).reshape(
            total_c, H * s, 1).to(rows.dtype)
    return rows


def from_rows(rows: torch.Tensor, maps: SlotMaps, H: int) -> torch.Tensor:
    """Rows ``[total_c, H·s, ...]`` → tokens ``[total, H, ...]``, 0 for tokens that see nothing."""
    s = maps.slot_token.shape[1]
    tail = rows.shape[2:]
    row, u = maps.token_slot // s, maps.token_slot % s
    heads = torch.arange(H, device=rows.device)
    index = ((row[:, None] * H + heads[None, :]) * s + u[:, None]).reshape(-1)
    out = rows.reshape(-1, *tail).index_select(0, index).view(-1, H, *tail)
    mask = maps.token_valid.view(-1, *([1] * (out.dim() - 1)))
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def row_lse(lse_rows: torch.Tensor, maps: SlotMaps, H: int) -> torch.Tensor:
    """cuDNN's ``lse [total_c, H·s, 1]`` → ``[H, total]`` fp32, ``-inf`` for tokens that see
    nothing."""
    lse = from_rows(lse_rows, maps, H)[..., 0]
    lse = torch.where(maps.token_valid[:, None], lse, float("-inf"))
    return lse.t().contiguous().float()


class _CudnnCompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_c, v_c, maps: SlotMaps, cuc, scale: float, longest: int,
                deterministic: bool):
        H = q.shape[1]
        o_rows, lse_rows = cudnn_window.attention_forward(to_rows(q, maps), k_c, v_c, cuc,
                                                          scale, -1, longest)
        o = from_rows(o_rows, maps, H)
        lse = row_lse(lse_rows, maps, H)
        ctx.save_for_backward(q, k_c, v_c, o, lse_rows, cuc, *maps)
        ctx.options = (scale, longest, deterministic)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_c, v_c, o, lse_rows, cuc, *maps = ctx.saved_tensors
        maps = SlotMaps(*maps)
        scale, longest, deterministic = ctx.options
        # slots without a token get dO = 0, so they add nothing to dK and dV
        dq_rows, dk, dv = cudnn_window.attention_backward(
            to_rows(do, maps, zero_empty=True), to_rows(q, maps), k_c, v_c, to_rows(o, maps),
            lse_rows, cuc, scale, -1, longest, deterministic)
        return from_rows(dq_rows, maps, q.shape[1]), dk, dv, None, None, None, None, None


def unsupported(q: torch.Tensor, k_c: torch.Tensor) -> str | None:
    """Why the cuDNN path cannot run these inputs (None when it can)."""
    reason = cudnn_window.unsupported(q, k_c, None)
    return None if reason is None else reason.replace("window_kernel", "compressed_kernel")


def compressed_attention(q, k_c, v_c, cu_seqlens, cu_seqlens_c, kernel: int, stride: int,
                         scale: float | None = None, max_seqlen: int | None = None, *,
                         deterministic: bool | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [total, H, d], lse [H, total] fp32)``; a ValueError naming the reason when cuDNN
    cannot run these inputs (:func:`unsupported`). ``max_seqlen``: the longest document, if
    known (else read from ``cu_seqlens``: one host synchronisation)."""
    reason = unsupported(q, k_c)
    if reason is not None:
        raise ValueError(reason)
    total, H, _ = q.shape
    total_c = k_c.shape[0]
    if total_c == 0:  # no document reaches one compression window
        lse = torch.full((H, total), float("-inf"), device=q.device)
        return q.new_zeros(total, H, v_c.shape[-1]), lse
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    longest_c = None
    if max_seqlen is not None:
        longest_c = max(1, (int(max_seqlen) - kernel) // stride + 1)
    cuc, longest = cudnn_window.plan_shape(as_int32(cu_seqlens_c), total_c, longest_c)
    maps = slot_maps(cu_seqlens, cu_seqlens_c, total, total_c, kernel, stride)
    return _CudnnCompressedAttention.apply(q, k_c.contiguous(), v_c.contiguous(), maps, cuc,
                                           scale, longest, deterministic)
