"""Triton selected attention against the pure-PyTorch reference.

CPU: the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes (fp32 and fp16; the interpreter
computes bf16 wrongly). GPU (``-m gpu``): real sizes, bf16/fp16, determinism, CUDA graphs.
"""

from dataclasses import replace

import pytest
import torch
from fsa_testing import DEVICE as DEV
from fsa_testing import assert_close, rel_error, run_selected, run_selected_reference
from fsa_testing import packed_qkv as make_inputs

import fsa_train.kernels as ops
from fsa_train.kernels.ops.selected_attention import triton as sa
from fsa_train.kernels.ops.selected_attention.plan import build_plan, segment_queries
from fsa_train.kernels.ops.selected_attention.sampling import random_selection
from fsa_train.kernels.settings import default_settings


def check(ours, ref, tol, what=""):
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == ours[0].dtype
        assert_close(a, b, tol, f"{what} {name}")


LENGTHS = [37, 70, 1, 53, 16]  # odd lengths, a 1-token document, one exactly a block


@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16])
def test_block_major_matches_reference_fp32(G):
    h = 2 if G <= 4 else 1
    block, topk = 16, 3
    q, k, v, do, cu = make_inputs(LENGTHS, h, G, 16, torch.float32, seed=G)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(G))
    assert (idx == -1).any() and (idx[:, :, -1] >= 0).any()  # padded and full selections
    ours = run_selected(q, k, v, do, idx, cu, block)
    check(ours, run_selected_reference(q, k, v, do, idx, cu, block), 2e-5, f"G={G} block")


@pytest.mark.parametrize("G", [2, 16])
def test_prefetching_variant_matches_reference_fp32(G):
    """The block-major kernels with the next chunk's gathers issued ahead (a tuning variant),
    chosen through the settings' launch overrides."""
    prefetch = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": True}
    settings = replace(default_settings(), selected_fwd_config=prefetch,
                       selected_bwd_config=prefetch)
    h, block, topk = 1, 16, 3
    q, k, v, do, cu = make_inputs([70, 33], h, G, 16, torch.float32, seed=30 + G)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(G))
    assert sa._override(settings.selected_fwd_config)["PREFETCH"]
    ours = run_selected(q, k, v, do, idx, cu, block, settings=settings)
    check(ours, run_selected_reference(q, k, v, do, idx, cu, block), 2e-5, f"G={G} prefetch")


@pytest.mark.parametrize("G,d,block", [(1, 32, 32), (4, 16, 16), (16, 32, 16)])
def test_matches_reference_fp16_large_logits(G, d, block):
    """fp16 inputs with q scaled x8 (logits far past fp16's exp range): finite and accurate."""
    h = 2 if G < 16 else 1
    q, k, v, do, cu = make_inputs([61, 90, 17], h, G, d, torch.float16, seed=10 + G, q_scale=8.0)
    idx = random_selection(cu, h, 4, block, torch.Generator(device=DEV).manual_seed(3))
    ref = run_selected_reference(q, k, v, do, idx, cu, block)
    ours = run_selected(q, k, v, do, idx, cu, block)
    assert ours[0].dtype == torch.float16
    check(ours, ref, 5e-3, f"fp16 G={G}")


@pytest.mark.parametrize("G", [1, 4])
def test_half_partials_match_reference_fp16(G):
    """``partials="half"``: fp16 O/dQ partials (fp32 LSEs), within fp16 accuracy, also with
    q scaled x8 (logits far past fp16's exp range)."""
    assert sa.partial_dtype(torch.float16, "half") == torch.float16
    assert sa.partial_dtype(torch.float32, "half") == torch.float32  # fp32 inputs: fp32 partials
    q, k, v, do, cu = make_inputs([61, 90, 17], 2, G, 32, torch.float16, seed=40 + G,
                                  q_scale=8.0 if G == 4 else 1.0)
    idx = random_selection(cu, 2, 4, 16, torch.Generator(device=DEV).manual_seed(G))
    ours = run_selected(q, k, v, do, idx, cu, 16, partials="half")
    check(ours, run_selected_reference(q, k, v, do, idx, cu, 16), 5e-3, f"half partials G={G}")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_unknown_partials_is_named(backend):
    q, k, v, _, cu = make_inputs([40], 1, 2, 16, torch.float32, seed=1)
    idx = random_selection(cu, 1, 2, 16, torch.Generator(device=DEV).manual_seed(1))
    with pytest.raises(ValueError, match="partials must be"):
        ops.selected_attention(q, k, v, idx, cu, 16, backend=backend, partials="fp8")


