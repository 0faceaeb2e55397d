"""The fused RoPE kernel (fsa_train/kernels/ops/rope/triton.py) against Rotary's torch path.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) in fp32 and fp16
(the interpreter computes bf16 wrongly); bf16 at a real size (64K tokens) is tested on the GPU
only.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from fsa_testing import CUDA, DEVICE, cu_seqlens, rel_error

from fsa_train.config import NSAConfig
from fsa_train.kernels import CompressionParams, nsa_attention
from fsa_train.kernels.varlen import document_positions
from fsa_train.model.rope import Rotary

pytest.importorskip("triton")
rope_mod = importlib.import_module("fsa_train.kernels.ops.rope.triton")

LENGTHS = [20, 1, 16]  # 37 tokens: several interpreter tiles, a one-token document
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def _x(n: int, heads: int, d: int, dtype: torch.dtype, strided: bool, seed: int = 0):
    """``[n, heads, d]``, contiguous or a transposed, every-other-column view of a larger one."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(heads, n, 2 * d, generator=g).to(DEVICE, dtype).transpose(0, 1)[..., ::2]
        assert not x.is_contiguous() and x.stride(-1) == 2
        return x
    return torch.randn(n, heads, d, generator=g).to(DEVICE, dtype)


def _value_and_grad(fn, x: torch.Tensor, positions: torch.Tensor, dy: torch.Tensor):
    x = x.detach().requires_grad_()
    y = fn(x, positions)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "d"), [(3, 16), (3, 64), (10, 64)])  # 10: two head blocks
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_matches_torch_path(dtype, heads, d, strided):
    n = sum(LENGTHS)
    rotary = Rotary(d)
    x = _x(n, heads, d, dtype, strided)
    dy = _x(n, heads, d, dtype, strided=not strided, seed=1)
    positions = document_positions(cu_seqlens(LENGTHS), n)
    y, dx = _value_and_grad(lambda t, p: rope_mod.rope(t, p, d, rotary.base, n), x, positions, dy)
    y_ref, dx_ref = _value_and_grad(rotary._torch_forward, x, positions, dy)
    assert y.dtype == dtype and dx.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    assert rel_error(y, x) > 0.1  # positions > 0 do rotate


