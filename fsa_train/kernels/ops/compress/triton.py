"""``compress`` (NSA step 2) for the GPU path: Triton forward and backward, no host sync.

``out[r, hd] = Σ_j (x[st_r + j, hd] + pe[hd, j]) @ W[hd, j·d:(j+1)·d]`` for compressed row ``r``
of document ``b``, window start ``st_r = cu[b] + (r - cu_c[b])·s``. The output has a static
number of rows, ``total // stride`` (never fewer than the compressed tokens: a document of length
L ≥ l has ``(L - l)//s + 1 ≤ L // s`` of them); rows past ``cu_seqlens_c[-1]`` are zeros whose
gradient is dropped, and every consumer indexes compressed tokens through ``cu_seqlens_c``. No
``.item()`` anywhere, so the op runs under CUDA-graph capture.

Design (the torch version — gather ``x[rows]``, copies, bmm — was ~1 ms per call on an H200,
launch-bound, with a scatter in its backward):

* **Forward**, one launch: a program per (tile of ``BLOCK_R`` compressed rows, KV head) finds
  each row's document by a binary search over ``cu_seqlens_c``, then loops over the l window
  positions: gathered ``[BLOCK_R, d]`` tile of ``x`` (+ ``pe_j``, rounded to x's dtype as the
  reference adds it) ``@ W_j [d, d_out]`` into an fp32 accumulator.
* **dW and dpe**, one launch (plus one small reduction each when split): a program per
  (KV head, window position j, split of the rows) accumulates ``(x + pe_j)^T @ dout`` over its
  rows in fp32, and ``dpe_j = W_j @ Σ_r dout[r]``. Splits write fp32 partials that a Triton
  kernel adds in a fixed order (deterministic, no atomics).
* **dx**, one launch, a gather: a program per (tile of ``BLOCK_U`` groups of s tokens of one
  document, KV head); token ``u·s + q`` lies in windows ``u - a`` (``a < l/s``) at position
  ``q + a·s``, so for each ``q`` the tile's rows are ``Σ_a dout[u - a] @ W_{q+a·s}^T``. Tiles
  start at document starts (document ``b`` owns tile slots ``cu[b] // tile + b ..`` of a static
  grid, as in :mod:`.compressed_attention`); tokens in no window get 0.

Launches: forward 1 (plus the few torch ops of ``compressed_lengths``); backward 2, plus one
small reduction per parameter gradient when the rows are split. fp16, bf16 and fp32 run the
kernels (fp32 with "ieee" dots); fp64 (``tl.dot`` has none) runs :func:`_compress_torch`.
``weight``/``pe`` may have another dtype than ``x`` (fp32 masters with bf16 activations): they
are cast to x's dtype for the products, as the reference does, and get their gradients in their
own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fsa_train.kernels.ops.compress.windows import check_compress_args, compress_windows
from fsa_train.kernels.registry import kernel_op
from fsa_train.kernels.settings import KernelSettings
from fsa_train.kernels.triton_utils import locate_tile, sum_splits
from fsa_train.kernels.tuning import KernelTuner
from fsa_train.kernels.utils import KERNEL_DTYPES, as_int32, interpreting, rowmajor, search_steps
from fsa_train.kernels.varlen import compressed_lengths

__all__ = ["compress"]


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _row_windows(CU, CUC, r, n_docs, n_iter, stride):
    """For compressed rows ``r`` (a vector): whether each is a compressed token (not padding),
    and the global index (int64) of its window's first token.

    The document is the largest ``b`` with ``cu_c[b] <= r`` (empty documents share their start
    with the next one, so the largest is the one that owns ``r``).
    """
    lo = r * 0
    hi = lo + n_docs
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        ok = tl.load(CUC + mid) <= r
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    valid = r < tl.load(CUC + n_docs)
    start = tl.load(CU + lo).to(tl.int64) + (r - tl.load(CUC + lo)).to(tl.int64) * stride
    return valid, start


@triton.jit
def _load_window_tile(X, PE, start, j, valid, hd, sx_t, sx_h, kernel, d, offs_d, d_ok,
                      HAS_PE: tl.constexpr):
    """``x[start + j, hd] + pe[hd, j]`` in x's dtype ``[BLOCK_R, D]``; 0 for invalid rows."""
    ok = valid[:, None] & d_ok[None, :]
    xj = tl.load(X + (start + j)[:, None] * sx_t + hd * sx_h + offs_d[None, :], mask=ok, other=0.0)
    if HAS_PE:
        pej = tl.load(PE + (hd * kernel + j) * d + offs_d, mask=d_ok, other=0.0)
        pej = pej.to(xj.dtype).to(tl.float32)
        xj = tl.where(ok, xj.to(tl.float32) + pej[None, :], 0.0).to(X.dtype.element_ty)
    return xj


