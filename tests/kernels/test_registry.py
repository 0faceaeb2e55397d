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
