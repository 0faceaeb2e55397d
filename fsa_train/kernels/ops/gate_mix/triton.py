"""Gate mixing of the three NSA branches (docs/nsa.md step 8) in one kernel each way.

``o = g_cmp·o_cmp + g_sel·o_sel + g_win·o_win`` with per-(token, head) gates. In torch this is five
elementwise kernels forward and about ten backward (with reductions for the gate gradients), each
a full pass over ``[total, H, d]``; here the forward reads the three branches once and writes
``o`` once, and the backward reads ``do`` (and the branches, for the gate gradients) once.

Tile: one program owns ``_TILE // d`` (token, head) rows × the whole head dim, so every program
moves a few tens of KB whatever ``d``; rows are flattened ``t·H + j`` so any token/head/dim
strides work. Gate gradients are row sums inside one program: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings

__all__ = ["GateMix", "GatedProjection", "gate_mix", "gated_projection"]

_TILE = 4096
"""Elements (rows × d) of one branch per program: 8 KB in bf16."""


@triton.jit
def _load_rows(X, t, j, st, sh, sd, rv, D: tl.constexpr):
    """Rows ``(t, j)`` × the whole head dim of X (strides ``st, sh, sd``) in fp32, 0 if masked."""
    offs = t[:, None] * st + j[:, None] * sh + tl.arange(0, D)[None, :] * sd
    return tl.load(X + offs, mask=rv[:, None], other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    OC, OS, OW, G, O,
    sct, sch, scd, sst, ssh, ssd, swt, swh, swd, sgt, sgh, sgx, rows, H,
    D: tl.constexpr, BR: tl.constexpr,
):
    """``o[r] = Σ_x g[r, x]·o_x[r]`` in fp32 for BR rows; o is contiguous."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rv = r < rows
    t = r // H
    j = r % H
    g = G + t * sgt + j * sgh
    g0 = tl.load(g, mask=rv, other=0.0).to(tl.float32)
    g1 = tl.load(g + sgx, mask=rv, other=0.0).to(tl.float32)
    g2 = tl.load(g + 2 * sgx, mask=rv, other=0.0).to(tl.float32)
    acc = g0[:, None] * _load_rows(OC, t, j, sct, sch, scd, rv, D)
    acc += g1[:, None] * _load_rows(OS, t, j, sst, ssh, ssd, rv, D)
    acc += g2[:, None] * _load_rows(OW, t, j, swt, swh, swd, rv, D)
    out = r[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(O + out, acc.to(O.dtype.element_ty), mask=rv[:, None])


@triton.jit
def _branch_bwd(
    do, OX, sxt, sxh, sxd, g, DOX, DG, r, rv, t, j, x: tl.constexpr,
    D: tl.constexpr, NEED_DO: tl.constexpr, NEED_DG: tl.constexpr,
):
    """One branch's share of the backward: ``d_o_x = g_x·do`` and ``d_g[:, x] = Σ_d do·o_x``."""
    if NEED_DO:
        gx = tl.load(g, mask=rv, other=0.0).to(tl.float32)
        out = r[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(DOX + out, (gx[:, None] * do).to(DOX.dtype.element_ty), mask=rv[:, None])
    if NEED_DG:
        o = _load_rows(OX, t, j, sxt, sxh, sxd, rv, D)
        tl.store(DG + r * 3 + x, tl.sum(do * o, 1).to(DG.dtype.element_ty), mask=rv)


@triton.jit
def _bwd_kernel(
    DO, OC, OS, OW, G, DOC, DOS, DOW, DG,
    sdt, sdh, sdd, sct, sch, scd, sst, ssh, ssd, swt, swh, swd, sgt, sgh, sgx, rows, H,
    D: tl.constexpr, BR: tl.constexpr,
    NEED_C: tl.constexpr, NEED_S: tl.constexpr, NEED_W: tl.constexpr, NEED_G: tl.constexpr,
):
    """Branch and gate gradients of BR rows from one read of ``do``; outputs are contiguous."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rv = r < rows
    t = r // H
    j = r % H
    do = _load_rows(DO, t, j, sdt, sdh, sdd, rv, D)
    g = G + t * sgt + j * sgh
    _branch_bwd(do, OC, sct, sch, scd, g, DOC, DG, r, rv, t, j, 0, D, NEED_C, NEED_G)
    _branch_bwd(do, OS, sst, ssh, ssd, g + sgx, DOS, DG, r, rv, t, j, 1, D, NEED_S, NEED_G)
    _branch_bwd(do, OW, swt, swh, swd, g + 2 * sgx, DOW, DG, r, rv, t, j, 2, D, NEED_W, NEED_G)


def _check(o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor):
    if o_cmp.dim() != 3 or o_sel.shape != o_cmp.shape or o_win.shape != o_cmp.shape:
        raise ValueError(
            f"branch outputs must share a [total, H, d] shape, got {tuple(o_cmp.shape)}, "
            f"{tuple(o_sel.shape)}, {tuple(o_win.shape)}"
        )
    total, H, d = o_cmp.shape
    if gates.shape != (total, H, 3):
        raise ValueError(f"gates must be [{total}, {H}, 3], got {tuple(gates.shape)}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {d}")
    if not all(x.is_floating_point() for x in (o_cmp, o_sel, o_win, gates)):
        raise ValueError("branch outputs and gates must be floating point")


def _mix_fake(o_cmp, o_sel, o_win, gates, dtype=None):
    return torch.empty(o_cmp.shape, dtype=dtype or o_cmp.dtype, device=o_cmp.device)


@kernel_op("gate_mix_fwd", _mix_fake)
def _mix(o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """The forward kernel: the gated sum ``[total, H, d]``, contiguous, in ``dtype`` (default
    o_cmp's)."""
    total, H, d = o_cmp.shape
    out = torch.empty(o_cmp.shape, dtype=dtype or o_cmp.dtype, device=o_cmp.device)
    rows, br = total * H, _TILE // d
    if rows:
        _fwd_kernel[(triton.cdiv(rows, br),)](
            o_cmp, o_sel, o_win, gates, out,
            *o_cmp.stride(), *o_sel.stride(), *o_win.stride(), *gates.stride(), rows, H,
            D=d, BR=br, num_warps=4,
        )
    return out


def _mix_backward(do: torch.Tensor, branches: list, gates: torch.Tensor,
                  dtypes: tuple, need: tuple) -> tuple:
    """The backward kernel: the branch gradients (in ``dtypes``) and the gate gradient, None
    where ``need`` says so; ``branches`` may be None when the gate gradient is not needed."""
    grads = _mix_backward_kernel(do, *branches, gates, *dtypes, [bool(n) for n in need[:4]])
    return tuple(g if n else None for g, n in zip(grads, need[:4], strict=True))


def _mix_backward_fake(do, o_cmp, o_sel, o_win, gates, dtype_cmp, dtype_sel, dtype_win, need):
    shapes = [do.shape] * 3 + [gates.shape]
    dtypes = (dtype_cmp, dtype_sel, dtype_win, gates.dtype)
    return [torch.empty(shape if n else (0,), dtype=dtype, device=do.device)
            for shape, dtype, n in zip(shapes, dtypes, need, strict=True)]


@kernel_op("gate_mix_bwd", _mix_backward_fake)
def _mix_backward_kernel(
    do: torch.Tensor, o_cmp: torch.Tensor | None, o_sel: torch.Tensor | None,
    o_win: torch.Tensor | None, gates: torch.Tensor, dtype_cmp: torch.dtype,
    dtype_sel: torch.dtype, dtype_win: torch.dtype, need: list[bool],
) -> list[torch.Tensor]:
    """:func:`_mix_backward` as a custom op: the four gradients, empty where not needed."""
    branches = (o_cmp, o_sel, o_win)
    total, H, d = do.shape
    grads = [
        torch.empty(do.shape, dtype=dtype, device=do.device) if n else None
        for dtype, n in zip((dtype_cmp, dtype_sel, dtype_win), need[:3], strict=True)
    ]
    d_g = torch.empty(gates.shape, dtype=gates.dtype, device=do.device) if need[3] else None
    rows, br = total * H, _TILE // d
    if rows and any(need):
        # unused pointers and strides get ``do``'s: the kernel never touches them
        ptrs = [x if x is not None else do for x in (*branches, *grads, d_g)]
        strides = [s for x in ptrs[:3] for s in x.stride()]
        _bwd_kernel[(triton.cdiv(rows, br),)](
            do, *ptrs[:3], gates, *ptrs[3:], *do.stride(), *strides, *gates.stride(), rows, H,
            D=d, BR=br, NEED_C=need[0], NEED_S=need[1], NEED_W=need[2], NEED_G=need[3],
            num_warps=8,
        )
    return [x if x is not None else do.new_empty(0, dtype=dtype)
            for x, dtype in zip((*grads, d_g), (dtype_cmp, dtype_sel, dtype_win, gates.dtype),
                                strict=True)]


class GateMix(torch.autograd.Function):
    """``Σ_x gates[..., x:x+1]·o_x`` with a fused Triton forward and backward."""

    @staticmethod
    def forward(ctx, o_cmp, o_sel, o_win, gates):
        out = _mix(o_cmp, o_sel, o_win, gates)
        # the branch outputs are needed only for the gate gradients
        branches = (o_cmp, o_sel, o_win) if ctx.needs_input_grad[3] else (None, None, None)
        ctx.save_for_backward(*branches, gates)
        ctx.dtypes = (o_cmp.dtype, o_sel.dtype, o_win.dtype)
        return out

    @staticmethod
    def backward(ctx, do):
        *branches, gates = ctx.saved_tensors
        return _mix_backward(do, branches, gates, ctx.dtypes, ctx.needs_input_grad)


class GatedProjection(torch.autograd.Function):
    """``gate_mix(o_cmp, o_sel, o_win, gates).flatten(1) @ weight.T`` that keeps only the
    branch outputs (which the branches keep for their own backward anyway) and the gates: the
    mixed output is recomputed by the forward kernel in the backward, for ``weight``'s
    gradient, instead of being held from forward to backward like a linear layer's input."""

    @staticmethod
    def forward(ctx, o_cmp, o_sel, o_win, gates, weight, dtype):
        total = o_cmp.shape[0]
        w = weight.to(dtype)
        y = _mix(o_cmp, o_sel, o_win, gates, dtype).view(total, -1) @ w.t()
        ctx.save_for_backward(o_cmp, o_sel, o_win, gates, w)
        ctx.dtypes = (o_cmp.dtype, o_sel.dtype, o_win.dtype)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        o_cmp, o_sel, o_win, gates, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.to(w.dtype)
        d_w = None
        if need[4]:
            mixed = _mix(o_cmp, o_sel, o_win, gates, w.dtype).view(dy.shape[0], -1)
            d_w = (dy.t() @ mixed).to(ctx.weight_dtype)
        grads = (None,) * 4
        if any(need[:4]):
            do = (dy @ w).view(o_cmp.shape)
            grads = _mix_backward(do, [o_cmp, o_sel, o_win], gates, ctx.dtypes, need[:4])
        return (*grads, d_w, None)


def gate_mix(
    o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor, *,
    settings: KernelSettings | None = None,
) -> torch.Tensor:
    """Gated sum of the NSA branch outputs, ``[total, H, d]`` in o_cmp's dtype.

    Args:
        o_cmp, o_sel, o_win: branch outputs ``[total, H, d]`` (any float dtypes and strides;
            ``d`` a power of two in [16, 256]).
        gates: ``[total, H, 3]`` (any float dtype and strides), order (cmp, sel, win).

    Computed in fp32; differentiable in all four inputs (each gradient in its input's dtype).
    ``settings`` is accepted for the common op signature; the kernel has no switches.
    """
    _check(o_cmp, o_sel, o_win, gates)
    return GateMix.apply(o_cmp, o_sel, o_win, gates)


def gated_projection(
    o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor,
    weight: torch.Tensor, *, settings: KernelSettings | None = None,
) -> torch.Tensor:
    """The output projection of the gated sum, ``[total, D]`` (see the naive op); the mixed
    output is not kept for the backward (:class:`GatedProjection`)."""
    _check(o_cmp, o_sel, o_win, gates)
    _check_weight(o_cmp, weight)
    return GatedProjection.apply(o_cmp, o_sel, o_win, gates, weight, _matmul_dtype(o_cmp))


def _check_weight(o_cmp: torch.Tensor, weight: torch.Tensor) -> None:
    total, H, d = o_cmp.shape
    if weight.dim() != 2 or weight.shape[1] != H * d:
        raise ValueError(f"weight must be [D, {H * d}] for branch outputs [total, {H}, {d}], "
                         f"got {tuple(weight.shape)}")


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
