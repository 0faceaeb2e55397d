"""The op dispatcher (``fsa_train.kernels.registry``) under ``torch.compile``."""

from __future__ import annotations

import torch
import torch._dynamo

from fsa_train.kernels import gate_mix
from fsa_train.kernels.registry import REGISTRY, preload_triton_modules


def test_dispatch_adds_no_graph_break():
    """Resolving an op inside compiled code must not break the graph (a lock or an import in
    the dispatcher did, once per op call). gate_mix's naive op is pure elementwise, so any break
    would be the dispatcher's."""
    preload_triton_modules()

    def mix(a, b, c, g):
        return gate_mix(a, b, c, g) * 2

    a, b, c = (torch.randn(6, 2, 4) for _ in range(3))
    g = torch.rand(6, 2, 3)
    explained = torch._dynamo.explain(mix)(a, b, c, g)
    assert explained.graph_break_count == 0, [str(r.reason)[:120] for r in
                                              explained.break_reasons]
    assert torch.allclose(torch.compile(mix, backend="eager")(a, b, c, g), mix(a, b, c, g))


def test_cpu_tensors_never_import_the_triton_modules_on_auto():
    op = REGISTRY["gate_mix"]
    x = torch.zeros(2, 1, 4)
    assert op.resolve("auto", x, (x,), {}) is op.naive


def test_opaque_naive_gradients_have_their_inputs_layout():
    """Compiled on the reference path, a naive op is one opaque custom op whose backward's
    fake declares each gradient in its input's strides, and Inductor checks real outputs
    against that (the compiled demo on the CPU failed there: autograd gave compression's
    position embedding a permuted gradient). Eager calls of the opaque op show the layout."""
    op = REGISTRY["compress"]
    torch.manual_seed(0)
    h, l, d, stride = 2, 8, 16, 4
    x = torch.randn(40, h, d, requires_grad=True)
    weight = torch.randn(h, l * d, d, requires_grad=True)
    pe = torch.randn(h, l, d, requires_grad=True)
    cu = torch.tensor([0, 23, 40], dtype=torch.int32)
    out, _ = op.opaque_naive((x, weight, pe, cu, l, stride), {})
    # autograd.grad: the op's own outputs (a leaf's .grad is re-laid out to match the leaf)
    got = torch.autograd.grad(out.square().sum(), (x, weight, pe))
    want = op.naive(x, weight, pe, cu, l, stride)[0]
    grads = torch.autograd.grad(want.square().sum(), (x, weight, pe))
    for name, leaf, g, grad in zip(("x", "weight", "pe"), (x, weight, pe), got, grads,
                                   strict=True):
        assert g.stride() == leaf.stride(), (name, g.stride(), leaf.stride())
        assert torch.allclose(g, grad, atol=1e-5), name
