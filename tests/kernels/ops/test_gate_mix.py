"""gate_mix Triton kernels (forward and backward) against the reference computed in fp64.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) on tiny
fp32/fp16 shapes, with non-contiguous branch outputs, gates and output gradients; bf16 is tested
on the GPU only (the interpreter computes bf16 wrongly), at a real size, with determinism.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fsa_testing import DEVICE, rel_error

import fsa_train.kernels as ops
from fsa_train.kernels import reference
from fsa_train.kernels.registry import REGISTRY

pytest.importorskip("triton")
gm = importlib.import_module("fsa_train.kernels.ops.gate_mix.triton")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-4)}


def _rand(*shape, gen, dtype, positive=False):
    x = torch.rand(*shape, generator=gen) if positive else torch.randn(*shape, generator=gen)
    return x.to(DEVICE, dtype)


def _inputs(total, H, d, dtype, strided, seed=0):
    """Branch outputs, gates and an output gradient; ``strided``: none of them contiguous."""
    gen = torch.Generator().manual_seed(seed)
    if strided:
        branches = [
            _rand(total, d, H, gen=gen, dtype=dtype).transpose(1, 2),
            _rand(total, 2 * H, d, gen=gen, dtype=dtype)[:, 1::2],
            _rand(H, total, d, gen=gen, dtype=dtype).transpose(0, 1),
        ]
        gates = _rand(total, 3, H + 1, gen=gen, dtype=torch.float32, positive=True)
        gates = gates[..., :H].transpose(1, 2)
        do = _rand(d, total, H, gen=gen, dtype=dtype).permute(1, 2, 0)
    else:
        branches = [_rand(total, H, d, gen=gen, dtype=dtype) for _ in range(3)]
        # as the model makes them: one [total, 3H] projection viewed per head
        gates = _rand(total, 3 * H, gen=gen, dtype=dtype, positive=True).view(total, H, 3)
        do = _rand(total, H, d, gen=gen, dtype=dtype)
    return [*branches, gates], do


def _run(fn, inputs, do, need=(True, True, True, True)):
    """Output and gradients (None where not needed) of ``fn`` on leaf copies of ``inputs``."""
    leaves = [x.detach().requires_grad_(n) for x, n in zip(inputs, need, strict=True)]
    out = fn(*leaves)
    wanted = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, do) if wanted else ())
    return out.detach(), [next(grads) if x.requires_grad else None for x in leaves]


def _truth(inputs, do, need=(True, True, True, True)):
    """The reference in fp64 on the same (rounded) inputs."""
    return _run(reference.gate_mix, [x.double() for x in inputs], do.double(), need)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_fp64_reference(dtype, d, strided):
    inputs, do = _inputs(37, 3, d, dtype, strided, seed=d)
    assert strided != any(x.is_contiguous() for x in (*inputs, do))
    out, grads = _run(gm.gate_mix, inputs, do)
    want, want_grads = _truth(inputs, do)
    assert out.dtype == dtype and out.shape == (37, 3, d)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    for name, x, got, ref in zip(("cmp", "sel", "win", "gates"), inputs, grads, want_grads,
                                 strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        torch.testing.assert_close(got.double(), ref, **TOL[dtype], msg=name)


@pytest.mark.parametrize(
    "need",
    [(False, False, False, True), (False, True, False, False), (True, True, True, False),
     (True, False, True, True), (False, False, False, False)],
)
def test_only_some_inputs_need_grad(need):
    inputs, _ = _inputs(37, 3, 16, torch.float32, strided=True, seed=1)
    do = torch.ones(1, 1, 1, device=DEVICE).expand(37, 3, 16)  # stride 0, as from out.sum()
    out, grads = _run(gm.gate_mix, inputs, do, need)
    want, want_grads = _truth(inputs, do, need)
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    for n, got, ref in zip(need, grads, want_grads, strict=True):
        assert (got is None) == (not n)
        if n:
            torch.testing.assert_close(got.double(), ref, **TOL[torch.float32])


def test_mixed_dtypes_keep_each_inputs_dtype():
    inputs, do = _inputs(37, 3, 16, torch.float16, strided=False, seed=2)
    inputs[1] = inputs[1].float()
    inputs[3] = inputs[3].float()
    out, grads = _run(gm.gate_mix, inputs, do)
    want, want_grads = _truth(inputs, do)
    assert out.dtype == torch.float16
    assert [g.dtype for g in grads] == [x.dtype for x in inputs]
    torch.testing.assert_close(out.double(), want, **TOL[torch.float16])
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), ref, **TOL[torch.float16])


def test_no_tokens():
    inputs, do = _inputs(0, 3, 16, torch.float32, strided=False)
    out, grads = _run(gm.gate_mix, inputs, do)
    assert out.shape == (0, 3, 16)
    assert [g.shape for g in grads] == [x.shape for x in inputs]


def test_dispatch_and_argument_checks():
    inputs, _ = _inputs(5, 2, 16, torch.float32, strided=False)
    op = REGISTRY["gate_mix"]
    assert op.resolve("triton", inputs[0], tuple(inputs), {}) is gm.gate_mix
    assert op.resolve("reference", inputs[0], tuple(inputs), {}) is reference.gate_mix
    torch.testing.assert_close(ops.gate_mix(*inputs, backend="triton"),
                               ops.gate_mix(*inputs, backend="reference"))
    o, g = inputs[0], inputs[3]
    with pytest.raises(ValueError, match="gates"):
        gm.gate_mix(o, o, o, g[:, :1])
    with pytest.raises(ValueError, match="shape"):
        gm.gate_mix(o, o[:4], o, g)
    with pytest.raises(ValueError, match="power of two"):
        gm.gate_mix(*(o[..., :12],) * 3, g)


@pytest.mark.gpu
def test_gpu_64k_tokens_bf16_deterministic():
    total, H, d, dtype = 65536, 16, 128, torch.bfloat16
    inputs, do = _inputs(total, H, d, dtype, strided=False, seed=3)
    inputs[1] = inputs[1].transpose(0, 1).contiguous().transpose(0, 1)  # head-major, strided
    out, grads = _run(gm.gate_mix, inputs, do)
    _, again = _run(gm.gate_mix, inputs, do)
    want, want_grads = _truth(inputs, do)
    err = rel_error(out, want, rms_floor=True)
    assert out.dtype == dtype and err <= 1e-2, err
    for name, got, second, ref in zip(("cmp", "sel", "win", "gates"), grads, again, want_grads,
                                      strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = rel_error(got, ref, rms_floor=True)
        assert err <= 1e-2, (name, err)
        assert torch.equal(got, second), name


# --------------------------------------------------------------------------- gated_projection


PROJECTION_ERROR = {torch.float32: 1e-6, torch.float16: 2e-3}
"""Relative L2 error bounds; fp16: the mixed output is rounded to fp16 before the matmul, as a
linear layer's input is."""


