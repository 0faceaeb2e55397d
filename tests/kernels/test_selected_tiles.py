"""The experimental tile-union selected attention against the pure-PyTorch reference.

CPU: the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes (fp32 tight, fp16 looser; the
interpreter computes bf16 wrongly), and the plan is checked against plain Python loops. GPU
(``-m gpu``): one real size in bf16, plus determinism.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

if not torch.cuda.is_available():  # before any @triton.jit runs (tests/conftest.py does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from selected_cases import DEVICE, check, make_inputs, run_ref  # noqa: E402

from fsa_train.kernels.triton import selected_tiles as st  # noqa: E402
from fsa_train.kernels.triton.selected_attention import random_selection  # noqa: E402


def selection(cu, h, topk, block, seed):
    return random_selection(cu, h, topk, block, torch.Generator(device=DEVICE).manual_seed(seed))


def run_ours(q, k, v, do, idx, cu, block, tile):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = st.selected_attention_tiles(q, k, v, idx, cu, block, tile=tile)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


LENGTHS = [37, 5, 50]


def test_plan_matches_python_loops():
    """Unions per (head, tile), tile and block ranges and the inverse index, against loops."""
    h, block, topk, tile = 2, 16, 3, 8
    cu = torch.tensor([0, 37, 37, 42, 92], dtype=torch.int32, device=DEVICE)  # an empty doc
    total = 92
    idx = selection(cu, h, topk, block, 3)
    idx[0, 40] = torch.tensor([0, 7, -1], dtype=torch.int32)  # block 7 is in the future
    idx[1, 50] = torch.tensor([0, 0, 1], dtype=torch.int32)  # a repeat
    idx[1, 60] = -1  # nothing selected
    plan = st.tile_plan(idx, cu, block, tile)
    assert plan.n_tiles_cap == total // tile + 4 and plan.n_blocks_cap == total // block + 4

    bounds = cu.tolist()
    ix = idx.cpu().tolist()
    tiles, blocks = [], []  # (t0, t1, doc start) / (k0, k1, local id)
    for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True):
        tiles += [(t0, min(t0 + tile, b1), b0) for t0 in range(b0, b1, tile)]
        blocks += [(k0, min(k0 + block, b1), (k0 - b0) // block) for k0 in range(b0, b1, block)]
    cap_t = plan.n_tiles_cap - len(tiles)
    assert plan.tile_t0.tolist() == [t[0] for t in tiles] + [0] * cap_t
    assert plan.tile_t1.tolist() == [t[1] for t in tiles] + [0] * cap_t
    assert plan.tile_s0[: len(tiles)].tolist() == [t[2] for t in tiles]
    cap_b = plan.n_blocks_cap - len(blocks)
    assert plan.block_k0.tolist() == [b[0] for b in blocks] + [0] * cap_b
    assert plan.block_k1.tolist() == [b[1] for b in blocks] + [0] * cap_b
    assert plan.block_u[: len(blocks)].tolist() == [b[2] for b in blocks]
    token_tile = [i for i, (t0, t1, _) in enumerate(tiles) for _ in range(t0, t1)]
    assert plan.token_tile.tolist() == token_tile

    union, count = plan.union.cpu(), plan.count.cpu()
    starts, btiles = plan.block_tiles_start.cpu(), plan.block_tiles.cpu()
    assert union.shape == (h, plan.n_tiles_cap, min(tile * topk, total // block + 1))
    for hh in range(h):
        sets = []
        for t0, t1, s0 in tiles:
            want = {b for t in range(t0, t1) for b in ix[hh][t] if 0 <= b <= (t - s0) // block}
            sets.append(want)
        for ti in range(plan.n_tiles_cap):
            want = sorted(sets[ti]) if ti < len(tiles) else []
            assert int(count[hh, ti]) == len(want)
            got = union[hh, ti].tolist()
            assert got == want + [-1] * (len(got) - len(want)), (hh, ti)
        n_pairs = 0
        for gb in range(plan.n_blocks_cap):
            if gb < len(blocks):
                doc_start = blocks[gb][0] - blocks[gb][2] * block
                u = blocks[gb][2]
                want = [ti for ti, (_, _, s0) in enumerate(tiles)
                        if s0 == doc_start and u in sets[ti]]
            else:
                want = []
            assert btiles[hh, starts[hh, gb] : starts[hh, gb + 1]].tolist() == want, (hh, gb)
            n_pairs += len(want)
        assert int(starts[hh, -1]) == n_pairs == sum(len(s) for s in sets)
        assert (btiles[hh, n_pairs:] == -1).all()


@pytest.mark.parametrize("G,tile", [(1, 16), (2, 8), (4, 4)])
def test_matches_reference_fp32(G, tile):
    h, block, topk = 2, 16, 3
    q, k, v, do, cu = make_inputs(LENGTHS, h, G, 16, torch.float32, seed=G)
    idx = selection(cu, h, topk, block, G)
    assert (idx == -1).any() and (idx[:, :, -1] >= 0).any()  # padded and full selections
    ours = run_ours(q, k, v, do, idx, cu, block, tile)
    check(ours, run_ref(q, k, v, do, idx, cu, block), 1e-4, f"G={G} tile={tile}")


def test_matches_reference_fp16_large_logits():
    """fp16 with q scaled x8 (logits far past fp16's exp range): finite and accurate."""
    h, G, block, tile = 2, 2, 16, 16
    q, k, v, do, cu = make_inputs([61, 34], h, G, 16, torch.float16, seed=10, q_scale=8.0)
    idx = selection(cu, h, 2, block, 3)
    ours = run_ours(q, k, v, do, idx, cu, block, tile)
    assert ours[0].dtype == torch.float16
    check(ours, run_ref(q, k, v, do, idx, cu, block), 5e-3, "fp16")


def test_popular_block_fp16():
    """Every token selects block 0 (and its own block): one block in every tile's union."""
    h, G, block, tile = 1, 4, 16, 4
    lengths = [70, 21]
    q, k, v, do, cu = make_inputs(lengths, h, G, 16, torch.float16, seed=5)
    total = q.shape[0]
    local = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    own = (local // block).to(torch.int32)
    idx = torch.full((h, total, 2), -1, dtype=torch.int32, device=DEVICE)
    idx[..., 0] = 0
    idx[..., 1] = torch.where(own > 0, own, -1)
    plan = st.tile_plan(idx, cu, block, tile)
    starts = plan.block_tiles_start[0]
    assert int(starts[1] - starts[0]) == -(-70 // tile)  # block 0 of doc 0: every tile
    check(run_ours(q, k, v, do, idx, cu, block, tile), run_ref(q, k, v, do, idx, cu, block),
          5e-3, "popular")


def test_short_documents_and_irregular_selections():
    """Documents shorter than a tile; ids past the query, repeats, and empty selections."""
    h, G, block, tile = 1, 1, 16, 32
    q, k, v, do, cu = make_inputs([3, 21, 1, 40], h, G, 16, torch.float32, seed=11)
    idx = selection(cu, h, 3, block, 2)
    idx[0, 1] = -1  # first document, token 1: nothing selected
    idx[0, 10] = torch.tensor([0, 1, -1], dtype=torch.int32)  # local 7: block 1 is its future
    idx[0, 25] = torch.tensor([0, 0, 0], dtype=torch.int32)  # repeats (the 1-token document)
    ref = run_ref(q, k, v, do, idx, cu, block)
    assert float(ref[0][1].abs().max()) == 0.0
    ours = run_ours(q, k, v, do, idx, cu, block, tile)
    check(ours, ref, 1e-4, "short docs")
    assert float(ours[0][1].abs().max()) == 0.0 and float(ours[1][1].abs().max()) == 0.0
    plan = st.tile_plan(idx, cu, block, tile)
    _, lse = st._forward(q, k, v, idx, plan, block, 0.25, tile)
    assert lse.shape == q.shape[:2] and bool(torch.isneginf(lse[1]).all())
    assert bool(torch.isfinite(lse[torch.arange(q.shape[0]) != 1]).all())


def test_noncontiguous_inputs():
    h, G, d, block, tile = 2, 2, 16, 16, 8
    q, k, v, do, cu = make_inputs([45, 30], h, G, d, torch.float32, seed=7)
    total = q.shape[0]
    qn = torch.empty(h * G, total, d, device=DEVICE).transpose(0, 1).copy_(q)
    kvbuf = torch.empty(total, h, 2, d, device=DEVICE)
    kvbuf[:, :, 0], kvbuf[:, :, 1] = k, v
    kn, vn = kvbuf[:, :, 0], kvbuf[:, :, 1]
    don = torch.empty(total, h * G, 2 * d, device=DEVICE)[..., ::2].copy_(do)
    idx = selection(cu, h, 3, block, 1)
    idx_nc = torch.empty(h, 3, total, dtype=torch.int32, device=DEVICE).transpose(1, 2).copy_(idx)
    assert not any(x.is_contiguous() for x in (qn, kn, vn, don, idx_nc))
    check(run_ours(qn, kn, vn, don, idx_nc, cu, block, tile), run_ref(q, k, v, do, idx, cu, block),
          1e-4, "strided")


def test_rejects_unsupported_inputs():
    q, k, v, _, cu = make_inputs([20], 2, 2, 16, torch.float32, seed=0)
    idx = selection(cu, 2, 2, 16, 0)
    f = st.selected_attention_tiles
    with pytest.raises(ValueError, match="tile"):
        f(q, k, v, idx, cu, 16, tile=4)  # 4 x G=2 < 16 rows
    with pytest.raises(ValueError, match="shapes"):
        f(q[:, :3], k, v, idx, cu, 16, tile=8)  # H not a multiple of h
    with pytest.raises(ValueError, match="fp16"):
        f(q.double(), k.double(), v.double(), idx, cu, 16, tile=8)
    with pytest.raises(ValueError, match="block"):
        f(q, k, v, idx, cu, 8, tile=8)
    with pytest.raises(ValueError, match="head dim"):
        f(q[..., :8], k[..., :8], v[..., :8], idx, cu, 16, tile=8)
    with pytest.raises(ValueError, match="idx"):
        f(q, k, v, idx[:1], cu, 16, tile=8)
    with pytest.raises(ValueError, match="idx"):
        f(q, k, v, idx.float(), cu, 16, tile=8)


@pytest.mark.gpu
def test_gpu_real_size_bf16():
    h, G, d, block, topk, tile = 2, 4, 128, 64, 16, 16
    q, k, v, do, cu = make_inputs([8192], h, G, d, torch.bfloat16, seed=1)
    idx = selection(cu, h, topk, block, 1)
    ref = run_ref(q, k, v, do, idx, cu, block, dtype=torch.float32)
    first = run_ours(q, k, v, do, idx, cu, block, tile)
    assert first[0].dtype == torch.bfloat16
    check(first, ref, 1e-2, "gpu bf16")
    second = run_ours(q, k, v, do, idx, cu, block, tile)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # deterministic
