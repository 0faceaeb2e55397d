"""Compiling a transformer block with ``torch.compile(fullgraph=True)``: no graph breaks, and the
same output and gradients as eager, for dense and NSA (token and block selection) blocks, and for
blocks with a checkpointed sub-layer.

On the CPU the reference path runs (each naive op one opaque custom op) and, under
``TRITON_INTERPRET=1``, the Triton path (each kernel launch one custom op); the GPU test
compiles with Inductor on CUDA in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from fsa_testing import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.memory import PackedStorages
from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.kernels.nsa import nsa_varlen
from fsa_train.kernels.registry import preload_triton_modules
from fsa_train.kernels.utils import interpreting
from fsa_train.kernels.varlen import document_positions
from fsa_train.model.gpt import Block

TINY_NSA = dict(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, init_blocks=1,
                local_blocks=1, window=8)
CASES = [("dense", "token"), ("nsa", "token"), ("nsa", "block")]


def make_block(attention: str, selection: str, backend: str, lengths: list[int], d_model: int,
               n_head: int, n_kv_head: int, head_dim: int, device: str = "cpu",
               nsa: dict | None = None, seed: int = 0, checkpointing: bool | str = False):
    """A block of a GPT and its inputs ``(x, cu_seqlens, positions, varlen, max_seqlen)``."""
    nsa_cfg = NSAConfig(**(nsa or TINY_NSA), selection=selection)
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=n_head, n_kv_head=n_kv_head,
                    d_model=d_model, head_dim=head_dim, attention=attention, nsa=nsa_cfg,
                    kernel_backend=backend, activation_checkpointing=checkpointing)
    torch.manual_seed(seed)
    block = Block(cfg).to(device)
    if attention == "nsa":
        block.attn.reset_compression()
    # RoPE on the kernel too when the Triton path runs on the CPU (interpreter)
    block.attn.rope.interpret = backend == "triton"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    total = sum(lengths)
    positions = document_positions(cu, total)
    varlen = nsa_varlen(cu, total, nsa_cfg, positions) if attention == "nsa" else None
    x = torch.randn(total, d_model, device=device)
    return block, (x, cu, positions, varlen, max(lengths))


def graph_breaks(fn, *args) -> list[str]:
    """The reasons ``torch._dynamo.explain`` gives for each graph break of ``fn(*args)``."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == len(explained.break_reasons)
    return [str(reason.reason).splitlines()[0][:200] for reason in explained.break_reasons]


def run_block(block, inputs, do: torch.Tensor, autocast: torch.dtype | None = None):
    """The block's output and the gradients of ``x`` and every parameter for output grad
    ``do``."""
    x, *rest = inputs
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        y = block(x, *rest)
    y.backward(do)
    grads = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    return y.detach(), grads


def check_compiled(block, inputs, backend: str, tol: float,
                   autocast: torch.dtype | None = None) -> None:
    """Zero graph breaks, and the compiled block's output and gradients within ``tol``
    (relative L2) of eager's."""
    preload_triton_modules()

    def forward(x):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return block(x, *inputs[1:])

    x = inputs[0].detach().requires_grad_()
    assert graph_breaks(forward, x) == []
    do = torch.randn_like(inputs[0])
    want, want_grads = run_block(block, inputs, do, autocast)
    torch._dynamo.reset()
    block.compile(fullgraph=True, backend=backend)  # as LitGPT.configure_model does
    got, got_grads = run_block(block, inputs, do, autocast)
    assert_close(got, want, tol, "output")
    for name, grad in want_grads.items():
        assert got_grads[name] is not None, name
        assert_close(got_grads[name], grad, tol, name, rms_floor=True)


@pytest.mark.parametrize(("attention", "selection"), CASES)
def test_block_compiles_whole_on_the_reference_path(attention, selection):
    """The naive ops read document boundaries on the host: compiled, each is one opaque op."""
    block, inputs = make_block(attention, selection, "reference", [37, 20, 7], 64, 4, 2, 16)
    check_compiled(block, inputs, "aot_eager", 1e-5)


LAYOUTS = ([37, 20, 7], [64], [5, 30, 12, 17])
"""Document lengths of successive batches of one total (64): the count of documents and the
longest one change from batch to batch, as they do in a packed training stream."""


def check_layouts_compile_once(attention: str, selection: str, backend: str, compiler: str,
                               device: str, size: tuple, layouts, tol: float,
                               autocast: torch.dtype | None = None,
                               nsa: dict | None = None) -> None:
    """A block compiled once runs batches of every layout in ``layouts`` with eager's outputs
    and gradients and at most one recompilation (Dynamo's automatic dynamic shapes, after the
    first change of the document count and the longest document)."""
    preload_triton_modules()
    block, _ = make_block(attention, selection, backend, layouts[0], *size, device=device,
                          nsa=nsa)
    counter = CompileCounterWithBackend(compiler)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for lengths in layouts:
        _, inputs = make_block(attention, selection, backend, lengths, *size, device=device,
                               nsa=nsa)
        do = torch.randn_like(inputs[0])
        want, want_grads = run_block(block, inputs, do, autocast)
        got, got_grads = run_block(compiled, inputs, do, autocast)
        got_grads = {k.removeprefix("_orig_mod."): g for k, g in got_grads.items()}
        assert_close(got, want, tol, f"output, documents {lengths}")
        for name, grad in want_grads.items():
            assert_close(got_grads[name], grad, tol, f"{name}, documents {lengths}",
                         rms_floor=True)
    assert counter.frame_count <= 2, (
        f"{counter.frame_count} compilations for {len(layouts)} batches")


