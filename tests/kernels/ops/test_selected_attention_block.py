"""Block-shared selection (``nsa.selection: block``): the reference against naive per-token code,
and the block-sparse Triton kernels and the block mode of ``select_blocks`` against the reference.

CPU: the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes (fp32 and fp16). GPU (``-m
gpu``): real sizes, bf16/fp16, determinism, CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from fsa_testing import CUDA, DEVICE, assert_close, packed_qkv
from fsa_testing import cu_seqlens as _cu

pytest.importorskip("triton")

import fsa_train.kernels as ops  # noqa: E402
from fsa_train.kernels import reference  # noqa: E402
from fsa_train.kernels.ops.select_blocks import triton as tk  # noqa: E402
from fsa_train.kernels.ops.selected_attention import block_plan as bp  # noqa: E402
from fsa_train.kernels.ops.selected_attention import triton as sa  # noqa: E402
from fsa_train.kernels.ops.selected_attention.naive import expand_block_selection  # noqa: E402
from fsa_train.kernels.settings import default_settings  # noqa: E402
from fsa_train.kernels.varlen import block_row_owners, block_rows, token_block_rows  # noqa: E402

# ------------------------------------------------------------------ naive per-token references


def naive_block_selection(q, k_c, lse, lengths, kernel, stride, block, topk, init, local):
    """Block-shared top-k written per token and per block with Python loops (fp64): a block's
    score is the sum over its tokens t, the G heads and the compressed tokens i visible to t of
    ``exp(σ q·k̃_i − lse) ·`` (overlap of i's window with the block) / stride."""
    H, h = q.shape[1], k_c.shape[1]
    G = H // h
    scale = 1.0 / math.sqrt(q.shape[-1])
    total = sum(lengths)
    out = torch.full((h, total // block + len(lengths), topk), -1, dtype=torch.int32)
    b0 = c0 = 0
    for d, n in enumerate(lengths):
        n_c = (n - kernel) // stride + 1 if n >= kernel else 0
        n_blocks = -(-n // block)
        for head in range(h):
            for j in range(n_blocks):
                score = [0.0] * (j + 1)
                for t in range(j * block, min(n, (j + 1) * block)):
                    for g in range(G):
                        qh = q[b0 + t, head * G + g].double()
                        for i in range(n_c):
                            if i * stride + kernel - 1 > t:
                                break
                            p = math.exp(float(qh @ k_c[c0 + i, head].double()) * scale
                                         - float(lse[head * G + g, b0 + t]))
                            for b in range(j + 1):
                                lo = max(i * stride, b * block)
                                hi = min(i * stride + kernel, (b + 1) * block)
                                if hi > lo:
                                    score[b] += p * (hi - lo) / stride
                for b in range(j + 1):
                    if b < init or b > j - local:
                        score[b] = math.inf
                order = sorted(range(j + 1), key=lambda b: (-score[b], b))[:topk]
                row = b0 // block + d + j
                out[head, row, : len(order)] = torch.tensor(sorted(order), dtype=torch.int32)
        b0 += n
        c0 += n_c
    return out


def _selection_inputs(lengths, H, h, d, kernel, stride, seed, dtype=torch.float32, q_scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    cu = _cu(lengths, device=DEVICE)
    cuc = reference.compressed_lengths(cu, kernel, stride)
    q = (torch.randn(sum(lengths), H, d, generator=g) * q_scale).to(DEVICE, dtype)
    k = torch.randn(int(cuc[-1]), h, d, generator=g).to(DEVICE, dtype)
    _, lse = reference.compressed_attention(q.float(), k.float(), k.float(), cu, cuc, kernel,
                                            stride)
    return q, k, lse.float(), cu, cuc


SELECTION_CASES = [  # lengths, H, h, d, (kernel, stride, block, topk, init, local)
    ([100, 37, 250, 5], 4, 2, 16, (32, 16, 16, 4, 1, 2)),  # short documents, odd lengths
    ([300, 1, 64], 3, 1, 16, (16, 8, 16, 3, 1, 1)),  # G = 3, a 1-token document
    ([200], 16, 1, 32, (32, 16, 32, 2, 0, 1)),  # G = 16, no forced first block
    ([130, 77], 8, 1, 16, (16, 16, 16, 5, 2, 2)),
]


@pytest.mark.parametrize("lengths,H,h,d,params", SELECTION_CASES[:2])
def test_reference_block_selection_matches_naive_per_token_code(lengths, H, h, d, params):
    q, k, lse, cu, cuc = _selection_inputs(lengths, H, h, d, params[0], params[1], seed=H)
    want = naive_block_selection(q.cpu(), k.cpu(), lse.cpu(), lengths, *params)
    got = reference.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    assert got.shape == want.shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("lengths,H,h,d,params", SELECTION_CASES)
def test_block_mode_kernel_matches_reference(lengths, H, h, d, params):
    q, k, lse, cu, cuc = _selection_inputs(lengths, H, h, d, params[0], params[1], seed=H + d)
    want = reference.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    got = tk.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    assert got.shape == (h, block_rows(sum(lengths), len(lengths), params[2]), params[3])
    assert torch.equal(got, want)
    _, _, exists = block_row_owners(cu, params[2], got.shape[1])
    assert (got[:, ~exists] == -1).all()  # rows no block owns are padding


def test_unknown_selection_is_named():
    q, k, lse, cu, cuc = _selection_inputs([40], 2, 1, 16, 16, 8, seed=0)
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match="selection must be one of"):
            ops.select_blocks(q, k, lse, cu, cuc, 16, 8, 16, 2, 1, 1, selection="query",
                              backend=backend)
        with pytest.raises(ValueError, match="selection must be one of"):
            ops.selected_attention(q, q[:, :1], q[:, :1], torch.zeros(1, 40, 2), cu, 16,
                                   selection="tokens", backend=backend)


def test_layout_helpers():
    cu = _cu([70, 0, 16, 5], device=DEVICE)
    rows = block_rows(91, 4, 16)
    assert rows == 91 // 16 + 4
    doc, j, exists = block_row_owners(cu, 16, rows)
    owned = [(int(a), int(b)) for a, b, e in zip(doc, j, exists, strict=True) if e]
    assert owned == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (2, 0), (3, 0)]
    tok = token_block_rows(cu, 91, 16)
    assert tok[:70].tolist() == [t // 16 for t in range(70)]
    first_of_doc2 = 70 // 16 + 2
    assert tok[70:86].tolist() == [first_of_doc2] * 16 and tok[86:].tolist() == [92 // 16 + 3] * 5


def test_expanded_selection_gives_each_token_its_block_row():
    cu = _cu([40, 20], device=DEVICE)
    rows = block_rows(60, 2, 16)
    idx = torch.arange(rows, device=DEVICE, dtype=torch.int32).view(1, rows, 1).repeat(2, 1, 3)
    per_token = expand_block_selection(idx, cu, 60, 16)
    assert torch.equal(per_token[0, :, 0].long(), token_block_rows(cu, 60, 16))
    with pytest.raises(ValueError, match="block selections must be"):
        expand_block_selection(idx[:, :-1], cu, 60, 16)


# ------------------------------------------------------------- block-sparse selected attention


def block_selection(cu, h, topk, block, seed, forced=(1, 2)):
    """Random valid block selections ``[h, rows, topk]`` (forced first and local blocks)."""
    total = int(cu[-1])
    rows = block_rows(total, cu.numel() - 1, block)
    _, j, exists = block_row_owners(cu, block, rows)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = int(j.max()) + 1
    score = torch.rand(h, rows, n, generator=gen).to(cu.device)
    b = torch.arange(n, device=cu.device)[None, None, :]
    jj = j[None, :, None]
    score = torch.where((b < forced[0]) | ((b <= jj) & (b > jj - forced[1])), score + 2, score)
    score = torch.where((b <= jj) & exists[None, :, None], score, -1.0)
    top, ids = torch.topk(score, min(topk, n), dim=-1)
    ids = torch.where(top >= 0, ids, -1).sort(-1).values
    ids = torch.where(ids < 0, n + 1, ids).sort(-1).values
    out = torch.full((h, rows, topk), -1, dtype=torch.int32, device=cu.device)
    out[..., : ids.shape[-1]] = torch.where(ids > n, -1, ids).to(torch.int32)
    return out


def run(fn, q, k, v, do, dtype=None):
    q, k, v = (x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def ours_block(q, k, v, do, idx, cu, block, settings=None):
    """Outputs and gradients of the Triton block-sparse op."""
    return run(lambda a, b, c: sa.selected_attention(a, b, c, idx, cu, block, selection="block",
                                                     settings=settings), q, k, v, do)


def compare(q, k, v, do, idx, cu, block, tol, settings=None, what="", ref_dtype=torch.float64):
    """The Triton op against the reference (run in ``ref_dtype``): o and the three gradients
    within ``tol``, in the inputs' dtype. Returns the Triton op's results."""
    ours = ours_block(q, k, v, do, idx, cu, block, settings)
    ref = run(lambda a, b, c: reference.selected_attention(a, b, c, idx, cu, block,
                                                           selection="block"),
              q, k, v, do, ref_dtype)
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == q.dtype
        assert_close(a, b, tol, f"{what} {name}")
    return ours


LENGTHS = [37, 70, 1, 53, 16]  # odd lengths, a 1-token document, one exactly a block


@pytest.mark.parametrize("G,d", [(1, 16), (2, 32), (3, 16), (4, 32), (8, 16), (16, 16)])
def test_block_sparse_matches_reference_fp32(G, d):
    h = 2 if G <= 4 else 1
    q, k, v, do, cu = packed_qkv(LENGTHS, h, G, d, torch.float32, seed=G)
    idx = block_selection(cu, h, 3, 16, seed=G)
    assert (idx == -1).any() and (idx[:, :, -1] >= 0).any()
    compare(q, k, v, do, idx, cu, 16, 2e-5, what=f"G={G}")


@pytest.mark.parametrize("config", [
    {"SPLIT": 2, "PACK": 0, "num_warps": 4, "num_stages": 1},
    {"SPLIT": 2, "PACK": 1, "num_warps": 4, "num_stages": 1},
    {"SPLIT": 1, "PACK": 0, "num_warps": 4, "num_stages": 1},
    {"SPLIT": 1, "PACK": 1, "num_warps": 4, "num_stages": 1, "KSPLIT": 2},
])
def test_launch_variants_match_reference(config):
    """Sub-tiles of a query block (SPLIT), one head per tile (PACK = 0) and half a key block per
    dK/dV program (KSPLIT = 2) through the settings' override."""
    settings = replace(default_settings(), block_sparse_config=config)
    q, k, v, do, cu = packed_qkv([70, 33], 1, 4, 16, torch.float32, seed=7)
    idx = block_selection(cu, 1, 3, 16, seed=7)
    compare(q, k, v, do, idx, cu, 16, 2e-5, settings, what=str(config))


def test_popular_block_is_cut_into_segments_fp16_large_logits():
    """Every query block selects block 0: its dK/dV is summed from several segments' fp32
    partials; fp16 with q scaled x8 stays finite and accurate."""
    h, G, block = 1, 4, 16
    q, k, v, do, cu = packed_qkv([400, 33], h, G, 16, torch.float16, seed=5, q_scale=8.0)
    rows = block_rows(433, 2, block)
    _, j, _ = block_row_owners(cu, block, rows)
    idx = torch.full((h, rows, 2), -1, dtype=torch.int32, device=DEVICE)
    idx[..., 0] = 0
    idx[..., 1] = torch.where(j > 0, j, -1).to(torch.int32)
    _, keys = bp.clean_block_selection(idx, cu, block)
    csr = bp.build_block_csr(keys, h, rows, 2)
    first = int(csr.key_start[1] - csr.key_start[0])
    assert first == 25 > csr.segq and csr.partial_offset(0) == 0  # block 0: several segments
    assert int(csr.counts[0, 0]) == -(-first // csr.segq) and csr.first_segment(0) == 0
    assert csr.partial_offset(1) == -1 and int(csr.counts[0, 1]) == 1  # block 1: one segment
    segments = int(csr.ends[0, -1])
    assert (csr.seg_key[:segments] < csr.nkeys).all()
    assert (csr.seg_key[segments:] == csr.nkeys).all()
    assert csr.q_rows[:first].tolist() == sorted(csr.q_rows[:first].tolist())  # ascending
    compare(q, k, v, do, idx, cu, block, 5e-3, what="popular fp16")


def test_cleaning_drops_invalid_repeated_and_future_entries():
    cu = _cu([40, 8], device=DEVICE)  # rows: 0-2 document 0, 3 document 1, 4 padding
    idx = torch.tensor([[[2, 0, 0], [-1, 1, 5], [2, 2, 1], [0, 0, -1], [7, 0, 0]]],
                       dtype=torch.int32, device=DEVICE)
    clean, keys = bp.clean_block_selection(idx, cu, 16)
    assert keys.view(1, 5, 3)[0, 2].tolist() == [1, 2, 5]  # row of block 0 + id; 5 = nkeys
    assert clean.tolist() == [[[0, -1, -1], [1, -1, -1], [1, 2, -1], [0, -1, -1],
                               [-1, -1, -1]]]
    q, k, v, do, _ = packed_qkv([40, 8], 1, 2, 16, torch.float32, seed=3)
    compare(q, k, v, do, idx, cu, 16, 2e-5, what="unclean")


def test_non_contiguous_inputs_and_output_gradient():
    q, k, v, do, cu = packed_qkv([50, 29], 2, 2, 16, torch.float32, seed=11)
    idx = block_selection(cu, 2, 3, 16, seed=11)
    qs, ks, vs = (torch.cat([x, x], -1)[..., ::2] for x in (q, k, v))  # strided last dim
    dos = do.transpose(0, 1).contiguous().transpose(0, 1)  # token stride != H * d
    assert not qs.is_contiguous() and not dos.is_contiguous()
    compare(qs, ks, vs, dos, idx, cu, 16, 2e-5, what="strided")


def test_bad_block_selection_shape_is_named():
    q, k, v, _, cu = packed_qkv([40], 1, 2, 16, torch.float32, seed=1)
    idx = torch.zeros(1, 40, 2, dtype=torch.int32, device=DEVICE)  # a token-mode shape
    with pytest.raises(ValueError, match="block selections must be"):
        sa.selected_attention(q, k, v, idx, cu, 16, selection="block")


def test_dispatcher_runs_block_mode_kernels():
    """``backend="triton"`` reaches the block-sparse kernels (not the token kernels)."""
    q, k, v, do, cu = packed_qkv([40], 1, 2, 16, torch.float32, seed=2)
    idx = block_selection(cu, 1, 2, 16, seed=2)
    want = reference.selected_attention(q, k, v, idx, cu, 16, selection="block")
    got = ops.selected_attention(q, k, v, idx, cu, 16, selection="block", backend="triton")
    assert_close(got, want, 2e-5, "dispatch")


# ------------------------------------------------------------------------- GPU: real sizes

GPU_PACKED = [1, 100, 4096, 777, 2048, 129, 1000, 31]


@pytest.mark.gpu
@pytest.mark.parametrize("G,d,dtype", [(1, 128, torch.bfloat16), (4, 128, torch.bfloat16),
                                       (16, 64, torch.bfloat16), (4, 64, torch.float16),
                                       (2, 128, torch.float16)])
def test_gpu_block_sparse_matches_reference(G, d, dtype):
    h = 4 if G <= 4 else 2
    q, k, v, do, cu = packed_qkv(GPU_PACKED, h, G, d, dtype, seed=G + d)
    idx = block_selection(cu, h, 16, 64, seed=G)
    compare(q, k, v, do, idx, cu, 64, 1e-2, what=f"G={G} d={d} {dtype}",
            ref_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [
    {"SPLIT": 1, "PACK": 1, "num_warps": 8, "num_stages": 2, "KSPLIT": 2},
    {"SPLIT": 2, "PACK": 1, "num_warps": 8, "num_stages": 2},
    {"SPLIT": 1, "PACK": 0, "num_warps": 4, "num_stages": 2},
])
def test_gpu_launch_variants_match_reference(config):
    """Each launch shape the autotuner may pick, forced through the settings, at real sizes."""
    settings = replace(default_settings(), block_sparse_config=config)
    q, k, v, do, cu = packed_qkv(GPU_PACKED, 4, 4, 128, torch.bfloat16, seed=21)
    idx = block_selection(cu, 4, 16, 64, seed=21)
    compare(q, k, v, do, idx, cu, 64, 1e-2, settings, what=str(config), ref_dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_long_document_popular_block_deterministic():
    """A 32K document (block 0 in every selection: many segments), bf16: accurate against the
    reference, and bit-identical on a second run."""
    h, G = 4, 4
    q, k, v, do, cu = packed_qkv([32768], h, G, 128, torch.bfloat16, seed=3)
    idx = block_selection(cu, h, 16, 64, seed=3)
    first = compare(q, k, v, do, idx, cu, 64, 1e-2, what="32K", ref_dtype=torch.float32)
    second = ours_block(q, k, v, do, idx, cu, 64)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_block_mode_captures_in_a_cuda_graph():
    """The block-sparse forward and backward, plan included, capture in a CUDA graph (no host
    synchronisation) and replay to the eager results."""
    h, G, d = 2, 4, 128
    lengths = [3000, 1000, 96]
    q, k, v, do, cu = packed_qkv(lengths, h, G, d, torch.bfloat16, seed=9)
    idx = block_selection(cu, h, 16, 64, seed=9)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        for x in (q, k, v):
            x.grad = None
        o = ops.selected_attention(q, k, v, idx, cu, 64, selection="block")
        o.backward(do)
        return o

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step().detach().clone()  # compiles and autotunes outside the capture
        grads = [x.grad.clone() for x in (q, k, v)]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in (q, k, v):
        x.grad = None
    with torch.cuda.graph(graph):
        out = ops.selected_attention(q, k, v, idx, cu, 64, selection="block")
        out.backward(do)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    for x, g in zip((q, k, v), grads, strict=True):
        assert torch.equal(x.grad, g)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 4, 16])
def test_gpu_block_mode_select_blocks_matches_reference(G):
    """Real sizes, fp32 inputs: the same indices, except rows at a near-tie (the kernel sums the
    block's tokens in another order than the reference)."""
    q, k, lse, cu, cuc = _selection_inputs(GPU_PACKED, G * 2, 2, 128, 32, 16, seed=G)
    params = (32, 16, 64, 16, 1, 2)
    want = reference.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    got = ops.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    rows_differ = (got != want).any(-1)
    assert int(rows_differ.sum()) <= max(2, rows_differ.numel() // 500), int(rows_differ.sum())
    again = ops.select_blocks(q, k, lse, cu, cuc, *params, selection="block")
    assert torch.equal(got, again)


@pytest.mark.skipif(CUDA, reason="the CPU dispatcher check")
def test_cpu_tensors_run_the_reference_under_auto():
    q, k, v, _, cu = packed_qkv([40], 1, 2, 16, torch.float32, seed=4, device="cpu")
    idx = block_selection(cu, 1, 2, 16, seed=4)
    got = ops.selected_attention(q, k, v, idx, cu, 16, selection="block")
    assert torch.equal(got, reference.selected_attention(q, k, v, idx, cu, 16, selection="block"))
