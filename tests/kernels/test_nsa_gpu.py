"""The whole NSA core and the GPT on the GPU: `backend="auto"` (Triton kernels where they exist)
against the pure-PyTorch reference, bf16, packed documents, outputs and every gradient."""

import pytest
import torch
from fsa_testing import cu_seqlens, rel_error

from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.kernels import CompressionParams, nsa_attention, triton_impl
from fsa_train.model import GPT
from fsa_train.model.rope import Rotary

pytestmark = pytest.mark.gpu


def test_auto_dispatch_reaches_the_triton_kernels():
    for op in ("selected_attention", "window_attention"):
        assert triton_impl(op) is not None, op
    import fsa_train.kernels as ops

    assert callable(ops.selected_attention) and callable(ops.window_attention)


@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("group,partials,selection", [
    (1, "fp32", "token"), (4, "fp32", "token"), (16, "fp32", "token"), (4, "half", "token"),
    (1, "fp32", "block"), (4, "fp32", "block"), (16, "fp32", "block"),
])
def test_nsa_core_auto_matches_reference(group, partials, selection):
    torch.manual_seed(0)
    device, dtype, h, d = "cuda", torch.bfloat16, 2, 128
    cfg = NSAConfig(selected_partials=partials, selection=selection)
    lengths = [3000, 37, 1100, 4096]
    cu = cu_seqlens(lengths, device=device)
    total, H = sum(lengths), h * group
    q = torch.randn(total, H, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True)
    gates = torch.rand(total, H, 3, device=device, dtype=dtype, requires_grad=True)
    pooling = torch.eye(d).repeat(cfg.cmp_kernel, 1) / cfg.cmp_kernel
    w_k = (pooling + 0.01 * torch.randn(h, cfg.cmp_kernel * d, d)).to(device, dtype)
    w_v = (pooling + 0.01 * torch.randn(h, cfg.cmp_kernel * d, d)).to(device, dtype)
    pe = 0.1 * torch.randn(h, cfg.cmp_kernel, d, device=device, dtype=dtype)
    params = [p.requires_grad_() for p in (w_k, w_v, pe)]
    rope = Rotary(d)
    grad_out = torch.randn(total, H, d, device=device, dtype=dtype)
    results = {}
    for backend in ("auto", "reference"):
        inputs = (q, k, v, gates, *params)
        for tensor in inputs:
            tensor.grad = None
        out = nsa_attention(q, k, v, gates, CompressionParams(*params), cu, cfg, rope,
                            backend=backend)
        out.backward(grad_out)
        results[backend] = (out.detach(), [t.grad.detach() for t in inputs])
    out_auto, grads_auto = results["auto"]
    out_ref, grads_ref = results["reference"]
    assert torch.isfinite(out_auto).all()
    assert rel_error(out_auto, out_ref) < 1e-2
    names = ("q", "k", "v", "gates", "w_k", "w_v", "pe")
    for name, got, want in zip(names, grads_auto, grads_ref, strict=True):
        assert rel_error(got, want) < 2e-2, name


def test_gpt_trains_on_the_gpu_with_triton_kernels():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=8, n_kv_head=2, d_model=512,
                    head_dim=128)
    model = GPT(cfg).cuda()
    lengths = [2048, 1000, 1048]
    cu = cu_seqlens(lengths, device="cuda")
    ids = (torch.arange(sum(lengths), device="cuda") * 7) % 512  # next token = this one + 7
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(ids, cu), ids.roll(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_nsa_core_captures_in_a_cuda_graph():
    """No host synchronisation anywhere in the core: forward and backward replay in a graph."""
    torch.manual_seed(0)
    device, dtype, h, group, d = "cuda", torch.bfloat16, 2, 4, 128
    cfg = NSAConfig()
    cu = torch.tensor([0, 3000, 3037, 5000], dtype=torch.int32, device=device)
    total, H = 5000, h * group
    q = torch.randn(total, H, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True)
    gates = torch.rand(total, H, 3, device=device, dtype=dtype, requires_grad=True)
    w = (torch.eye(d).repeat(cfg.cmp_kernel, 1) / cfg.cmp_kernel).to(device, dtype)
    params = CompressionParams(w.expand(h, -1, -1).clone().requires_grad_(),
                               w.expand(h, -1, -1).clone().requires_grad_(),
                               torch.zeros(h, cfg.cmp_kernel, d, device=device, dtype=dtype,
                                           requires_grad=True))
    rope = Rotary(d)
    grad_out = torch.randn(total, H, d, device=device, dtype=dtype)

    def step():
        q.grad = None
        out = nsa_attention(q, k, v, gates, params, cu, cfg, rope)
        out.backward(grad_out)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compile and autotune outside the capture
            eager = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        q.mul_(1.5)  # new inputs in the same buffers
    graph.replay()
    torch.cuda.synchronize()
    expected = nsa_attention(q.detach(), k.detach(), v.detach(), gates.detach(),
                             CompressionParams(*(p.detach() for p in (params.w_k, params.w_v,
                                                                      params.pe))),
                             cu, cfg, rope)
    assert not torch.equal(captured, eager)
    assert rel_error(captured, expected) < 1e-2
