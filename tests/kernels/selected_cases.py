"""Shared by the selected-attention tests: packed inputs, the fp64 reference run, the checks."""

import torch

from fsa_train.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(lengths, h, G, d, dtype, seed, device=DEVICE, q_scale=1.0):
    """q ``[total, h·G, d]`` (times ``q_scale``), k, v ``[total, h, d]``, do, cu_seqlens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = (torch.randn(total, h * G, d, generator=g) * q_scale).to(device=device, dtype=dtype)
    k = torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(total, h * G, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do, cu.to(device)


def run_ref(q, k, v, do, idx, cu, block, dtype=torch.float64):
    """Output and q, k, v gradients of the reference, in ``dtype``."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = reference.selected_attention(q, k, v, idx, cu, block)
    o.backward(do.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


def check(ours, ref, tol, what=""):
    """Every one of (o, dq, dk, dv) finite, in ours' dtype, within ``tol`` relative error."""
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == ours[0].dtype
        assert torch.isfinite(a).all(), f"{what} {name} not finite"
        err = rel(a, b)
        assert err <= tol, f"{what} {name}: rel err {err:.2e} > {tol:.0e}"
