"""The sync-free ``compress`` of the GPU path, and the whole NSA core with every Triton kernel
(Triton's interpreter on CPU) against the reference: outputs and all seven gradients."""

import importlib
from dataclasses import replace

import pytest
import torch
from fsa_testing import DEVICE, cu_seqlens

from fsa_train.config import NSAConfig
from fsa_train.kernels import OPS, CompressionParams, nsa_attention, reference, triton_impl
from fsa_train.kernels.settings import default_settings
from fsa_train.model.rope import Rotary

pytest.importorskip("triton")
compress_mod = importlib.import_module("fsa_train.kernels.ops.compress.triton")


def packed(lengths, h, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), h, d, generator=gen, dtype=torch.float64)
    return x.to(DEVICE, dtype), cu_seqlens(lengths)


@pytest.mark.parametrize("lengths", [[5], [40, 3, 29, 64], [16, 17, 1]])
@pytest.mark.parametrize("use_pe", [True, False])
def test_compress_matches_reference_and_pads_with_zeros(lengths, use_pe):
    kernel, stride, h, d = 8, 4, 2, 16
    x, cu = packed(lengths, h, d, torch.float64)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(h, kernel * d, d, generator=gen, dtype=torch.float64).to(DEVICE)
    pe = torch.randn(h, kernel, d, generator=gen, dtype=torch.float64).to(DEVICE) if use_pe \
        else None
    want, want_cu = reference.compress(x, weight, pe, cu, kernel, stride)
    got, got_cu = compress_mod.compress(x, weight, pe, cu, kernel, stride)
    assert torch.equal(got_cu, want_cu)
    n = int(want_cu[-1])
    assert got.shape == (sum(lengths) // stride, h, d)
    torch.testing.assert_close(got[:n], want, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(got[n:]) == 0


def test_compress_gradients_ignore_padding_rows():
    kernel, stride, h, d = 8, 4, 1, 16
    x, cu = packed([21, 10], h, d, torch.float64)
    x.requires_grad_()
    weight = torch.randn(h, kernel * d, d, dtype=torch.float64, device=DEVICE,
                         requires_grad=True)
    out, cu_c = compress_mod.compress(x, weight, None, cu, kernel, stride)
    n = int(cu_c[-1])
    grad = torch.randn_like(out)
    grad[n:] = float("nan")  # what an unwritten gradient row of a kernel could hold
    out.backward(grad)
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    x2 = x.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    ref, _ = reference.compress(x2, w2, None, cu, kernel, stride)
    ref.backward(grad[:n])
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


@pytest.mark.parametrize("group,selection,forced", [
    (1, "token", "sparse"), (4, "token", "sparse"), (1, "block", "sparse"),
    (4, "block", "sparse"), (2, "token", "dense"),
])
def test_nsa_core_on_triton_kernels_matches_reference(group, selection, forced, monkeypatch):
    """``forced="dense"``: the selected branch with its forced blocks as block-sparse tiles
    (``KernelSettings.selected_forced``), reached through the core's promise."""
    selected = importlib.import_module("fsa_train.kernels.ops.selected_attention.triton")
    splits = []
    split = selected._forced_split
    monkeypatch.setattr(selected, "_forced_split",
                        lambda *args: splits.append(args[-2:]) or split(*args))
    assert all(triton_impl(op) is not None for op in OPS)  # every op runs its GPU-path code
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16,
                    sel_topk=4 if forced == "dense" else 3, init_blocks=1,
                    local_blocks=2, window=24, selection=selection)
    settings = replace(default_settings(), selected_forced=forced)
    h, d = 2, 16
    lengths = [70, 9, 45]
    dtype = torch.float32
    q, cu = packed(lengths, h * group, d, dtype, seed=2)
    k, _ = packed(lengths, h, d, dtype, seed=3)
    v, _ = packed(lengths, h, d, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    total = sum(lengths)
    gates = torch.rand(total, h * group, 3, generator=gen).to(DEVICE, dtype)
    pooling = torch.eye(d).repeat(nsa.cmp_kernel, 1) / nsa.cmp_kernel
    w_k = (pooling + 0.1 * torch.randn(h, nsa.cmp_kernel * d, d, generator=gen)).to(DEVICE)
    w_v = (pooling + 0.1 * torch.randn(h, nsa.cmp_kernel * d, d, generator=gen)).to(DEVICE)
    pe = (0.1 * torch.randn(h, nsa.cmp_kernel, d, generator=gen)).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v, gates, w_k, w_v, pe)]
    rope = Rotary(d)
    grad_out = torch.randn(total, h * group, d, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        for leaf in leaves:
            leaf.grad = None
        out = nsa_attention(q, k, v, gates, CompressionParams(w_k, w_v, pe), cu, nsa, rope,
                            backend=backend, settings=settings)
        out.backward(grad_out)
        results[backend] = (out.detach(), [leaf.grad.detach().clone() for leaf in leaves])
    assert splits == ([(1, 2)] if forced == "dense" and selection == "token" else [])
    out_t, grads_t = results["triton"]
    out_r, grads_r = results["reference"]
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("q", "k", "v", "gates", "w_k", "w_v", "pe"), grads_t, grads_r,
                               strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("selection", ["token", "block"])
def test_nsa_core_on_triton_kernels_is_causal(selection):
    """Changing the key and value of token p (inside a compression window, a selection block and
    the sliding window of the rows after it) leaves every earlier output bit-identical. In block
    mode the earlier *blocks*: a query block's shared selection is scored by all of its tokens,
    so inside p's own block the selection (never a gradient, never a key) may depend on p
    (docs/nsa.md). ``sel_topk = 3`` leaves the selection a free choice."""
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, init_blocks=1,
                    local_blocks=1, window=8, selection=selection)
    h, group, d, total = 1, 2, 16, 72
    q, cu = packed([total], h * group, d, torch.float32, seed=2)
    k, _ = packed([total], h, d, torch.float32, seed=3)
    v, _ = packed([total], h, d, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    gates = torch.rand(total, h * group, 3, generator=gen).to(DEVICE)
    pooling = torch.eye(d).repeat(nsa.cmp_kernel, 1) / nsa.cmp_kernel
    params = CompressionParams(
        (pooling + 0.1 * torch.randn(h, nsa.cmp_kernel * d, d, generator=gen)).to(DEVICE),
        (pooling + 0.1 * torch.randn(h, nsa.cmp_kernel * d, d, generator=gen)).to(DEVICE),
        (0.1 * torch.randn(h, nsa.cmp_kernel, d, generator=gen)).to(DEVICE),
    )
    rope = Rotary(d)
    with torch.no_grad():
        base = nsa_attention(q, k, v, gates, params, cu, nsa, rope, backend="triton")
        for p in (7, 21, 35, 50, 63):
            k2, v2 = k.clone(), v.clone()
            k2[p] += 3.0
            v2[p] -= 3.0
            out = nsa_attention(q, k2, v2, gates, params, cu, nsa, rope, backend="triton")
            seen = p if selection == "token" else p - p % nsa.sel_block
            torch.testing.assert_close(out[:seen], base[:seen], rtol=0, atol=0, msg=f"p={p}")
            assert not torch.allclose(out[p:], base[p:]), p


def test_nsa_core_passes_the_partials_setting_to_the_selected_kernel(monkeypatch):
    """``nsa.selected_partials`` reaches the selected-attention kernels (the only place it acts)."""
    selected = importlib.import_module("fsa_train.kernels.ops.selected_attention.triton")
    seen = []
    real = selected.partial_dtype

    def recording(dtype, partials):
        seen.append(partials)
        return real(dtype, partials)

    monkeypatch.setattr(selected, "partial_dtype", recording)
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, window=24,
                    selected_partials="half")
    h, d, lengths = 1, 16, [40]
    q, cu = packed(lengths, 2 * h, d, torch.float16, seed=6)
    k, _ = packed(lengths, h, d, torch.float16, seed=7)
    v, _ = packed(lengths, h, d, torch.float16, seed=8)
    gates = torch.rand(40, 2 * h, 3).to(DEVICE, torch.float16)
    w = (torch.eye(d).repeat(nsa.cmp_kernel, 1) / nsa.cmp_kernel).expand(h, -1, -1)
    params = CompressionParams(w.to(DEVICE, torch.float16), w.to(DEVICE, torch.float16),
                               torch.zeros(h, nsa.cmp_kernel, d, device=DEVICE,
                                           dtype=torch.float16))
    out = nsa_attention(q, k, v, gates, params, cu, nsa, Rotary(d), backend="triton")
    assert torch.isfinite(out).all()
    assert seen and set(seen) == {"half"}
