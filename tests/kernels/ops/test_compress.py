"""The Triton ``compress`` (forward, dx, dW, dpe kernels) against the reference: Triton's
interpreter on CPU in fp32/fp16, real sizes in bf16/fp16 on the GPU (determinism, CUDA graphs)."""

import importlib

import pytest
import torch
from fsa_testing import DEVICE, cu_seqlens, rel_error

from fsa_train.kernels import reference

pytest.importorskip("triton")
compress_mod = importlib.import_module("fsa_train.kernels.ops.compress.triton")

# (document lengths, l, s) with l/s = 2, 1 and 4: odd lengths, documents shorter than l, lengths
# not divisible by s, documents spanning several tiles of the interpreter configs (16 rows,
# 16·s tokens)
GEOMETRIES = [
    ([40, 3, 29, 130, 17], 8, 4),
    ([70, 9, 45, 8], 8, 8),
    ([5, 90, 1, 33], 16, 4),
]


def make_inputs(lengths, kernel, h, d, seed=0, d_out=None, device=DEVICE):
    """fp64 ``x, weight, pe`` and int32 ``cu_seqlens``, weights scaled to O(1) outputs."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = cu_seqlens(lengths, device=device)
    x = torch.randn(total, h, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(h, kernel * d, d_out or d, generator=gen, dtype=torch.float64)
    weight /= (kernel * d) ** 0.5
    pe = 0.5 * torch.randn(h, kernel, d, generator=gen, dtype=torch.float64)
    return x.to(device), weight.to(device), pe.to(device), cu


def run(x, weight, pe, cu, kernel, stride, grad_fn):
    """Triton ``compress`` forward and the gradients of (x, weight, pe) for ``grad_fn(out, n)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, pe) if t is not None]
    x_, w_ = leaves[:2]
    pe_ = leaves[2] if pe is not None else None
    out, cu_c = compress_mod.compress(x_, w_, pe_, cu, kernel, stride)
    grads = torch.autograd.grad(out, leaves, grad_fn(out, int(cu_c[-1])))
    return out.detach(), cu_c, list(grads) + [None] * (3 - len(grads))


def reference_fp64(x, weight, pe, cu, kernel, stride, dout):
    """Reference output and gradients in fp64 (weight/pe rounded to x's dtype first, as the
    kernels use them) for the compressed rows' incoming gradient ``dout``."""
    leaves = [t.detach().to(x.dtype).double().requires_grad_() for t in (x, weight, pe)
              if t is not None]
    out, cu_c = reference.compress(*leaves[:2], leaves[2] if pe is not None else None, cu,
                                   kernel, stride)
    grads = torch.autograd.grad(out, leaves, dout.double()) if out.shape[0] else \
        [torch.zeros_like(t) for t in leaves]
    return out, cu_c, list(grads) + [None] * (3 - len(grads))