def test_popular_block():
    """Every query selects block 0: many segments of one block, memory and results unchanged."""
    h, G, block = 1, 4, 16
    q, k, v, do, cu = make_inputs([150, 33], h, G, 16, torch.float16, seed=5)
    total = q.shape[0]
    idx = torch.full((h, total, 2), -1, dtype=torch.int32, device=DEV)
    idx[..., 0] = 0
    local = torch.cat([torch.arange(150), torch.arange(33)]).to(DEV)
    own = (local // block).to(torch.int32)
    idx[..., 1] = torch.where(own > 0, own, -1)
    plan = build_plan(idx, cu, total, block)
    assert plan.segq == segment_queries(2, block)
    counts = plan.blk_start[1:] - plan.blk_start[:-1]
    assert int(counts.max()) == 150
    segq = plan.segq
    assert segq < 150 and int(plan.seg_off[1] - plan.seg_off[0]) == -(-150 // segq)
    assert plan.maxseg >= int(plan.seg_off[-1])  # static grid bound holds
    ref = run_selected_reference(q, k, v, do, idx, cu, block)
    ours = run_selected(q, k, v, do, idx, cu, block)
    check(ours, ref, 5e-3, "popular")


def test_noncontiguous_inputs_and_grad():
    h, G, d, block = 2, 2, 16, 16
    q, k, v, do, cu = make_inputs([45, 51], h, G, d, torch.float32, seed=7)
    total = q.shape[0]
    # the same values behind other strides
    qn = torch.empty(h * G, total, d, device=DEV).transpose(0, 1).copy_(q)
    kvbuf = torch.empty(total, h, 2, d, device=DEV)
    kvbuf[:, :, 0], kvbuf[:, :, 1] = k, v
    kn, vn = kvbuf[:, :, 0], kvbuf[:, :, 1]
    don = torch.empty(total, h * G, 2 * d, device=DEV)[..., ::2].copy_(do)
    assert not (qn.is_contiguous() or kn.is_contiguous() or don.is_contiguous())
    idx = random_selection(cu, h, 3, block, torch.Generator(device=DEV).manual_seed(1))
    idx_nc = torch.empty(h, 3, total, dtype=torch.int32, device=DEV).transpose(1, 2).copy_(idx)
    ref = run_selected_reference(q, k, v, do, idx, cu, block)
    qq, kk, vv = (x.detach().requires_grad_() for x in (qn, kn, vn))
    o = sa.selected_attention(qq, kk, vv, idx_nc, cu, block)
    o.backward(don)
    check((o.detach(), qq.grad, kk.grad, vv.grad), ref, 2e-5, "strided")


def test_irregular_selections():
    """Ids past the query's block are ignored, a repeated id counts once, no selection gives 0."""
    h, G, block = 1, 3, 16
    q, k, v, do, cu = make_inputs([40, 29], h, G, 16, torch.float32, seed=11)
    total = q.shape[0]
    idx = random_selection(cu, h, 3, block, torch.Generator(device=DEV).manual_seed(2))
    idx[0, 5] = torch.tensor([0, 2, -1])  # block 2 is in the future of local token 5
    idx[0, 20] = torch.tensor([0, 0, 1])  # repeat
    idx[0, 41] = -1  # second document, token 1: nothing selected
    ref = run_selected_reference(q, k, v, do, idx, cu, block)
    assert float(ref[0][41].abs().max()) == 0.0
    ours = run_selected(q, k, v, do, idx, cu, block)
    check(ours, ref, 2e-5, "irregular")
    assert float(ours[0][41].abs().max()) == 0.0 and float(ours[1][41].abs().max()) == 0.0
    assert total == 69


def test_plan_inverse_index():
    """Every valid (token, slot) appears exactly once, in its block's range, tokens ascending."""
    h, block, topk = 2, 16, 4
    cu = torch.tensor([0, 50, 51, 130], dtype=torch.int32, device=DEV)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(0))
    plan = build_plan(idx, cu, 130, block, segq=8)
    bs, pairs = plan.blk_start.cpu(), plan.pairs.cpu().long()
    tok0, nbmax = plan.tok0.cpu(), plan.nbmax
    seen = 0
    for key in range(plan.nkeys):
        hh, gb = divmod(key, nbmax)
        chunk = pairs[bs[key] : bs[key + 1]]
        t, j = chunk // topk, chunk % topk
        assert (t.diff() >= 0).all()
        if chunk.numel():
            start = cu.cpu()[torch.searchsorted(cu.cpu()[1:], t.int(), right=True)]
            assert ((start + idx.cpu()[hh, t, j].long() * block) == tok0[gb]).all()
        seen += chunk.numel()
    assert seen == int((idx >= 0).sum())
    nseg = int(plan.seg_off[-1])
    assert nseg <= plan.maxseg
    assert (plan.seg_key[:nseg] < plan.nkeys).all()
    assert (plan.seg_key[nseg:] >= plan.nkeys).all()


# ----------------------------------------------------------------------------------------------
# GPU: real sizes
# ----------------------------------------------------------------------------------------------


def _gpu_case(lengths, h, G, d, block, topk, dtype, seed, q_scale=1.0):
    """Ours vs the reference in fp32 on the GPU, rel L2 <= 1e-2."""
    q, k, v, do, cu = make_inputs(lengths, h, G, d, dtype, seed, q_scale=q_scale)
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(seed))
    ref = run_selected_reference(q, k, v, do, idx, cu, block, dtype=torch.float32)
    ours = run_selected(q, k, v, do, idx, cu, block)
    assert ours[0].dtype == dtype
    check(ours, ref, 1e-2, f"{len(lengths)}x{lengths[0]} G={G} {dtype}")


