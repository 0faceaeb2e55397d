"""select_blocks (fused scoring + streaming top-k) Triton kernel against the reference.

Indices must be identical to ``reference.select_blocks`` on fp32 inputs without ties. On the CPU
the kernel runs under ``TRITON_INTERPRET=1`` on tiny shapes (and with key tiles of 4 blocks, so
that a document spans several tiles); GPU tests (marker ``gpu``) use real sizes, where the
kernel's and cuBLAS's fp32 summation orders differ: a handful of rows may then pick a different
block at a near-tie, which is checked to be equally good (same total score).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from fsa_testing import DEVICE
from fsa_testing import cu_seqlens as _cu

pytest.importorskip("triton")

import fsa_train.kernels as ops  # noqa: E402
from fsa_train.kernels import reference  # noqa: E402
from fsa_train.kernels.ops.compressed_attention import triton as ca  # noqa: E402
from fsa_train.kernels.ops.select_blocks import triton as tk  # noqa: E402
from fsa_train.kernels.registry import REGISTRY  # noqa: E402
from fsa_train.kernels.settings import KernelSettings, default_settings  # noqa: E402


def _settings(**changes) -> KernelSettings:
    return replace(default_settings(), **changes)


def _inputs(lengths, H, h, d, kernel, stride, dtype, seed, q_scale=1.0, device=DEVICE):
    """q, k_c, lse (the reference compressed attention's, fp32), cu, cu_c."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cu = _cu(lengths, device=device)
    cuc = reference.compressed_lengths(cu, kernel, stride)
    total, total_c = sum(lengths), int(cuc[-1])
    q = (torch.randn(total, H, d, generator=g) * q_scale).to(device=device, dtype=dtype)
    k = torch.randn(total_c, h, d, generator=g).to(device=device, dtype=dtype)
    kf = k.float()
    _, lse = reference.compressed_attention(q.float(), kf, kf, cu, cuc, kernel, stride)
    return q, k, lse.float(), cu, cuc


def _both(q, k, lse, cu, cuc, params, settings=None):
    ours = tk.select_blocks(q, k, lse, cu, cuc, *params, settings=settings)
    ref = reference.select_blocks(q, k, lse, cu, cuc, *params)
    assert ours.shape == ref.shape and ours.dtype == torch.int32
    return ours, ref


def _scores_of(q, k, lse, cu, cuc, params, head, token):
    """fp64 block scores (forced = inf, invalid = -inf) of one (KV head, packed token)."""
    kernel, stride, block, _, init_blocks, local_blocks = params
    H, h = q.shape[1], k.shape[1]
    G = H // h
    doc = int(torch.searchsorted(cu[1:], torch.tensor(token, device=cu.device), right=True))
    t = token - int(cu[doc])
    c0 = int(cuc[doc])
    m = 0 if t < kernel - 1 else min(int(cuc[doc + 1]) - c0, (t - kernel + 1) // stride + 1)
    n_blocks = t // block + 1
    scale = 1.0 / math.sqrt(q.shape[-1])
    if m:
        qs = q[token, head * G : (head + 1) * G].double()
        logits = qs @ k[c0 : c0 + m, head].double().T * scale
        p = torch.exp(logits - lse[head * G : (head + 1) * G, token, None].double()).sum(0)
        s = reference.block_scores(p, kernel, stride, block, n_blocks)
    else:
        s = torch.zeros(n_blocks, dtype=torch.float64, device=q.device)
    b = torch.arange(n_blocks, device=q.device)
    forced = (b < init_blocks) | (b > t // block - local_blocks)
    return s.masked_fill(forced, math.inf)


def _assert_same_or_near_tie(q, k, lse, cu, cuc, params, ours, ref, max_rows, rtol):
    """Identical indices except in at most ``max_rows`` rows, each an equally good selection."""
    bad = (ours != ref).any(-1).nonzero().tolist()
    assert len(bad) <= max_rows, (len(bad), bad[:5])
    for head, token in bad:
        s = _scores_of(q, k, lse, cu, cuc, params, head, token)
        a, b = ours[head, token], ref[head, token]
        assert (a >= 0).sum() == (b >= 0).sum(), (head, token)
        sa, sb = s[a[a >= 0].long()], s[b[b >= 0].long()]
        assert torch.equal(torch.isinf(sa).sum(), torch.isinf(sb).sum())
        fa, fb = sa[torch.isfinite(sa)].sum(), sb[torch.isfinite(sb)].sum()
        assert abs(fa - fb) <= rtol * max(abs(fb), 1e-30), (head, token, fa.item(), fb.item())


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes, exact indices
# ------------------------------------------------------------------------------------------------

CASES = [
    # lengths, H, h, d, (kernel, stride, block, topk, init_blocks, local_blocks)
    ([37, 1, 100, 7, 200], 4, 2, 16, (8, 4, 16, 4, 1, 2)),  # G = 2, NBT = TP
    ([300, 0, 50], 2, 1, 16, (16, 8, 32, 3, 1, 1)),  # T not a power of two, empty document
    ([150, 90], 3, 1, 16, (8, 4, 16, 2, 0, 0)),  # G = 3, nothing forced, NBT > TP
    ([20, 110], 4, 4, 32, (8, 8, 16, 8, 1, 2)),  # l = s, fewer valid blocks than T (-1 padding)
    ([520], 4, 1, 16, (32, 16, 64, 4, 1, 2)),  # defaults' l, s, B; G = 4
]


@pytest.mark.parametrize("lengths,H,h,d,params", CASES)
def test_matches_reference(lengths, H, h, d, params):
    q, k, lse, cu, cuc = _inputs(lengths, H, h, d, params[0], params[1], torch.float32, H + d)
    ours, ref = _both(q, k, lse, cu, cuc, params)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("lengths,H,h,d,params", [
    CASES[2], CASES[0], CASES[3],  # T = 2, 4, 8
    ([300], 2, 1, 16, (8, 4, 16, 16, 1, 2)),  # T = 16
])
def test_sort_merge_matches_reference(lengths, H, h, d, params):
    """``topk_merge = "sort"`` (the full-sort alternative to the default bitonic merge) keeps the
    same top-k keys: the reference's indices."""
    q, k, lse, cu, cuc = _inputs(lengths, H, h, d, params[0], params[1], torch.float32, H + d)
    ours, ref = _both(q, k, lse, cu, cuc, params, _settings(topk_merge="sort"))
    assert torch.equal(ours, ref)


def test_wide_key_tiles_match_reference():
    """``topk_tile_blocks`` wider than the running set (8 blocks per tile for a top-4): the tile's
    candidates are cut to their top TP before the (default, bitonic) merge; the cut does not
    depend on the merge."""
    lengths, H, h, d, params = CASES[0]
    q, k, lse, cu, cuc = _inputs(lengths, H, h, d, params[0], params[1], torch.float32, H + d)
    settings = _settings(topk_merge="bitonic", topk_tile_blocks=8)
    ours, ref = _both(q, k, lse, cu, cuc, params, settings)
    assert torch.equal(ours, ref)


def test_tile_width_by_group_size():
    """On the GPU, ``topk_tile_blocks = 0`` means 32-block tiles from G = 16 (measured faster
    there) and the fewest (16) below; a set width wins, and the width never drops below TP."""
    assert [tk.tile_blocks(16, G, 0, interpreted=False) for G in (1, 4, 8, 16)] == \
        [16, 16, 16, 32]
    assert tk.tile_blocks(32, 1, 0, interpreted=False) == 32
    assert tk.tile_blocks(16, 1, 64, interpreted=False) == 64


def test_bad_tile_blocks_is_named():
    with pytest.raises(ValueError, match="FSA_TOPK_TILE_BLOCKS must be"):
        KernelSettings(topk_tile_blocks=24)
    with pytest.raises(ValueError, match="FSA_TOPK_TILE_BLOCKS must be"):
        KernelSettings.from_env({"FSA_TOPK_TILE_BLOCKS": "wide"})


def test_unknown_merge_is_named():
    with pytest.raises(ValueError, match="FSA_TOPK_MERGE must be"):
        KernelSettings.from_env({"FSA_TOPK_MERGE": "heap"})


def test_gpu_tile_width_and_kernel_lse():
    """The GPU's key tiles (16 blocks), the Triton compressed attention's LSE, strided q."""
    lengths, params = [300, 45], (8, 4, 16, 4, 1, 1)  # 300 tokens: two key tiles
    g = torch.Generator().manual_seed(4)
    cu = _cu(lengths)
    cuc = reference.compressed_lengths(cu, 8, 4)
    q = torch.randn(sum(lengths), 8, 16, generator=g).to(DEVICE)[:, ::2]  # strided heads
    k = torch.randn(int(cuc[-1]), 2, 16, generator=g).to(DEVICE)
    _, lse = ca.compressed_attention(q, k, k, cu, cuc, 8, 4)
    ours, ref = _both(q, k, lse, cu, cuc, params, _settings(topk_tile_blocks=16))
    assert torch.equal(ours, ref)


def test_popular_block_and_ties():
    """One block every query wants (large keys along q's common direction), and near-ties."""
    lengths, params = [220], (8, 4, 16, 4, 1, 1)
    q, k, lse, cu, cuc = _inputs(lengths, 2, 1, 16, 8, 4, torch.float32, 8)
    u = torch.randn(16, generator=torch.Generator().manual_seed(0))
    u = (u / u.norm()).to(DEVICE)
    q = q + 3.0 * u
    k = k.clone()
    k[19:24] = 6.0 * u  # the compressed tokens overlapping block 5
    _, lse = reference.compressed_attention(q, k, k, cu, cuc, 8, 4)
    ours, ref = _both(q, k, lse, cu, cuc, params)
    assert torch.equal(ours, ref)
    assert (ours[0, 120:] == 5).any(-1).all()
    # q = 0: every visible compressed token has the same probability, so many blocks tie up to
    # rounding; the kernel sums in another order than the reference, so only the quality of the
    # selection is compared (exact ties: forced blocks and empty blocks, are in the cases above)
    q0 = torch.zeros_like(q)
    _, lse0 = reference.compressed_attention(q0, k, k, cu, cuc, 8, 4)
    ours, ref = _both(q0, k, lse0, cu, cuc, params)
    _assert_same_or_near_tie(q0, k, lse0, cu, cuc, params, ours, ref, ours.numel(), 1e-5)


def test_fp16_inputs():
    """fp16 q and k_c (the half-precision code path): an equally good selection everywhere."""
    params = (8, 4, 16, 4, 1, 2)
    q, k, lse, cu, cuc = _inputs([330, 20], 4, 2, 16, 8, 4, torch.float16, 21, q_scale=2.0)
    ours, ref = _both(q, k, lse, cu, cuc, params)
    _assert_same_or_near_tie(q, k, lse, cu, cuc, params, ours, ref, ours.shape[1] // 50, 1e-3)


def test_validation_fallback_and_dispatch():
    q, k, lse, cu, cuc = _inputs([40], 2, 1, 16, 8, 4, torch.float32, 1)
    args = (q, k, lse, cu, cuc, 8, 4, 16, 2, 1, 1)
    assert REGISTRY["select_blocks"].resolve("triton", q, args, {}) is tk.select_blocks
    # B/s = 3 is not a power of two: the kernel refuses it and the dispatcher runs the reference
    params = (8, 4, 12, 2, 1, 1)
    assert not tk.supports(q, k, lse, cu, cuc, *params)
    with pytest.raises(ValueError, match="does not take"):
        tk.select_blocks(q, k, lse, cu, cuc, *params)
    ours = ops.select_blocks(q, k, lse, cu, cuc, *params, backend="triton")
    assert torch.equal(ours, reference.select_blocks(q, k, lse, cu, cuc, *params))
    with pytest.raises(ValueError):
        tk.select_blocks(q, k, lse[:1], cu, cuc, 8, 4, 16, 2, 1, 1)


# ------------------------------------------------------------------------------------------------
# GPU only: real sizes
# ------------------------------------------------------------------------------------------------

GPU_PACKED = [1, 100, 4096, 777, 2048, 129, 1000, 31]
DEFAULTS = (32, 16, 64, 16, 1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 4, 16])
def test_gpu_packed_fp32_indices(G):
    q, k, lse, cu, cuc = _inputs(GPU_PACKED, G * 4, 4, 128, 32, 16, torch.float32, G)
    ours, ref = _both(q, k, lse, cu, cuc, DEFAULTS)
    _assert_same_or_near_tie(q, k, lse, cu, cuc, DEFAULTS, ours, ref, 8, 1e-5)


@pytest.mark.gpu
def test_gpu_64k_document_fp32_indices():
    q, k, lse, cu, cuc = _inputs([65536], 8, 2, 128, 32, 16, torch.float32, 64)
    ours, ref = _both(q, k, lse, cu, cuc, DEFAULTS)
    _assert_same_or_near_tie(q, k, lse, cu, cuc, DEFAULTS, ours, ref, 40, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("configs", ["safe", "tuned"])
@pytest.mark.parametrize("dtype,G,d,params", [
    (torch.bfloat16, 4, 128, DEFAULTS),
    (torch.float16, 16, 128, DEFAULTS),
    (torch.bfloat16, 3, 64, (32, 16, 128, 8, 1, 2)),
])
def test_gpu_half_large_logits(configs, dtype, G, d, params):
    q, k, lse, cu, cuc = _inputs(GPU_PACKED, G * 2, 2, d, 32, 16, dtype, G + d, q_scale=8.0)
    ours, ref = _both(q, k, lse, cu, cuc, params, _settings(topk_configs=configs))
    # half inputs: the mapping dot runs in tf32, so near-ties may flip more often
    n_rows = ours.shape[0] * ours.shape[1]
    _assert_same_or_near_tie(q, k, lse, cu, cuc, params, ours, ref, n_rows // 20, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,G", [(torch.bfloat16, 1), (torch.bfloat16, 4), (torch.float16, 16)])
def test_gpu_merges_and_tile_widths_give_the_same_indices(dtype, G):
    """Real sizes, top-16: both merges, with key tiles of 16 and 32 blocks, rank the same keys,
    so the indices are identical."""
    q, k, _, cu, cuc = _inputs([65536] if G == 4 else GPU_PACKED, G * 2, 2, 128, 32, 16, dtype,
                               30 + G)
    _, lse = ca.compressed_attention(q, k, k, cu, cuc, 32, 16)
    results = {}
    for merge, tile_blocks in (("sort", 16), ("bitonic", 16), ("bitonic", 32), ("sort", 32)):
        settings = _settings(topk_merge=merge, topk_tile_blocks=tile_blocks)
        results[merge, tile_blocks] = tk.select_blocks(q, k, lse, cu, cuc, *DEFAULTS,
                                                       settings=settings)
    for variant, idx in results.items():
        assert torch.equal(results["sort", 16], idx), variant


@pytest.mark.gpu
@pytest.mark.parametrize("configs", ["safe", "tuned"])
def test_gpu_deterministic_and_with_kernel_lse(configs):
    settings = _settings(topk_configs=configs)
    q, k, _, cu, cuc = _inputs(GPU_PACKED, 16, 4, 128, 32, 16, torch.bfloat16, 5)
    _, lse = ca.compressed_attention(q, k, k, cu, cuc, 32, 16)
    first = tk.select_blocks(q, k, lse, cu, cuc, *DEFAULTS, settings=settings)
    second = tk.select_blocks(q, k, lse, cu, cuc, *DEFAULTS, settings=settings)
    assert torch.equal(first, second)
    ref = reference.select_blocks(q, k, lse, cu, cuc, *DEFAULTS)
    assert (first != ref).any(-1).float().mean() <= 0.1
