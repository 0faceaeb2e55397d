"""window_attention on the library kernels (cuDNN frontend, FlashAttention varlen) and the choice
between them and ours.

On CPU: settings validation, the one-line errors of an explicit library that cannot run, "auto"
keeping our kernel, and the plan-shape rounding of the cuDNN path. On the GPU (marker ``gpu``):
each library path against the fp32 reference at real sizes (outputs and gradients, packed odd
lengths, G 1-16, d 64/128, fp16/bf16, dense and windowed), determinism, and "auto".
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
from fsa_testing import DEVICE, packed_qkv, rel_error

from fsa_train.kernels import reference
from fsa_train.kernels.libraries import CUDNN_SDPA_MISSING, FLASH_ATTN_4_MISSING
from fsa_train.kernels.ops.window_attention import backends, cudnn, fa4, flash
from fsa_train.kernels.settings import KernelSettings, default_settings

LIBRARIES = ("cudnn", "flash", "fa4")


def _settings(kernel: str, **changes) -> KernelSettings:
    return replace(default_settings(), window_kernel=kernel, **changes)


def _triton_op():
    pytest.importorskip("triton")
    from fsa_train.kernels.ops.window_attention import triton as wa

    return wa


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------


def test_settings_name_the_kernels():
    for kernel in ("auto", "triton", "cudnn", "flash", "fa4"):
        assert KernelSettings(window_kernel=kernel).window_kernel == kernel
    assert KernelSettings.from_env({"FSA_WINDOW_KERNEL": "cudnn"}).window_kernel == "cudnn"
    with pytest.raises(ValueError, match="FSA_WINDOW_KERNEL must be one of"):
        KernelSettings(window_kernel="fa3")


def test_every_shape_class_ends_with_our_kernel():
    for order in (*backends.AUTO_ORDER.values(), backends.DETERMINISTIC_ORDER):
        assert order[-1] == "triton"
        assert set(order) <= {"triton", *backends.LIBRARY_KERNELS}
    assert backends.shape_class(None, 100, 4) == "dense"
    assert backends.shape_class(100, 100, 1) == "dense"
    assert backends.shape_class(99, 100, 1) == "window, G < 4"
    assert backends.shape_class(99, 100, 4) == "window, G >= 4"
    assert {backends.shape_class(w, 100, g) for w in (None, 9) for g in (1, 16)} == \
        set(backends.AUTO_ORDER)


def test_auto_keeps_our_kernel_off_the_gpu():
    q, k, _, _, _ = packed_qkv([5, 3], 2, 2, 16, torch.float32, seed=0, device="cpu")
    for window in (None, 4):
        assert backends.kernel_for(_settings("auto"), q, k, window) == "triton"
    assert backends.kernel_for(_settings("cudnn"), q, k, None) == "cudnn"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only messages")
def test_library_paths_refuse_cpu_inputs_in_one_line():
    q, k, v, _, cu = packed_qkv([5, 3], 2, 2, 16, torch.float16, seed=0, device="cpu")
    assert cudnn.unsupported(q, k, None) == CUDNN_SDPA_MISSING
    assert "pip install 'fsa-train[gpu]'" in CUDNN_SDPA_MISSING
    reason = flash.unsupported(q, k, None)
    assert reason is not None and reason.startswith("window_kernel='flash' needs")
    assert fa4.unsupported(q, k, None) == FLASH_ATTN_4_MISSING
    assert "pip install 'fsa-train[fa4]'" in FLASH_ATTN_4_MISSING
    for module in (cudnn, flash, fa4):
        with pytest.raises(ValueError) as error:
            module.window_attention(q, k, v, cu)
        assert "\n" not in str(error.value)
        assert str(error.value) == module.unsupported(q, k, None)


def test_explicit_library_on_the_interpreter_is_a_one_line_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter path")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wa = _triton_op()
    q, k, v, _, cu = packed_qkv([5, 3], 2, 2, 16, torch.float16, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"^window_kernel='cudnn' needs nvidia-cudnn-frontend"):
        wa.window_attention(q, k, v, cu, settings=_settings("cudnn"))
    with pytest.raises(ValueError, match=r"^window_kernel='flash' needs"):
        wa.window_attention(q, k, v, cu, settings=_settings("flash"))
    with pytest.raises(ValueError, match=r"^window_kernel='fa4' needs flash-attn-4"):
        wa.window_attention(q, k, v, cu, settings=_settings("fa4"))
    with pytest.raises(ValueError, match="window must be a positive integer"):
        wa.window_attention(q, k, v, cu, 0, settings=_settings("cudnn"))


def test_fa4_window_size_is_flash_attentions_left_right():
    """A window of W keys is FlashAttention's ``(W - 1, 0)``; dense (or a window covering the
    longest document) is no window, which FA4 reads as plain causal."""
    assert fa4.window_size(512, 4096) == (511, 0)
    assert fa4.window_size(1, 4096) == (0, 0)  # the query's own key only
    assert fa4.window_size(None, 4096) == (None, None)
    assert fa4.window_size(4096, 4096) == (None, None)


def test_fa4_is_named_but_never_chosen_by_auto_until_measured():
    assert "fa4" in backends.LIBRARY_KERNELS
    assert all("fa4" not in order for order in backends.AUTO_ORDER.values())


def test_library_attention_routes_options_and_gradients():
    """The autograd function the library paths share: the forward op gets the options but the
    last (the backward's order), the backward op all of them, the gradients reach q, k, v, and
    the backward node carries the path's name (the memory benchmark's rows)."""
    from fsa_train.kernels.ops.window_attention.library import library_attention

    calls = []

    def forward(q, k, v, cu, scale):
        calls.append(("fwd", scale))
        return q * scale, q.sum(-1)

    def backward(do, q, k, v, o, lse, cu, scale, deterministic):
        calls.append(("bwd", scale, deterministic))
        return do * scale, torch.ones_like(k), torch.full_like(v, 3.0)

    attention = library_attention("_ProbeWindowAttention", forward, backward)
    q, k, v = (torch.randn(5, h, 4, requires_grad=True) for h in (2, 1, 1))
    o = attention.apply(q, k, v, torch.tensor([0, 5]), 2.0, True)
    assert type(o.grad_fn).__name__ == "_ProbeWindowAttentionBackward"
    o.sum().backward()
    assert calls == [("fwd", 2.0), ("bwd", 2.0, True)]
    assert torch.equal(q.grad, torch.full_like(q, 2.0))
    assert torch.equal(k.grad, torch.ones_like(k)) and torch.equal(v.grad, torch.full_like(v, 3.0))


def test_longest_document_from_the_caller_or_the_boundaries():
    from fsa_train.kernels.utils import longest_document

    cu = torch.tensor([0, 5, 12, 13])
    assert longest_document(cu, 13, None) == 7
    assert longest_document(cu, 13, 9) == 9
    assert longest_document(cu, 13, 99) == 13  # never past the batch
    assert longest_document(torch.tensor([0]), 0, None) == 1


def test_plan_shape_rounds_documents_and_length_up():
    cu = torch.tensor([0, 5, 12, 13], dtype=torch.int64)
    padded, longest = cudnn.plan_shape(cu, 13, None)
    assert padded.dtype == torch.int32
    assert padded.tolist() == [0, 5, 12, 13, 13]  # 3 documents -> 4, the extra one empty
    assert longest == 8  # longest document 7 -> 8
    padded, longest = cudnn.plan_shape(cu, 13, 7)
    assert longest == 8
    _, longest = cudnn.plan_shape(torch.tensor([0, 13]), 13, None)
    assert longest == 13  # never past the batch
    padded, longest = cudnn.plan_shape(torch.tensor([0, 4, 8], dtype=torch.int32), 8, 4)
    assert padded.tolist() == [0, 4, 8] and longest == 4
    assert [cudnn.power_of_two_at_least(n) for n in (0, 1, 2, 3, 4, 5, 1000)] == \
        [1, 1, 2, 4, 4, 8, 1024]


# ------------------------------------------------------------------------------------------------
# GPU: real sizes against the reference
# ------------------------------------------------------------------------------------------------

GPU_PACKED = [1, 100, 4096, 777, 2048, 129, 1000]  # 8151 tokens, 7 documents (plan: 8)


def _library_or_skip(kernel: str, q, k, window):
    reason = backends.LIBRARY_KERNELS[kernel].unsupported(q, k, window)
    if reason is not None:
        pytest.skip(reason)


def _grads(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", LIBRARIES)
@pytest.mark.parametrize(
    "dtype,G,d,window,lengths",
    [
        (torch.bfloat16, 1, 128, None, GPU_PACKED),
        (torch.bfloat16, 4, 128, 512, GPU_PACKED),
        (torch.bfloat16, 16, 128, None, GPU_PACKED),
        (torch.bfloat16, 16, 128, 512, GPU_PACKED),
        (torch.float16, 4, 128, None, GPU_PACKED),
        (torch.float16, 2, 64, 1, GPU_PACKED),
        (torch.bfloat16, 4, 64, 100, GPU_PACKED),
        (torch.bfloat16, 4, 128, None, [16384]),
        (torch.bfloat16, 4, 128, 512, [4096] * 4),
    ],
)
def test_gpu_library_matches_reference(kernel, dtype, G, d, window, lengths):
    h = 4 if G <= 4 else 2
    q, k, v, do, cu = packed_qkv(lengths, h, G, d, dtype, seed=G + d, q_scale=4.0)
    _library_or_skip(kernel, q, k, window)
    wa = _triton_op()
    settings = _settings(kernel)
    got = _grads(lambda q, k, v: wa.window_attention(q, k, v, cu, window, None, max(lengths),
                                                     settings=settings), q, k, v, do)
    want = _grads(lambda q, k, v: reference.window_attention(q, k, v, cu, window),
                  q.float(), k.float(), v.float(), do.float())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = rel_error(a, b, rms_floor=True)
        assert err <= 1e-2, (kernel, name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", LIBRARIES)
def test_gpu_library_without_max_seqlen_and_strided_views(kernel):
    """``max_seqlen`` unknown (read from cu_seqlens) and q, k, v as views of one fused
    projection, as the model makes them."""
    h, G, d = 2, 4, 128
    lengths = [3, 3000, 61, 1]
    total, H = sum(lengths), h * G
    g = torch.Generator(device="cpu").manual_seed(3)
    qkv = torch.randn(total, H + 2 * h, d, generator=g).to(DEVICE, torch.bfloat16)
    q, k, v = qkv[:, :H], qkv[:, H:H + h], qkv[:, H + h:]
    do = torch.randn(total, H, d, generator=g).to(DEVICE, torch.bfloat16)
    cu = torch.tensor([0, 3, 3003, 3064, 3065], device=DEVICE)  # int64
    _library_or_skip(kernel, q, k, 256)
    wa = _triton_op()
    settings = _settings(kernel)
    got = _grads(lambda q, k, v: wa.window_attention(q, k, v, cu, 256, settings=settings),
                 q, k, v, do)
    want = _grads(lambda q, k, v: reference.window_attention(q, k, v, cu, 256),
                  q.float(), k.float(), v.float(), do.float())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert rel_error(a, b, rms_floor=True) <= 1e-2, (kernel, name)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_cudnn_backward_is_deterministic_when_asked(window):
    q, k, v, do, cu = packed_qkv(GPU_PACKED, 4, 4, 128, torch.bfloat16, seed=9)
    _library_or_skip("cudnn", q, k, window)
    wa = _triton_op()
    settings = _settings("cudnn")

    def run(q, k, v):
        return wa.window_attention(q, k, v, cu, window, None, 4096, settings=settings)

    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(run, q, k, v, do), _grads(run, q, k, v, do)
        assert backends.kernel_for(_settings("auto"), q, k, window) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, second, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_auto_runs_whatever_is_installed():
    q, k, v, do, cu = packed_qkv(GPU_PACKED, 4, 4, 128, torch.bfloat16, seed=5)
    wa = _triton_op()
    for window in (None, 512):
        kernel = backends.kernel_for(_settings("auto"), q, k, window)
        assert kernel in backends.AUTO_ORDER[backends.shape_class(window, q.shape[0], 4)]
        got = _grads(partial(wa.window_attention, cu_seqlens=cu, window=window,
                             settings=_settings("auto")), q, k, v, do)
        want = _grads(partial(reference.window_attention, cu_seqlens=cu, window=window),
                      q.float(), k.float(), v.float(), do.float())
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
            assert rel_error(a, b, rms_floor=True) <= 1e-2, (kernel, name)