@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.gpu
@pytest.mark.parametrize(
    "lengths,G,d,block,topk,dtype",
    [
        ([65536], 4, 128, 64, 16, torch.bfloat16),
        ([4096] * 16, 16, 128, 128, 8, torch.bfloat16),
        ([1024] * 64, 1, 64, 32, 32, torch.float16),
        ([4096] * 4 + [3001, 1095], 8, 64, 64, 16, torch.bfloat16),
    ],
)
def test_gpu_real_sizes(lengths, G, d, block, topk, dtype):
    _gpu_case(lengths, 2 if G > 4 else 4, G, d, block, topk, dtype, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_logits(dtype):
    _gpu_case([8192, 8000], 2, 8, 128, 64, 16, dtype, 2, q_scale=8.0)


@pytest.mark.gpu
def test_gpu_half_partials_stay_near_fp32_partials():
    """bf16 partials at a real size: each gradient's error against fp64 at most 2x that of the
    fp32 partials (plus bf16's output rounding)."""
    q, k, v, do, cu = make_inputs([8192, 8000], 2, 4, 128, torch.bfloat16, 7)
    idx = random_selection(cu, 2, 16, 64, torch.Generator(device=DEV).manual_seed(7))
    ref = run_selected_reference(q, k, v, do, idx, cu, 64, dtype=torch.float32)
    errors = {}
    for partials in ("fp32", "half"):
        ours = run_selected(q, k, v, do, idx, cu, 64, partials=partials)
        errors[partials] = [rel_error(a, b) for a, b in zip(ours, ref, strict=True)]
    for name, e32, e16 in zip(("o", "dq", "dk", "dv"), errors["fp32"], errors["half"],
                              strict=True):
        assert e16 <= 2 * e32 + 2e-3, (name, e32, e16)


@pytest.mark.gpu
def test_gpu_deterministic_and_cuda_graph():
    q, k, v, do, cu = make_inputs([4096] * 8, 4, 4, 128, torch.bfloat16, 3)
    idx = random_selection(cu, 4, 16, 64, torch.Generator(device=DEV).manual_seed(3))
    first = run_selected(q, k, v, do, idx, cu, 64)
    second = run_selected(q, k, v, do, idx, cu, 64)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)

    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    static_do = do.clone()

    def step():
        for x in (qg, kg, vg):
            x.grad = None
        o = sa.selected_attention(qg, kg, vg, idx, cu, 64)
        o.backward(static_do)
        return o

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (compilation) outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for x in (qg, kg, vg):
        x.grad = None
    with torch.cuda.graph(graph):
        o_static = step()
    # replay with new values in the captured input buffers
    q2, k2, v2, do2, _ = make_inputs([4096] * 8, 4, 4, 128, torch.bfloat16, 4)
    with torch.no_grad():
        qg.copy_(q2), kg.copy_(k2), vg.copy_(v2), static_do.copy_(do2)
    graph.replay()
    torch.cuda.synchronize()
    expect = run_selected(q2, k2, v2, do2, idx, cu, 64)
    for a, b in zip((o_static, qg.grad, kg.grad, vg.grad), expect, strict=True):
        assert torch.equal(a, b)


def test_plan_cleaning_and_block_ranges_with_empty_documents():
    """The plan kernels against plain torch: cleaned ids and block token ranges."""
    h, block, topk = 2, 16, 4
    cu = torch.tensor([0, 0, 37, 37, 38, 100], dtype=torch.int32, device=DEV)  # empty documents
    total = 100
    idx = random_selection(cu, h, topk, block, torch.Generator(device=DEV).manual_seed(4))
    idx[0, 3] = torch.tensor([0, 0, 5, -1], dtype=torch.int32)  # a repeat and a future block
    plan = build_plan(idx, cu, total, block, segq=8)
    tok = torch.arange(total, device=DEV)
    doc = torch.searchsorted(cu[1:].long(), tok, right=True)
    start = cu.long()[doc]
    own = (tok - start) // block
    ids = idx.long()
    prev = torch.cat([torch.full_like(ids[..., :1], -2), ids[..., :-1]], -1)
    valid = (ids >= 0) & (ids <= own[None, :, None]) & (ids != prev)
    assert torch.equal(plan.idx_c.long(), torch.where(valid, ids, -1))
    assert plan.idx_c[0, 3].tolist() == [0, -1, -1, -1]
    lengths = (cu[1:] - cu[:-1]).tolist()
    want0, want1 = [], []
    for b, n in enumerate(lengths):
        for j in range(-(-n // block)):
            want0.append(int(cu[b]) + j * block)
            want1.append(min(int(cu[b]) + (j + 1) * block, int(cu[b + 1])))
    n_blocks = len(want0)
    assert plan.tok0[:n_blocks].tolist() == want0
    assert plan.tok1[:n_blocks].tolist() == want1
    assert int(plan.tok0[n_blocks:].abs().sum() + plan.tok1[n_blocks:].abs().sum()) == 0