@pytest.mark.parametrize(("attention", "selection"), [("dense", "token"), ("nsa", "block")])
def test_compiled_block_takes_batches_of_any_document_layout(attention, selection):
    """``model.compile`` on packed data: each batch has its own document count and longest
    document (``max_seqlen``, a host integer). The second layout makes them symbolic; the
    opaque naive ops take integers as ``SymInt[]`` (a symbol cannot be written into their
    static arguments), and no later layout compiles again."""
    check_layouts_compile_once(attention, selection, "reference", "aot_eager", "cpu",
                               (64, 4, 2, 16), LAYOUTS, 1e-5)


def packed_bytes(block, inputs) -> int:
    """Bytes autograd packs for the backward in one forward of ``block`` (parameters left
    out)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = inputs[0].detach().requires_grad_()
    with PackedStorages() as packed:
        block(x, *inputs[1:])
    return sum(n for ptr, n in packed.pointers.items() if ptr not in params)


def test_block_with_a_checkpointed_sublayer_compiles_whole():
    """``activation_checkpointing: attention`` (or ``mlp``, the same code) puts a checkpoint
    inside the block: Dynamo traces it (a higher-order op) without graph breaks, and the
    compiled block, with eager's output and gradients, still keeps less for the backward than
    one without checkpointing."""
    block, inputs = make_block("nsa", "token", "reference", [37, 20, 7], 64, 4, 2, 16,
                               checkpointing="attention")
    block.recompute = None
    keeps_all = packed_bytes(block, inputs)
    block.recompute = "attention"
    check_compiled(block, inputs, "aot_eager", 1e-5)
    assert packed_bytes(block, inputs) < 0.8 * keeps_all


def test_block_with_recomputed_sparse_branches_compiles_whole():
    """``activation_checkpointing: sparse_branches`` (a checkpoint inside NSA's attention):
    traced without graph breaks, eager's output and gradients, less kept than without."""
    block, inputs = make_block("nsa", "token", "reference", [37, 20, 7], 64, 4, 2, 16,
                               checkpointing="sparse_branches")
    block.attn.recompute_sparse = False
    keeps_all = packed_bytes(block, inputs)
    block.attn.recompute_sparse = True
    check_compiled(block, inputs, "aot_eager", 1e-5)
    assert packed_bytes(block, inputs) < 0.95 * keeps_all


@pytest.mark.skipif(not interpreting(), reason="the CPU run of the Triton path")
# block mode's custom ops compile the same way and run on the GPU test; on the CPU the
# interpreter makes each case 12 s
@pytest.mark.parametrize(("attention", "selection"), CASES[:2])
def test_block_compiles_whole_on_the_triton_path(attention, selection):
    """Every kernel launch is a custom op: Dynamo traces no Triton launcher or autotuner."""
    block, inputs = make_block(attention, selection, "triton", [37, 20], 64, 4, 2, 16)
    check_compiled(block, inputs, "aot_eager", 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("attention", "selection"), CASES)
def test_gpu_block_compiles_whole_with_inductor(attention, selection):
    """An NSA (or dense) block at a modest size compiled with Inductor (fullgraph, CUDA, bf16
    autocast): zero graph breaks, output and gradients close to eager's."""
    block, inputs = make_block(attention, selection, "auto", [2500, 1596], 1024, 8, 2, 128,
                               device="cuda", nsa={})
    check_compiled(block, inputs, "inductor", 2e-2, autocast=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(("attention", "selection"), CASES)
def test_gpu_compiled_block_takes_batches_of_any_document_layout(attention, selection):
    """The same on the GPU kernels with Inductor (bf16 autocast): packed batches of 4,096
    tokens with changing document counts and longest documents, one recompilation at most."""
    layouts = ([2500, 1596], [4096], [700, 1300, 96, 2000])
    check_layouts_compile_once(attention, selection, "auto", "inductor", "cuda",
                               (1024, 8, 2, 128), layouts, 2e-2, autocast=torch.bfloat16,
                               nsa={})


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["token", "block"])
def test_gpu_block_with_recomputed_sparse_branches_compiles_with_inductor(selection):
    """``activation_checkpointing: sparse_branches`` on the GPU kernels, compiled with Inductor
    (fullgraph, bf16 autocast): zero graph breaks, eager's output and gradients."""
    block, inputs = make_block("nsa", selection, "auto", [2500, 1596], 1024, 8, 2, 128,
                               device="cuda", nsa={}, checkpointing="sparse_branches")
    check_compiled(block, inputs, "inductor", 2e-2, autocast=torch.bfloat16)