def test_positions_up_to_the_bound():
    """Compressed-key style: positions ``i·stride`` far past the token count, bound given."""
    n, heads, d, stride = 37, 2, 16, 4
    rotary = Rotary(d, base=500.0)
    x = _x(n, heads, d, torch.float32, strided=False)
    positions = torch.arange(n, device=DEVICE) * stride
    positions[-1] = 4 * n - 1  # the largest position the bound allows
    got = rope_mod.rope(x, positions, d, rotary.base, max_position=4 * n)
    torch.testing.assert_close(got, rotary._torch_forward(x, positions), **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient")
def test_backward_is_the_adjoint_and_passes_gradcheck():
    n, heads, d = 5, 2, 8
    x = _x(n, heads, d, torch.float32, strided=True).requires_grad_()
    positions = torch.tensor([0, 3, 1, 7, 2], device=DEVICE)
    dy = _x(n, heads, d, torch.float32, strided=False, seed=1)
    y = rope_mod.rope(x, positions, d, 10000.0, 8)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close((y * dy).sum(), (x * dx).sum(), rtol=1e-5, atol=1e-5)
    assert torch.autograd.gradcheck(
        lambda t: rope_mod.rope(t, positions, d, 10000.0, 8), (x,), eps=1e-2, atol=1e-3,
        rtol=1e-3, fast_mode=True,
    )


def test_table_grows_and_matches_the_fp64_angles(monkeypatch):
    monkeypatch.setattr(rope_mod, "_TABLES", {})
    d, base = 16, 10000.0
    cos, sin = rope_mod.rope_table(DEVICE, d, base, 10)
    assert cos.shape == sin.shape == (16, d // 2) and cos.dtype == torch.float32
    assert rope_mod.rope_table(DEVICE, d, base, 16)[0] is cos  # cached, no regrowth
    cos2, sin2 = rope_mod.rope_table(DEVICE, d, base, 100)
    assert cos2.shape[0] == 128
    torch.testing.assert_close(cos2[:16], cos, rtol=0, atol=0)
    angles = torch.arange(128, dtype=torch.float64)[:, None] * base ** (
        -torch.arange(0, d, 2, dtype=torch.float64) / d
    )
    torch.testing.assert_close(cos2.cpu(), angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin2.cpu(), angles.sin().float(), rtol=0, atol=0)


def test_a_larger_bound_regrows_the_table_for_the_kernel(monkeypatch):
    monkeypatch.setattr(rope_mod, "_TABLES", {})
    n, heads, d = 37, 1, 16
    rotary = Rotary(d)
    x = _x(n, heads, d, torch.float32, strided=False)
    small = torch.arange(n, device=DEVICE) % 8
    rope_mod.rope(x, small, d, rotary.base, 8)
    large = torch.arange(n, device=DEVICE) * 8  # up to 288: past the 8-row table
    got = rope_mod.rope(x, large, d, rotary.base, 8 * n)
    torch.testing.assert_close(got, rotary._torch_forward(x, large), **TOL[torch.float32])


def test_positions_outside_the_table_are_clamped_not_read_out_of_bounds(monkeypatch):
    monkeypatch.setattr(rope_mod, "_TABLES", {})
    d = 16
    rotary = Rotary(d)
    x = _x(3, 2, d, torch.float32, strided=False)
    got = rope_mod.rope(x, torch.tensor([-3, 5, 1000], device=DEVICE), d, rotary.base, 8)
    want = rotary._torch_forward(x, torch.tensor([0, 5, 7], device=DEVICE))
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_rotary_dispatch():
    """The kernel on CUDA (or with interpret=True here), the torch ops otherwise and for fp64."""
    n, d = 37, 16
    positions = document_positions(cu_seqlens(LENGTHS), n)
    x = _x(n, 2, d, torch.float32, strided=False).requires_grad_()
    kernel = Rotary(d, interpret=True)(x, positions)  # default bound: n
    assert kernel.grad_fn.name() == "RopeFunctionBackward"
    torch.testing.assert_close(kernel, Rotary(d)._torch_forward(x, positions),
                               **TOL[torch.float32])
    if not CUDA:
        assert Rotary(d)(x, positions).grad_fn.name() != "RopeFunctionBackward"
    x64 = x.detach().double().requires_grad_()
    assert Rotary(d, interpret=True)(x64, positions).grad_fn.name() != "RopeFunctionBackward"


def test_nsa_core_bounds_every_rope_call():
    """nsa_attention passes a bound above the positions of every call, the compressed keys' too
    (``i·stride`` exceed their count), and matches the torch path with the kernel."""
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, init_blocks=1,
                    local_blocks=2, window=24)
    lengths, H, h, d = [70, 9, 45], 2, 1, 16
    total, cu = sum(lengths), cu_seqlens(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, heads, d, generator=g).to(DEVICE) for heads in (H, h, h))
    gates = torch.rand(total, H, 3, generator=g).to(DEVICE)
    w = (torch.eye(d).repeat(nsa.cmp_kernel, 1) / nsa.cmp_kernel).expand(h, -1, -1).to(DEVICE)
    pe = (0.1 * torch.randn(h, nsa.cmp_kernel, d, generator=g)).to(DEVICE)
    params = CompressionParams(w, w, pe)
    rotary = Rotary(d, interpret=True)
    bounded = []

    def checked_rope(x, positions, max_position=None):
        bound = x.shape[0] if max_position is None else max_position
        bounded.append(int(positions.max()) < bound)
        return rotary(x, positions, max_position)

    def torch_rope(x, positions, max_position=None):
        return rotary._torch_forward(x, positions)

    got, want = (
        nsa_attention(q, k, v, gates, params, cu, nsa, fn, backend="reference")
        for fn in (checked_rope, torch_rope)
    )
    assert bounded == [True, True, True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_real_size_bf16_on_the_gpu():
    n, heads, d = 65536, 16, 128
    lengths = [30000, 17, 20000, n - 50017]
    positions = document_positions(cu_seqlens(lengths), n)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, heads, d, device="cuda", generator=g).bfloat16()
    dy = torch.randn(n, heads, d, device="cuda", generator=g).bfloat16()
    rotary = Rotary(d)
    y, dx = _value_and_grad(rotary, x, positions, dy)
    assert y.grad_fn.name() == "RopeFunctionBackward" and dx.dtype == torch.bfloat16
    y64, dx64 = _value_and_grad(rotary._torch_forward, x.double(), positions, dy.double())
    y32, dx32 = _value_and_grad(rotary._torch_forward, x, positions, dy)
    ulp = dict(rtol=2**-7, atol=1e-5)  # fp32 results may round to neighbouring bf16 values
    for got, want64, want32 in ((y, y64, y32), (dx, dx64, dx32)):
        assert torch.isfinite(got).all()
        assert rel_error(got, want64) <= 1e-2
        assert rel_error(got, want32) <= 1e-4
        torch.testing.assert_close(got, want32, **ulp)
    assert math.isclose(y.float().norm().item(), x.float().norm().item(), rel_tol=1e-3)