@triton.jit
def _load_w(W, hd, j, kernel, d, d_out, offs_d, offs_e, d_ok, e_ok, dtype):
    """``W[hd, j·d:(j+1)·d, :]`` ``[D, D_OUT]`` cast to ``dtype`` (x's), 0 past d / d_out."""
    base = W + hd.to(tl.int64) * kernel * d * d_out + j * d * d_out
    w = tl.load(base + offs_d[:, None] * d_out + offs_e[None, :],
                mask=d_ok[:, None] & e_ok[None, :], other=0.0)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["rows_out", "n_docs", "n_iter", "kernel", "stride"])
def _fwd_kernel(
    X, W, PE, OUT, CU, CUC,
    sx_t, sx_h, so_t, so_h, rows_out, n_docs, n_iter, kernel, stride, d, d_out,
    HAS_PE: tl.constexpr, D: tl.constexpr, D_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``out`` of BLOCK_R compressed rows of KV head ``program_id(1)``; padding rows get 0
    (their window tiles are 0)."""
    hd = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid, start = _row_windows(CU, CUC, r, n_docs, n_iter, stride)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, D_OUT)
    d_ok = offs_d < d
    e_ok = offs_e < d_out
    acc = tl.zeros([BLOCK_R, D_OUT], dtype=tl.float32)
    for j in range(kernel):
        xj = _load_window_tile(X, PE, start, j, valid, hd, sx_t, sx_h, kernel, d, offs_d, d_ok,
                               HAS_PE)
        wj = _load_w(W, hd, j, kernel, d, d_out, offs_d, offs_e, d_ok, e_ok, xj.dtype)
        acc = tl.dot(xj, wj, acc, input_precision=DOT_PREC)
    tl.store(OUT + r.to(tl.int64)[:, None] * so_t + hd * so_h + offs_e[None, :],
             acc.to(OUT.dtype.element_ty), mask=(r < rows_out)[:, None] & e_ok[None, :])


@triton.jit(do_not_specialize=["n_docs", "n_iter", "kernel", "stride"])
def _dw_kernel(
    X, PE, W, DOUT, DW, DPE, CU, CUC,
    sx_t, sx_h, sg_t, sg_h, s_split_w, s_split_pe, n_docs, n_iter, kernel, stride, d, d_out,
    HAS_PE: tl.constexpr, D: tl.constexpr, D_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``dW[hd, j·d:(j+1)·d]`` (and ``dpe[hd, j]``) from split ``program_id(1)`` of the
    compressed rows, for ``(hd, j) = divmod(program_id(0), kernel)``; partials are
    ``s_split_*`` apart."""
    hd = tl.program_id(0) // kernel
    j = tl.program_id(0) % kernel
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    n_rows = tl.load(CUC + n_docs)
    share = tl.cdiv(tl.cdiv(n_rows, BLOCK_R), n_split) * BLOCK_R
    r_lo = split * share
    r_hi = tl.minimum(r_lo + share, n_rows)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, D_OUT)
    d_ok = offs_d < d
    e_ok = offs_e < d_out
    acc = tl.zeros([D, D_OUT], dtype=tl.float32)
    g_sum = tl.zeros([D_OUT], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + offs_r
        # valid (r < n_rows) is the only mask needed: shares are whole tiles
        valid, start = _row_windows(CU, CUC, r, n_docs, n_iter, stride)
        xj = _load_window_tile(X, PE, start, j, valid, hd, sx_t, sx_h, kernel, d, offs_d, d_ok,
                               HAS_PE)
        # masked, not multiplied: the padding rows' gradient may hold anything (NaN included)
        g = tl.load(DOUT + r.to(tl.int64)[:, None] * sg_t + hd * sg_h + offs_e[None, :],
                    mask=valid[:, None] & e_ok[None, :], other=0.0).to(xj.dtype)
        acc = tl.dot(tl.trans(xj), g, acc, input_precision=DOT_PREC)
        if HAS_PE:
            g_sum += tl.sum(g.to(tl.float32), 0)
    dw = DW + split.to(tl.int64) * s_split_w + hd.to(tl.int64) * kernel * d * d_out
    dw += j * d * d_out + offs_d[:, None] * d_out + offs_e[None, :]
    tl.store(dw, acc.to(DW.dtype.element_ty), mask=d_ok[:, None] & e_ok[None, :])
    if HAS_PE:
        wj = _load_w(W, hd, j, kernel, d, d_out, offs_d, offs_e, d_ok, e_ok,
                     X.dtype.element_ty).to(tl.float32)
        dpe = tl.sum(wj * g_sum[None, :], 1)
        tl.store(DPE + split.to(tl.int64) * s_split_pe + (hd * kernel + j) * d + offs_d,
                 dpe.to(DPE.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["n_docs", "n_iter", "kernel", "stride"])
def _dx_kernel(
    DOUT, W, DX, CU, CUC,
    sg_t, sg_h, sdx_t, sdx_h, n_docs, n_iter, kernel, stride, d, d_out,
    D: tl.constexpr, D_OUT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """``dx`` of BLOCK_U groups of ``stride`` tokens of one document, KV head ``program_id(1)``."""
    hd = tl.program_id(1)
    doc, bos, seqlen, start = locate_tile(CU, tl.program_id(0), n_docs, n_iter,
                                          BLOCK_U * stride)
    if start >= seqlen:
        return
    bos_c = tl.load(CUC + doc)
    len_c = tl.load(CUC + doc + 1) - bos_c
    u = start // stride + tl.arange(0, BLOCK_U)
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, D_OUT)
    d_ok = offs_d < d
    e_ok = offs_e < d_out
    for q in range(stride):
        p = u * stride + q
        acc = tl.zeros([BLOCK_U, D], dtype=tl.float32)
        for a in range(kernel // stride):
            i = u - a
            ok = (i >= 0) & (i < len_c)
            g = tl.load(DOUT + (bos_c + i).to(tl.int64)[:, None] * sg_t + hd * sg_h
                        + offs_e[None, :], mask=ok[:, None] & e_ok[None, :], other=0.0)
            w = _load_w(W, hd, q + a * stride, kernel, d, d_out, offs_d, offs_e, d_ok, e_ok,
                        g.dtype)
            acc = tl.dot(g, tl.trans(w), acc, input_precision=DOT_PREC)
        tl.store(DX + (bos + p).to(tl.int64)[:, None] * sdx_t + hd * sdx_h + offs_d[None, :],
                 acc.to(DX.dtype.element_ty), mask=(p < seqlen)[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------

_KEY = ["D", "D_OUT", "DOT_PREC"]
_KEY_PE = [*_KEY, "HAS_PE"]
_FWD_CONFIGS = [
    triton.Config({"BLOCK_R": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 128}, num_warps=8, num_stages=3),
]
_DW_CONFIGS = [
    triton.Config({"BLOCK_R": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 128}, num_warps=8, num_stages=2),
]
_DX_CONFIGS = [
    triton.Config({"BLOCK_U": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_U": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_U": 16}, num_warps=4, num_stages=3),
]
# fp32 ("ieee" dots, a test path): small tiles that fit shared memory
_FWD_FP32 = {"BLOCK_R": 32, "num_warps": 4, "num_stages": 1}
_DW_FP32 = {"BLOCK_R": 32, "num_warps": 8, "num_stages": 1}
_DX_FP32 = {"BLOCK_U": 16, "num_warps": 4, "num_stages": 1}
# interpreter (CPU tests): small tiles so that tiny inputs span several tiles
_FWD_INTERP = {"BLOCK_R": 16}
_DW_INTERP = {"BLOCK_R": 16}
_DX_INTERP = {"BLOCK_U": 16}

# One tuner per kernel over all sizes (size_arg=None): the compress kernels were tuned this way
# from the start, and their choice barely depends on the token count.
_fwd_tuned = KernelTuner("compress.fwd", _fwd_kernel, _FWD_CONFIGS, _KEY_PE, size_arg=None,
                         fp32=_FWD_FP32, interpret=_FWD_INTERP)
_dw_tuned = KernelTuner("compress.dw", _dw_kernel, _DW_CONFIGS, _KEY_PE, size_arg=None,
                        fp32=_DW_FP32, interpret=_DW_INTERP)
_dx_tuned = KernelTuner("compress.dx", _dx_kernel, _DX_CONFIGS, _KEY, size_arg=None,
                        fp32=_DX_FP32, interpret=_DX_INTERP)


def _dw_splits(rows_out: int, programs: int) -> int:
    """Row splits of the dW kernel: about 512 programs (h·l alone is 128 for h=4, l=32), each
    with at least 256 rows, at most 16 splits; 1 under the interpreter (programs run serially)."""
    if interpreting():
        return 1
    return max(1, min(16, 512 // programs, rows_out // 256))


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _dims(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(h, d, d_out, D, D_OUT)``: the padded dims are powers of two >= 16 (``tl.dot``)."""
    _, h, d = x.shape
    d_out = weight.shape[2]
    return h, d, d_out, max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(d_out))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _n_iter(cu: torch.Tensor) -> int:
    return search_steps(cu.numel() - 1)


def _forward_fake(x, weight, pe, cu, cu_c, kernel, stride):
    return x.new_empty((x.shape[0] // stride, x.shape[1], weight.shape[-1]))


@kernel_op("compress_fwd", _forward_fake)
def _forward(x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None, cu: torch.Tensor,
             cu_c: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    total = x.shape[0]
    h, d, d_out, D, D_OUT = _dims(x, weight)
    rows_out = total // stride
    out = torch.empty((rows_out, h, d_out), dtype=x.dtype, device=x.device)
    if rows_out == 0:
        return out
    args = (
        x, weight, pe if pe is not None else weight, out, cu, cu_c,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        rows_out, cu.numel() - 1, _n_iter(cu), kernel, stride, d, d_out,
        pe is not None, D, D_OUT, _prec(x.dtype),
    )

    def grid(meta):
        return (triton.cdiv(rows_out, meta["BLOCK_R"]), h)

    _fwd_tuned.run(grid, args, dtype=x.dtype)
    return out


def _grad_weight_pe(dout, x, weight, pe, cu, cu_c, kernel: int, stride: int):
    """``(dW, dpe)`` in weight's and pe's dtypes (dpe None without pe)."""
    grads = _grad_weight_pe_kernel(dout, x, weight, pe, cu, cu_c, kernel, stride)
    return grads[0], grads[1] if pe is not None else None


def _grad_weight_pe_fake(dout, x, weight, pe, cu, cu_c, kernel, stride):
    return [torch.empty_like(weight)] + ([torch.empty_like(pe)] if pe is not None else [])


@kernel_op("compress_bwd_weight", _grad_weight_pe_fake)
def _grad_weight_pe_kernel(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           pe: torch.Tensor | None, cu: torch.Tensor, cu_c: torch.Tensor,
                           kernel: int, stride: int) -> list[torch.Tensor]:
    """``[dW]`` or ``[dW, dpe]`` (a custom op)."""
    h, d, d_out, D, D_OUT = _dims(x, weight)
    dw = torch.empty_like(weight)
    dpe = torch.empty_like(pe) if pe is not None else None
    n_split = _dw_splits(dout.shape[0], h * kernel)
    if n_split > 1:
        dw_out = torch.empty((n_split, *dw.shape), dtype=torch.float32, device=x.device)
        dpe_out = torch.empty((n_split, *pe.shape), dtype=torch.float32, device=x.device) \
            if pe is not None else dw_out
    else:
        dw_out = dw[None]
        dpe_out = dpe[None] if pe is not None else dw_out
    args = (
        x, pe if pe is not None else weight, weight, dout, dw_out, dpe_out, cu, cu_c,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1),
        dw_out.stride(0), dpe_out.stride(0), cu.numel() - 1, _n_iter(cu), kernel, stride,
        d, d_out, pe is not None, D, D_OUT, _prec(x.dtype),
    )
    _dw_tuned.run((h * kernel, n_split), args, dtype=x.dtype)
    if n_split > 1:
        sum_splits(dw_out, dw)
        if pe is not None:
            sum_splits(dpe_out, dpe)
    return [dw] if dpe is None else [dw, dpe]


def _grad_x_fake(dout, x, weight, cu, cu_c, kernel, stride):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@kernel_op("compress_bwd_x", _grad_x_fake)
def _grad_x(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cu: torch.Tensor,
            cu_c: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    total = x.shape[0]
    h, d, d_out, D, D_OUT = _dims(x, weight)
    dx = torch.empty((total, h, d), dtype=x.dtype, device=x.device)
    n_docs = cu.numel() - 1
    args = (
        dout, weight, dx, cu, cu_c, dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
        n_docs, _n_iter(cu), kernel, stride, d, d_out, D, D_OUT, _prec(x.dtype),
    )

    def grid(meta):
        return (total // (meta["BLOCK_U"] * stride) + n_docs, h)

    _dx_tuned.run(grid, args, dtype=x.dtype)
    return dx


class _Compress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, pe, cu, cu_c, kernel, stride):
        ctx.save_for_backward(x, weight, pe, cu, cu_c)
        ctx.params = (kernel, stride)
        return _forward(x, weight, pe, cu, cu_c, kernel, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, pe, cu, cu_c = ctx.saved_tensors
        kernel, stride = ctx.params
        need_x, need_w, need_pe = ctx.needs_input_grad[:3]
        dx = dw = dpe = None
        if dout.shape[0] == 0:  # fewer tokens than one stride: nothing depends on the inputs
            dx = torch.zeros_like(x) if need_x else None
            dw = torch.zeros_like(weight) if need_w else None
            dpe = torch.zeros_like(pe) if need_pe else None
            return dx, dw, dpe, None, None, None, None
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        if need_x:
            dx = _grad_x(dout, x, weight, cu, cu_c, kernel, stride)
        if need_w or need_pe:
            dw, dpe = _grad_weight_pe(dout, x, weight, pe, cu, cu_c, kernel, stride)
        return dx, dw if need_w else None, dpe if need_pe else None, None, None, None, None


def _compress_torch(
    x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor | None, cu_seqlens: torch.Tensor,
    cu_c: torch.Tensor, kernel: int, stride: int,
) -> torch.Tensor:
    """The same padded output from torch ops (gather + bmm), for dtypes ``tl.dot`` lacks (fp64)."""
    total = x.shape[0]
    rows_out = total // stride
    cu_c64 = cu_c.to(torch.int64)
    slot = torch.arange(rows_out, device=x.device)
    doc = torch.searchsorted(cu_c64[1:].contiguous(), slot, right=True)
    valid = doc < cu_c.numel() - 1
    doc = doc.clamp(max=cu_c.numel() - 2)
    start = cu_seqlens.to(torch.int64)[doc] + (slot - cu_c64[doc]) * stride
    rows = start[:, None] + torch.arange(kernel, device=x.device)[None, :]  # [rows_out, l]
    rows = torch.where(valid[:, None], rows, 0).clamp(max=max(total - 1, 0))
    out = compress_windows(x, weight, pe, rows)  # [rows_out, h, d_out]
    # where, not a product: the gradient of padding rows is dropped even if it is not finite.
    out = torch.where(valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=x.device))
    return out.contiguous()


def compress(x, weight, pe, cu_seqlens, kernel: int, stride: int, cu_seqlens_c=None, *,
             settings: KernelSettings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive op's contract (:mod:`.naive`), except that ``x_c`` has ``total // stride`` rows:
    the first ``cu_seqlens_c[-1]`` are the compressed tokens, the rest zeros whose gradients are
    dropped (a static size, no host synchronisation).

    ``x`` may have any token/head strides; fp16, bf16 and fp32 run the kernels, other dtypes the
    torch path. ``weight`` and ``pe`` may have another dtype than ``x``. The kernels have no
    switches in ``settings``.
    """
    check_compress_args(x, weight, pe, kernel, stride)
    kernel, stride = int(kernel), int(stride)
    cu_c = compressed_lengths(cu_seqlens, kernel, stride) if cu_seqlens_c is None \
        else cu_seqlens_c
    if x.dtype not in KERNEL_DTYPES:
        return _compress_torch(x, weight, pe, cu_seqlens, cu_c, kernel, stride), cu_c
    x = rowmajor(x)
    cu = as_int32(cu_seqlens)
    out = _Compress.apply(
        x, weight.contiguous(), pe.contiguous() if pe is not None else None, cu.contiguous(),
        cu_c, kernel, stride,
    )
    return out, cu_c
