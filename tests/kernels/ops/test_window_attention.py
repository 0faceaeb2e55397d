"""window_attention Triton kernel against the pure-PyTorch reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set here, before the kernel module is
imported) on tiny fp32/fp16 shapes; bf16 is tested on the GPU only (the interpreter computes bf16
wrongly). The GPU tests (marker ``gpu``) use real sizes: packed batches, a 64K-token document,
large logits, determinism and CUDA-graph capture.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch
from fsa_testing import DEVICE, rel_error
from fsa_testing import cu_seqlens as _cu

pytest.importorskip("triton")

from fsa_train.kernels import reference  # noqa: E402
from fsa_train.kernels.ops.window_attention import triton as wa  # noqa: E402
from fsa_train.kernels.registry import REGISTRY  # noqa: E402
from fsa_train.kernels.settings import default_settings  # noqa: E402

_rel = partial(rel_error, rms_floor=True)
"""Relative L2 error; the reference norm is floored at an RMS of 1 (exact-zero references)."""


_TRITON = replace(default_settings(), window_kernel="triton")
"""Our kernel, whatever "auto" would pick (the library paths: test_window_attention_libraries)."""


def _bwd(mode: str):
    """Our kernel with backward schedule ``mode``."""
    return replace(_TRITON, window_bwd=mode)


def _run(fn, q, k, v, cu, window, do, **options):
    if fn is wa.window_attention:
        options.setdefault("settings", _TRITON)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, cu, window, **options)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


def _reference(q, k, v, cu, window, do, dtype=torch.float64):
    return _run(
        reference.window_attention, q.to(dtype), k.to(dtype), v.to(dtype), cu, window, do.to(dtype)
    )


def _inputs(lengths, H, h, d, dtype, seed, q_scale=1.0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = (rnd(total, H, d) * q_scale).to(dtype)
    return q, rnd(total, h, d), rnd(total, h, d), rnd(total, H, d)


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes against the reference
# ------------------------------------------------------------------------------------------------

PACKED = [37, 1, 100, 20, 64]  # odd lengths, one token, tile multiples (interpreter tiles: 32, 16)

CASES = [
    # (H, h, d, window, dtype, q_scale)
    (2, 2, 16, None, torch.float32, 1.0),  # G = 1, dense
    (4, 2, 16, 1, torch.float32, 1.0),  # G = 2, only itself
    (3, 1, 16, 45, torch.float32, 1.0),  # G = 3, window between one tile and a document
    (4, 1, 16, 200, torch.float32, 1.0),  # G = 4, window longer than every document
    (8, 1, 16, 16, torch.float32, 1.0),  # G = 8, window = one interpreter tile
    (16, 1, 16, None, torch.float32, 1.0),  # G = 16
    (4, 2, 32, None, torch.float16, 8.0),  # fp16, large logits
    (8, 2, 32, 9, torch.float16, 8.0),  # fp16, large logits, window
]


@pytest.mark.parametrize("H,h,d,window,dtype,q_scale", CASES)
def test_matches_reference(H, h, d, window, dtype, q_scale):
    q, k, v, do = _inputs(PACKED, H, h, d, dtype, seed=H * 31 + d, q_scale=q_scale)
    cu = _cu(PACKED)
    ours = _run(wa.window_attention, q, k, v, cu, window, do)
    ref = _reference(q, k, v, cu, window, do)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol, (name, _rel(a, b))


def test_lse_and_output_of_single_key():
    lengths = [19, 40]
    q, k, v, _ = _inputs(lengths, 4, 2, 16, torch.float32, seed=3)
    cu = _cu(lengths)
    o, lse = wa.window_attention_with_lse(q, k, v, cu, window=5)
    assert lse.shape == (4, sum(lengths)) and lse.dtype == torch.float32
    # natural-log LSE from dense per-document scores
    scale = 1 / math.sqrt(16)
    expected = torch.empty(4, sum(lengths), dtype=torch.float64)
    for b0, b1 in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        t = torch.arange(b1 - b0)
        mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - 5)
        for j in range(4):
            s = q[b0:b1, j].double() @ k[b0:b1, j // 2].double().T * scale
            expected[j, b0:b1] = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    assert torch.allclose(lse.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    # window 1: each query sees only its own key, so o = v exactly (up to the division)
    o1 = wa.window_attention(q, k, v, cu, window=1)
    assert torch.allclose(o1, v.repeat_interleave(2, dim=1), atol=1e-6)


def test_non_contiguous_inputs_and_grad_output():
    lengths = [21, 3, 40]
    total, H, h, d = sum(lengths), 4, 2, 16
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(total, H + 2 * h, d, generator=g).to(DEVICE)  # a fused qkv projection
    q, v = fused[:, :H], fused[:, H + h :]
    k = torch.randn(total, d, h, generator=g).to(DEVICE).transpose(1, 2)  # last dim strided
    do = torch.randn(total, 2 * H, d, generator=g).to(DEVICE)[:, ::2]  # strided heads
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    cu = _cu(lengths)
    for window in (None, 6):
        ours = _run(wa.window_attention, q, k, v, cu, window, do)
        ref = _reference(q, k, v, cu, window, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
            assert _rel(a, b) <= 1e-5, (name, window, _rel(a, b))


def test_many_documents_empty_ones_and_int64_offsets():
    lengths = [0, 5, 0, 40, 1, 17, 33, 2, 0, 64, 9, 0]
    q, k, v, do = _inputs(lengths, 2, 1, 16, torch.float32, seed=11)
    cu = _cu(lengths, dtype=torch.int64)
    for window in (None, 3):
        ours = _run(wa.window_attention, q, k, v, cu, window, do)
        ref = _reference(q, k, v, cu, window, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
            assert _rel(a, b) <= 1e-5, (name, window, _rel(a, b))


@pytest.mark.parametrize("mode", ["split", "atomic"])
def test_backward_modes(mode):
    q, k, v, do = _inputs(PACKED, 4, 2, 16, torch.float32, seed=2)
    cu = _cu(PACKED)
    fused = _run(wa.window_attention, q, k, v, cu, 40, do)
    other = _run(wa.window_attention, q, k, v, cu, 40, do, settings=_bwd(mode))
    ref = _reference(q, k, v, cu, 40, do)
    for name, a, b, r in zip(("o", "dq", "dk", "dv"), fused, other, ref, strict=True):
        assert _rel(b, r) <= 1e-5, (name, _rel(b, r))
        if mode == "split" or name != "dq":  # the same arithmetic in the same order
            assert torch.equal(a, b), name


def test_dispatch_and_validation():
    q, k, v, _ = _inputs([9], 4, 2, 16, torch.float32, seed=1)
    cu = _cu([9])
    op = REGISTRY["window_attention"]
    assert op.resolve("triton", q, (q, k, v, cu), {}) is wa.window_attention
    with pytest.raises(ValueError):
        wa.window_attention(q, k, v, cu, window=0)
    with pytest.raises(ValueError):
        wa.window_attention(q, k[:, :1].expand(9, 3, 16), v[:, :1].expand(9, 3, 16), cu)
    with pytest.raises(ValueError):
        wa.window_attention(q[..., :12], k[..., :12], v[..., :12], cu)


# ------------------------------------------------------------------------------------------------
# GPU only: real sizes
# ------------------------------------------------------------------------------------------------

GPU_PACKED = [1, 100, 4096, 777, 2048, 129, 1000]  # 8151 tokens


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,G,d,window",
    [
        (torch.bfloat16, 1, 128, None),
        (torch.bfloat16, 4, 128, 512),
        (torch.bfloat16, 16, 128, None),
        (torch.bfloat16, 8, 128, 100),
        (torch.float16, 4, 128, None),
        (torch.float16, 2, 64, 1),
        (torch.bfloat16, 4, 64, 512),
    ],
)
def test_gpu_packed_large_logits(dtype, G, d, window):
    h = 4 if G <= 4 else 2
    q, k, v, do = _inputs(GPU_PACKED, G * h, h, d, dtype, seed=G + d, q_scale=8.0)
    cu = _cu(GPU_PACKED)
    ours = _run(wa.window_attention, q, k, v, cu, window, do)
    ref = _reference(q, k, v, cu, window, do, dtype=torch.float32)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert _rel(a, b) <= 1e-2, (name, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["split", "atomic"])
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_backward_modes(mode, window):
    q, k, v, do = _inputs(GPU_PACKED, 16, 4, 128, torch.bfloat16, seed=13, q_scale=8.0)
    cu = _cu(GPU_PACKED)
    ours = _run(wa.window_attention, q, k, v, cu, window, do, settings=_bwd(mode))
    ref = _reference(q, k, v, cu, window, do, dtype=torch.float32)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 1e-2, (name, _rel(a, b))


@pytest.mark.gpu
def test_gpu_64k_document_dense():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, H, h, d = 65536, 8, 2, 128
    q, k, v, do = _inputs([n], H, h, d, torch.bfloat16, seed=7)
    cu = _cu([n])
    ours = _run(wa.window_attention, q, k, v, cu, None, do)

    def sdpa(q, k, v, cu, window):  # fp32, all heads expanded: [1, H, n, d]
        kk, vv = (x.repeat_interleave(H // h, dim=1) for x in (k, v))
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, kk, vv))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return o.squeeze(0).transpose(0, 1)

    ref = _run(sdpa, q.float(), k.float(), v.float(), cu, None, do.float())
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 1e-2, (name, _rel(a, b))


@pytest.mark.gpu
def test_gpu_64k_document_window():
    n, H, h, d = 65536, 8, 2, 128
    q, k, v, do = _inputs([n], H, h, d, torch.bfloat16, seed=8, q_scale=4.0)
    cu = _cu([n])
    ours = _run(wa.window_attention, q, k, v, cu, 512, do)
    ref = _reference(q, k, v, cu, 512, do, dtype=torch.float32)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 1e-2, (name, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 256])
def test_gpu_deterministic(window):
    fused = _bwd("fused")  # "atomic" adds dq in a varying order
    q, k, v, do = _inputs(GPU_PACKED, 16, 4, 128, torch.bfloat16, seed=9)
    cu = _cu(GPU_PACKED)
    first = _run(wa.window_attention, q, k, v, cu, window, do, settings=fused)
    second = _run(wa.window_attention, q, k, v, cu, window, do, settings=fused)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "atomic"])
def test_gpu_cuda_graph_capture_and_replay(mode):
    settings = _bwd(mode)
    lengths = [3000, 1, 5000, 192]
    H, h, d = 8, 2, 128
    q, k, v, do = _inputs(lengths, H, h, d, torch.bfloat16, seed=10)
    cu = _cu(lengths)
    sq, sk, sv = (x.clone().requires_grad_() for x in (q, k, v))
    sdo, scu = do.clone(), cu.clone()

    def step():
        o = wa.window_attention(sq, sk, sv, scu, 700, settings=settings)
        return (o, *torch.autograd.grad(o, (sq, sk, sv), sdo))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and autotune outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    # new values and new document boundaries (same count), read on the device at replay
    new_lengths = [10, 4000, 4000, 183]
    q2, k2, v2, do2 = _inputs(new_lengths, H, h, d, torch.bfloat16, seed=12)
    cu2 = _cu(new_lengths)
    with torch.no_grad():
        for static, new in ((sq, q2), (sk, k2), (sv, v2), (sdo, do2), (scu, cu2)):
            static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = _run(wa.window_attention, q2, k2, v2, cu2, 700, do2, settings=settings)
    for name, a, b in zip(("o", "dq", "dk", "dv"), static_out, eager, strict=True):
        if mode == "atomic" and name == "dq":
            assert _rel(a, b) <= 1e-3, name
        else:
            assert torch.equal(a, b), name