def padded_grad(out, n, seed=7):
    """A random incoming gradient whose padding rows hold NaN (they must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grad[n:] = float("nan")
    return grad


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("use_pe", [True, False])
@pytest.mark.parametrize(
    "dtype, param_dtype, tol",
    [(torch.float32, torch.float32, 1e-5), (torch.float16, torch.float16, 2e-3),
     (torch.float16, torch.float32, 2e-3)],
)
def test_matches_fp64_reference(geometry, use_pe, dtype, param_dtype, tol):
    lengths, kernel, stride = geometry
    h, d = 2, 16
    x64, w64, pe64, cu = make_inputs(lengths, kernel, h, d)
    x, weight = x64.to(dtype), w64.to(param_dtype)
    pe = pe64.to(param_dtype) if use_pe else None
    out, cu_c, grads = run(x, weight, pe, cu, kernel, stride, padded_grad)
    n = int(cu_c[-1])
    assert out.dtype == dtype and out.shape == (sum(lengths) // stride, h, d)
    assert torch.count_nonzero(out[n:]) == 0
    dout = padded_grad(out, n)[:n]
    want, want_cu, want_grads = reference_fp64(x, weight, pe, cu, kernel, stride, dout)
    assert torch.equal(cu_c, want_cu)
    assert rel_error(out[:n], want) <= tol
    for name, got, ref, leaf in zip(("x", "weight", "pe"), grads, want_grads, (x, weight, pe),
                                    strict=True):
        if leaf is None:
            continue
        assert got.dtype == leaf.dtype, name
        assert torch.isfinite(got).all(), name
        assert rel_error(got, ref) <= tol, name


def test_fp32_forward_equals_reference_in_fp32():
    lengths, kernel, stride = GEOMETRIES[0]
    x, weight, pe, cu = make_inputs(lengths, kernel, 2, 32, d_out=16)
    x, weight, pe = x.float(), weight.float(), pe.float()
    want, _ = reference.compress(x, weight, pe, cu, kernel, stride)
    got, _ = compress_mod.compress(x, weight, pe, cu, kernel, stride)
    torch.testing.assert_close(got[: want.shape[0]], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", [0, 7])
def test_fp16_adds_pe_rounded_to_x_dtype_like_the_reference(position):
    """With a weight that copies window position ``position``, the output is ``x + pe`` exactly:
    fp32 ``pe`` rounded to fp16 and added in fp16, as the reference does (bit for bit)."""
    lengths, kernel, stride = GEOMETRIES[0]
    h, d = 2, 16
    x, _, pe, cu = make_inputs(lengths, kernel, h, d)
    weight = torch.zeros(h, kernel * d, d, device=DEVICE)
    weight[:, position * d: (position + 1) * d] = torch.eye(d, device=DEVICE)
    x, pe = x.half(), pe.float()
    want, _ = reference.compress(x, weight, pe, cu, kernel, stride)
    got, _ = compress_mod.compress(x, weight, pe, cu, kernel, stride)
    assert torch.equal(got[: want.shape[0]], want)


def test_padding_gradient_is_ignored_exactly():
    lengths, kernel, stride = GEOMETRIES[0]
    x, weight, pe, cu = make_inputs(lengths, kernel, 2, 16)
    x, weight, pe = x.float(), weight.float(), pe.float()

    def zero_padding(out, n):
        grad = padded_grad(out, n)
        grad[n:] = 0.0
        return grad

    _, _, with_nan = run(x, weight, pe, cu, kernel, stride, padded_grad)
    _, _, with_zero = run(x, weight, pe, cu, kernel, stride, zero_padding)
    for got, want in zip(with_nan, with_zero, strict=True):
        assert torch.equal(got, want)


def test_row_splits_of_weight_gradient(monkeypatch):
    """Several row splits (fp32 partials + the reduction kernel) give the one-split gradients,
    also when they are stored in fp16."""
    lengths, kernel, stride = GEOMETRIES[0]
    x64, w64, pe64, cu = make_inputs(lengths, kernel, 2, 16, seed=3)
    for param_dtype in (torch.float32, torch.float16):
        x, weight, pe = x64.float(), w64.to(param_dtype), pe64.to(param_dtype)
        _, _, one = run(x, weight, pe, cu, kernel, stride, padded_grad)
        monkeypatch.setattr(compress_mod, "_dw_splits", lambda rows, programs: 3)
        _, _, split = run(x, weight, pe, cu, kernel, stride, padded_grad)
        monkeypatch.undo()
        assert torch.equal(one[0], split[0])  # dx does not depend on the splits
        for got, want in zip(split[1:], one[1:], strict=True):
            assert got.dtype == param_dtype
            # fp32 sums in another order (GPU: fused multiply-adds) differ by ~1e-6
            tol = 1e-5 if param_dtype == torch.float32 else 1e-3
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_strided_inputs_and_gradients_match_contiguous():
    lengths, kernel, stride = GEOMETRIES[2]
    h, d = 2, 16
    x, weight, pe, cu = make_inputs(lengths, kernel, h, d)
    x, weight, pe = x.float(), weight.float(), pe.float()
    # x as the middle third of a fused projection (token and head strides), weight transposed back
    fused = torch.randn(x.shape[0], h, 3 * d, device=DEVICE)
    fused[:, :, d: 2 * d] = x
    strided_x = fused[:, :, d: 2 * d]
    strided_w = weight.transpose(1, 2).contiguous().transpose(1, 2)
    # an incoming gradient with a token stride of 2 rows and another with a last-dim stride of 2
    grads = {}

    def big_rows(out, n):
        big = torch.zeros(out.shape[0], 2 * h, d, device=DEVICE)
        big[:, :h] = padded_grad(out, n)
        return big[:, :h]

    def big_cols(out, n):
        big = torch.zeros(*out.shape[:2], 2 * d, device=DEVICE)
        big[..., ::2] = padded_grad(out, n)
        return big[..., ::2]

    for name, xs, ws, grad_fn in [("contiguous", x, weight, padded_grad),
                                  ("strided", strided_x, strided_w, big_rows),
                                  ("last-dim", x.transpose(1, 2).contiguous().transpose(1, 2),
                                   weight, big_cols)]:
        assert name == "contiguous" or not xs.is_contiguous() or not ws.is_contiguous()
        grads[name] = run(xs, ws, pe, cu, kernel, stride, grad_fn)
    out, _, want = grads["contiguous"]
    for name in ("strided", "last-dim"):
        got_out, _, got = grads[name]
        assert torch.equal(got_out, out), name
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), name


@pytest.mark.parametrize("lengths", [[3], [7, 5, 2]])
def test_no_compressed_tokens(lengths):
    """Fewer tokens than one stride (no output row) or only documents shorter than l (padding
    rows only): zero output, zero gradients."""
    kernel, stride, h, d = 8, 4, 2, 16
    x, weight, pe, cu = make_inputs(lengths, kernel, h, d)
    out, cu_c, grads = run(x.float(), weight.float(), pe.float(), cu, kernel, stride,
                           padded_grad)
    assert int(cu_c[-1]) == 0 and out.shape == (sum(lengths) // stride, h, d)
    assert torch.count_nonzero(out) == 0
    for grad, leaf in zip(grads, (x, weight, pe), strict=True):
        assert grad.shape == leaf.shape and torch.count_nonzero(grad) == 0


def test_gradient_of_x_only():
    lengths, kernel, stride = GEOMETRIES[0]
    x, weight, pe, cu = make_inputs(lengths, kernel, 2, 16)
    x, weight, pe = x.float().requires_grad_(), weight.float(), pe.float()
    out, cu_c = compress_mod.compress(x, weight, pe, cu, kernel, stride)
    n = int(cu_c[-1])
    out.backward(padded_grad(out, n))
    want = reference_fp64(x, weight, pe, cu, kernel, stride, padded_grad(out, n)[:n])[2][0]
    assert rel_error(x.grad, want) <= 1e-5


# ------------------------------------------------------------------------------------------------
# GPU, real sizes
# ------------------------------------------------------------------------------------------------

GPU_SIZES = [[65536], [4096] * 16]
GPU_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
              (torch.bfloat16, torch.float32)]


def gpu_inputs(lengths, dtype, param_dtype, seed=0):
    x, weight, pe, cu = make_inputs(lengths, 32, 4, 128, seed=seed, device="cpu")
    return (x.to("cuda", dtype), weight.to("cuda", param_dtype), pe.to("cuda", param_dtype),
            cu.to("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", GPU_SIZES, ids=["1x65536", "16x4096"])
@pytest.mark.parametrize("dtype, param_dtype", GPU_DTYPES, ids=["bf16", "fp16", "bf16-fp32"])
def test_gpu_real_sizes_accurate_and_deterministic(lengths, dtype, param_dtype):
    kernel, stride = 32, 16
    x, weight, pe, cu = gpu_inputs(lengths, dtype, param_dtype)
    first = run(x, weight, pe, cu, kernel, stride, padded_grad)
    second = run(x, weight, pe, cu, kernel, stride, padded_grad)
    out, cu_c, grads = first
    assert torch.equal(out, second[0])
    for a, b in zip(grads, second[2], strict=True):
        assert torch.equal(a, b)
    n = int(cu_c[-1])
    assert out.shape == (sum(lengths) // stride, 4, 128)
    assert torch.count_nonzero(out[n:]) == 0
    want, _, want_grads = reference_fp64(x, weight, pe, cu, kernel, stride,
                                         padded_grad(out, n)[:n])
    assert rel_error(out[:n], want) <= 1e-2
    for name, got, ref, leaf in zip(("x", "weight", "pe"), grads, want_grads, (x, weight, pe),
                                    strict=True):
        assert got.dtype == leaf.dtype, name
        assert rel_error(got, ref) <= 1e-2, name


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    kernel, stride = 32, 16
    x, weight, pe, cu = gpu_inputs([4096] * 16, torch.bfloat16, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, weight, pe)]
    dout = torch.randn(x.shape[0] // stride, 4, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out, _ = compress_mod.compress(x, weight, pe, cu, kernel, stride)
        return (out, *torch.autograd.grad(out, leaves, dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: autotuning and compilation happen outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        with torch.no_grad():
            x.copy_(gpu_inputs([4096] * 16, torch.bfloat16, torch.bfloat16, seed=seed)[0])
        graph.replay()
        eager = step()
        for got, want in zip(captured, eager, strict=True):
            assert torch.equal(got, want)