def _weight(D, H, d, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(D, H * d, generator=gen) / (H * d) ** 0.5).to(DEVICE, dtype)


def _projection_truth(inputs, weight, dy):
    leaves = [x.detach().double().requires_grad_() for x in (*inputs, weight)]
    out = reference.gated_projection(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dy.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_gated_projection_matches_fp64_reference(dtype, strided):
    inputs, _ = _inputs(37, 3, 16, dtype, strided, seed=6)
    weight = _weight(24, 3, 16, dtype)
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    leaves = [x.detach().requires_grad_() for x in (*inputs, weight)]
    out = gm.gated_projection(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    want, want_grads = _projection_truth(inputs, weight, dy)
    assert out.dtype == dtype and out.shape == (37, 24)
    assert rel_error(out, want) <= PROJECTION_ERROR[dtype]
    for name, x, got, ref in zip(("cmp", "sel", "win", "gates", "weight"), leaves, grads,
                                 want_grads, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert rel_error(got, ref) <= PROJECTION_ERROR[dtype], (name, rel_error(got, ref))


def test_gated_projection_keeps_only_its_inputs_for_the_backward():
    """What the op saves: the three branch outputs, the gates and the weight, no mixed output
    (a linear layer after gate_mix keeps the mixed [total, H, d] output as its input)."""
    inputs, _ = _inputs(37, 3, 16, torch.float32, strided=False, seed=8)
    weight = _weight(24, 3, 16, torch.float32)
    leaves = [x.detach().requires_grad_() for x in (*inputs, weight)]
    out = gm.gated_projection(*leaves)
    saved = {t.untyped_storage().data_ptr() for t in out.grad_fn.saved_tensors}
    assert saved == {x.untyped_storage().data_ptr() for x in leaves}
    unfused = torch.nn.functional.linear(gm.gate_mix(*leaves[:4]).flatten(1), leaves[4])
    mm = unfused.grad_fn  # the linear layer's node keeps the mixed output
    kept = {t.untyped_storage().data_ptr() for t in node_saved(mm)}
    assert kept - {x.untyped_storage().data_ptr() for x in leaves}


def node_saved(node):
    return [getattr(node, n) for n in dir(node) if n.startswith("_saved_")
            and isinstance(getattr(node, n), torch.Tensor)]


def test_gated_projection_needs_a_matching_weight_and_dispatches():
    inputs, _ = _inputs(5, 2, 16, torch.float32, strided=False)
    weight = _weight(8, 2, 16, torch.float32)
    op = REGISTRY["gated_projection"]
    assert op.resolve("triton", inputs[0], (*inputs, weight), {}) is gm.gated_projection
    torch.testing.assert_close(ops.gated_projection(*inputs, weight, backend="triton"),
                               ops.gated_projection(*inputs, weight, backend="reference"))
    with pytest.raises(ValueError, match=r"weight must be \[D, 32\]"):
        gm.gated_projection(*inputs, weight[:, :16])


@pytest.mark.gpu
def test_gpu_gated_projection_under_autocast_matches_the_unfused_layer():
    total, H, d, D = 16384, 8, 128, 1024
    inputs, _ = _inputs(total, H, d, torch.bfloat16, strided=False, seed=9)
    weight = _weight(D, H, d, torch.float32)
    dy = torch.randn(total, D, device=DEVICE, dtype=torch.bfloat16)

    def run(fn):
        leaves = [x.detach().requires_grad_() for x in (*inputs, weight)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, dy)

    out, grads = run(gm.gated_projection)
    want, want_grads = run(lambda *x: torch.nn.functional.linear(
        gm.gate_mix(*x[:4]).flatten(1), x[4]))
    assert out.dtype == want.dtype == torch.bfloat16
    assert rel_error(out, want) <= 1e-2
    for name, got, ref in zip(("cmp", "sel", "win", "gates", "weight"), grads, want_grads,
                              strict=True):
        assert got.dtype == ref.dtype, name
        assert rel_error(got, ref, rms_floor=True) <= 1e-2, (name, rel_error(got, ref))
