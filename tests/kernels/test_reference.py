"""Tests of the pure-PyTorch NSA reference (fsa_train/kernels/reference.py: the naive ops of
fsa_train/kernels/ops/<op>/naive.py).

The reference is checked against a deliberately naive fp64 implementation written here from
docs/nsa.md alone: Python loops over documents, tokens and heads, one softmax per (token, head),
block scores from the overlap *length* of each window with each block (not the histogram rule the
reference uses). Then the properties the spec states are tested one by one: top-k rules, overlap
weights, gradients (gradcheck), the effect of ``pe``, isolation of packed documents, no NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from fsa_testing import cu_seqlens

from fsa_train import kernels
from fsa_train.config import NSAConfig
from fsa_train.kernels import CompressionParams, naive_attention, reference

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def rope(x: torch.Tensor, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
    """Half-rotation RoPE, base 10000, at the given positions (the bound is not needed here)."""
    half = x.shape[-1] // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=F64) / half)
    angle = positions.to(F64)[:, None] * inv_freq[None, :]
    cos = angle.cos()[:, None, :].to(x.dtype)
    sin = angle.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def no_rope(
    x: torch.Tensor, positions: torch.Tensor, max_position: int | None = None
) -> torch.Tensor:
    return x


def make_inputs(lengths, H, h, d, kernel, seed=0, dtype=F64):
    """Random q, k, v, gates and compression parameters for a packed batch."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)
    return dict(
        q=r(total, H, d),
        k=r(total, h, d),
        v=r(total, h, d),
        gates=torch.rand(total, H, 3, generator=g, dtype=F64).to(dtype),
        w_k=r(h, kernel * d, d, s=1 / math.sqrt(kernel * d)),
        w_v=r(h, kernel * d, d, s=1 / math.sqrt(kernel * d)),
        pe=r(h, kernel, d, s=0.5),
        cu=cu_seqlens(lengths, device="cpu"),
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the reference to split documents into several query chunks."""
    monkeypatch.setattr(naive_attention, "SCORE_BUDGET", 1)
    monkeypatch.setattr(naive_attention, "MIN_CHUNK", 7)
    monkeypatch.setattr(naive_attention, "MAX_CHUNK", 7)


# --------------------------------------------------------------------------------------------
# naive fp64 implementation, straight from docs/nsa.md
# --------------------------------------------------------------------------------------------


def docs_of(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:], strict=True))


def naive_compress(x, weight, pe, cu, l, s):
    h = x.shape[1]
    rows, cu_c = [], [0]
    for b0, b1 in docs_of(cu):
        L = b1 - b0
        n_c = (L - l) // s + 1 if L >= l else 0
        for i in range(n_c):
            heads = []
            for head in range(h):
                parts = []
                for j in range(l):
                    token = x[b0 + i * s + j, head]
                    parts.append(token + pe[head, j] if pe is not None else token)
                heads.append(torch.cat(parts) @ weight[head])
            rows.append(torch.stack(heads))
        cu_c.append(cu_c[-1] + n_c)
    out = torch.stack(rows) if rows else x.new_zeros(0, h, weight.shape[-1])
    return out, torch.tensor(cu_c, dtype=torch.int32)


def naive_softmax(qvec, keys, values, scale):
    """(output, lse) of one query over a list of key/value rows; (0, -inf) when there is none."""
    if keys.shape[0] == 0:
        return values.new_zeros(values.shape[-1]), -math.inf
    logits = (keys @ qvec) * scale
    return torch.softmax(logits, 0) @ values, torch.logsumexp(logits, 0).item()


def naive_compressed(q, k_c, v_c, cu, cu_c, l, s, scale):
    total, H, d = q.shape
    G = H // k_c.shape[1]
    o = torch.zeros(total, H, v_c.shape[-1], dtype=F64)
    lse = torch.full((H, total), -math.inf, dtype=F64)
    for (b0, b1), (c0, c1) in zip(docs_of(cu), docs_of(cu_c), strict=True):
        for t in range(b1 - b0):
            visible = [c0 + i for i in range(c1 - c0) if t >= i * s + l - 1]
            for j in range(H):
                o[b0 + t, j], lse[j, b0 + t] = naive_softmax(
                    q[b0 + t, j], k_c[visible, j // G], v_c[visible, j // G], scale
                )
    return o, lse


def naive_select(q, k_c, lse, cu, cu_c, l, s, B, T, init, local, scale):
    total, H, d = q.shape
    h = k_c.shape[1]
    G = H // h
    idx = torch.full((h, total, T), -1, dtype=torch.int32)
    for (b0, b1), (c0, c1) in zip(docs_of(cu), docs_of(cu_c), strict=True):
        n_c = c1 - c0
        # overlap length / s of window i with block b, for every block of the document
        n_blocks = (b1 - b0 - 1) // B + 1
        overlap = torch.zeros(n_blocks, n_c, dtype=F64)
        for b in range(n_blocks):
            for i in range(n_c):
                length = min(i * s + l, b * B + B) - max(i * s, b * B)
                overlap[b, i] = max(0, length) / s
        for t in range(b1 - b0):
            own = t // B
            visible = [i for i in range(n_c) if t >= i * s + l - 1]
            for kv in range(h):
                p = torch.zeros(n_c, dtype=F64)
                for j in range(kv * G, kv * G + G):
                    if lse[j, b0 + t] == -math.inf or not visible:
                        continue
                    logits = scale * (k_c[[c0 + i for i in visible], kv] @ q[b0 + t, j])
                    p[visible] += torch.exp(logits - lse[j, b0 + t])
                score = (overlap[: own + 1] @ p).tolist()
                for b in range(own + 1):
                    if b < init or b > own - local:
                        score[b] = math.inf
                ranked = sorted(range(own + 1), key=lambda b: (-score[b], b))
                chosen = sorted(ranked[:T])
                idx[kv, b0 + t, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return idx


def naive_selected(q, k, v, idx, cu, B, scale):
    total, H, d = q.shape
    G = H // k.shape[1]
    o = torch.zeros(total, H, v.shape[-1], dtype=F64)
    for b0, b1 in docs_of(cu):
        for t in range(b1 - b0):
            for j in range(H):
                blocks = {b for b in idx[j // G, b0 + t].tolist() if b >= 0}
                keys = [b0 + u for u in range(t + 1) if u // B in blocks]
                kv = j // G
                o[b0 + t, j], _ = naive_softmax(q[b0 + t, j], k[keys, kv], v[keys, kv], scale)
    return o


def naive_window(q, k, v, cu, W, scale):
    total, H, d = q.shape
    G = H // k.shape[1]
    o = torch.zeros(total, H, v.shape[-1], dtype=F64)
    for b0, b1 in docs_of(cu):
        for t in range(b1 - b0):
            first = 0 if W is None else max(0, t - W + 1)
            keys = list(range(b0 + first, b0 + t + 1))
            for j in range(H):
                kv = j // G
                o[b0 + t, j], _ = naive_softmax(q[b0 + t, j], k[keys, kv], v[keys, kv], scale)
    return o


def local_positions(cu, total):
    pos = torch.zeros(total, dtype=torch.int64)
    for b0, b1 in docs_of(cu):
        pos[b0:b1] = torch.arange(b1 - b0)
    return pos


def naive_nsa(inp, cfg, rope_fn, scale):
    """Every branch and the gated output, naive; returns a dict."""
    cu, q, k, v = inp["cu"], inp["q"], inp["k"], inp["v"]
    l, s = cfg.cmp_kernel, cfg.cmp_stride
    k_c, cu_c = naive_compress(k, inp["w_k"], inp["pe"], cu, l, s)
    v_c, _ = naive_compress(v, inp["w_v"], None, cu, l, s)
    q_r = rope_fn(q, local_positions(cu, q.shape[0]))
    k_r = rope_fn(k, local_positions(cu, k.shape[0]))
    k_c_r = rope_fn(k_c, local_positions(cu_c, k_c.shape[0]) * s)
    o_cmp, lse = naive_compressed(q_r, k_c_r, v_c, cu, cu_c, l, s, scale)
    idx = naive_select(
        q_r,
        k_c_r,
        lse,
        cu,
        cu_c,
        l,
        s,
        cfg.sel_block,
        cfg.sel_topk,
        cfg.init_blocks,
        cfg.local_blocks,
        scale,
    )
    o_sel = naive_selected(q_r, k_r, v, idx, cu, cfg.sel_block, scale)
    o_win = naive_window(q_r, k_r, v, cu, cfg.window, scale)
    gates = inp["gates"]
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win
    return dict(
        k_c=k_c,
        v_c=v_c,
        cu_c=cu_c,
        q_r=q_r,
        k_r=k_r,
        k_c_r=k_c_r,
        o_cmp=o_cmp,
        lse=lse,
        idx=idx,
        o_sel=o_sel,
        o_win=o_win,
        out=out,
    )


def run_nsa(inp, cfg, rope_fn=rope, scale=None, **overrides):
    x = {**inp, **overrides}
    params = CompressionParams(x["w_k"], x["w_v"], x["pe"])
    return kernels.nsa_attention(
        x["q"],
        x["k"],
        x["v"],
        x["gates"],
        params,
        x["cu"],
        cfg,
        rope_fn,
        scale,
        backend="reference",
    )


# --------------------------------------------------------------------------------------------
# reference == naive
# --------------------------------------------------------------------------------------------


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def check_against_naive(lengths, H, h, d, cfg, seed, scale=None):
    inp = make_inputs(lengths, H, h, d, cfg.cmp_kernel, seed=seed)
    sc = 1 / math.sqrt(d) if scale is None else scale
    want = naive_nsa(inp, cfg, rope, sc)
    cu, l, s = inp["cu"], cfg.cmp_kernel, cfg.cmp_stride

    k_c, cu_c = reference.compress(inp["k"], inp["w_k"], inp["pe"], cu, l, s)
    v_c, cu_c_v = reference.compress(inp["v"], inp["w_v"], None, cu, l, s)
    assert cu_c.dtype == torch.int32
    assert torch.equal(cu_c, want["cu_c"]) and torch.equal(cu_c_v, want["cu_c"])
    close(k_c, want["k_c"])
    close(v_c, want["v_c"])

    q_r, k_r, k_c_r = want["q_r"], want["k_r"], want["k_c_r"]
    o_cmp, lse = reference.compressed_attention(q_r, k_c_r, v_c, cu, cu_c, l, s, scale)
    close(o_cmp, want["o_cmp"])
    assert torch.equal(torch.isinf(lse), torch.isinf(want["lse"]))
    close(lse, want["lse"])

    idx = reference.select_blocks(
        q_r,
        k_c_r,
        lse,
        cu,
        cu_c,
        l,
        s,
        cfg.sel_block,
        cfg.sel_topk,
        cfg.init_blocks,
        cfg.local_blocks,
        scale,
    )
    assert idx.dtype == torch.int32 and idx.shape == (h, sum(lengths), cfg.sel_topk)
    assert torch.equal(idx, want["idx"])

    o_sel = reference.selected_attention(q_r, k_r, inp["v"], want["idx"], cu, cfg.sel_block, scale)
    close(o_sel, want["o_sel"])
    o_win = reference.window_attention(q_r, k_r, inp["v"], cu, cfg.window, scale)
    close(o_win, want["o_win"])
    o_dense = reference.window_attention(q_r, k_r, inp["v"], cu, None, scale)
    close(o_dense, naive_window(q_r, k_r, inp["v"], cu, None, sc))

    close(run_nsa(inp, cfg, scale=scale), want["out"])


SMALL = [
    NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=6
    ),
    NSAConfig(
        cmp_kernel=8,
        cmp_stride=4,
        sel_block=16,
        sel_topk=4,
        init_blocks=1,
        local_blocks=2,
        window=16,
    ),
    NSAConfig(
        cmp_kernel=4, cmp_stride=4, sel_block=8, sel_topk=4, init_blocks=2, local_blocks=1, window=9
    ),
]


@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16])
def test_matches_naive(G, d, request):
    h = 2 if G <= 4 else 1
    cfg = SMALL[(G + d // 32) % len(SMALL)]
    if d == 64:  # the same comparison with several query chunks per document
        request.getfixturevalue("small_chunks")
    # a document shorter than l, lengths not multiples of s or B, several documents
    lengths = [5, 37, 50] if G != 3 else [50, 3, 41, 9]
    check_against_naive(lengths, G * h, h, d, cfg, seed=G * 100 + d)


def test_matches_naive_default_geometry():
    """l=32, s=16, B=64 (weights 1,2,2,2,1) with documents spanning several blocks."""
    cfg = NSAConfig(
        cmp_kernel=32,
        cmp_stride=16,
        sel_block=64,
        sel_topk=4,
        init_blocks=1,
        local_blocks=2,
        window=40,
    )
    check_against_naive([20, 330, 33, 150], 4, 2, 32, cfg, seed=7)


def test_matches_naive_custom_scale(small_chunks):
    cfg = SMALL[0]
    check_against_naive([30, 19], 4, 2, 32, cfg, seed=3, scale=0.3)


# --------------------------------------------------------------------------------------------
# overlap weights and top-k rules
# --------------------------------------------------------------------------------------------


def test_overlap_weights_default_geometry():
    assert reference.overlap_weights(32, 16, 64) == [1, 2, 2, 2, 1]
    n_c, n_blocks = 20, 5
    for i in range(n_c):
        p = torch.zeros(n_c, dtype=F64)
        p[i] = 1.0
        scores = reference.block_scores(p, 32, 16, 64, n_blocks)
        want = torch.zeros(n_blocks, dtype=F64)
        for b in range(n_blocks):
            if 4 * b - 1 <= i <= 4 * b + 3:
                want[b] = [1, 2, 2, 2, 1][i - (4 * b - 1)]
        assert torch.equal(scores, want), i


@pytest.mark.parametrize(
    "l,s,B", [(32, 16, 64), (8, 4, 8), (8, 4, 16), (4, 4, 8), (16, 4, 8), (12, 4, 8), (8, 8, 8)]
)
def test_overlap_rule_is_overlap_length(l, s, B):
    """The histogram rule equals (overlap length of window and block) / s, including at the ends."""
    n_c, n_blocks = 11, 7
    g = torch.Generator().manual_seed(l * 100 + B)
    p = torch.rand(3, n_c, generator=g, dtype=F64)
    got = reference.block_scores(p, l, s, B, n_blocks)
    want = torch.zeros(3, n_blocks, dtype=F64)
    for b in range(n_blocks):
        for i in range(n_c):
            want[:, b] += max(0, min(i * s + l, b * B + B) - max(i * s, b * B)) / s * p[:, i]
    close(got, want, 1e-12)


def select(q, k_c, cu, cfg, scale=None):
    """Compressed attention then top-k with the reference (k_c used as already rotated)."""
    cu_c = reference.compressed_lengths(cu, cfg.cmp_kernel, cfg.cmp_stride)
    _, lse = reference.compressed_attention(
        q, k_c, k_c, cu, cu_c, cfg.cmp_kernel, cfg.cmp_stride, scale
    )
    return reference.select_blocks(
        q,
        k_c,
        lse,
        cu,
        cu_c,
        cfg.cmp_kernel,
        cfg.cmp_stride,
        cfg.sel_block,
        cfg.sel_topk,
        cfg.init_blocks,
        cfg.local_blocks,
        scale,
    )


def compressed_keys(lengths, h, d, cfg, seed):
    cu = cu_seqlens(lengths, device="cpu")
    n_c = int(reference.compressed_lengths(cu, cfg.cmp_kernel, cfg.cmp_stride)[-1])
    g = torch.Generator().manual_seed(seed)
    return cu, torch.randn(n_c, h, d, generator=g, dtype=F64)


@pytest.mark.parametrize("init,local,topk", [(1, 2, 4), (2, 1, 3), (0, 1, 2), (1, 3, 5)])
def test_topk_structure(init, local, topk):
    """Forced blocks present, valid ids ascending and causal, -1 padding only at the end."""
    cfg = NSAConfig(
        cmp_kernel=8,
        cmp_stride=4,
        sel_block=8,
        sel_topk=topk,
        init_blocks=init,
        local_blocks=local,
        window=8,
    )
    lengths = [70, 6, 45]
    H, h, d = 6, 2, 16
    cu, k_c = compressed_keys(lengths, h, d, cfg, seed=init * 10 + local)
    q = torch.randn(sum(lengths), H, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    idx = select(q, k_c, cu, cfg)
    for b0, b1 in docs_of(cu):
        for t in range(b1 - b0):
            own = t // cfg.sel_block
            for kv in range(h):
                row = idx[kv, b0 + t].tolist()
                valid = [b for b in row if b >= 0]
                n_valid = min(topk, own + 1)
                assert len(valid) == n_valid
                assert row == valid + [-1] * (topk - n_valid)  # padding at the end
                assert valid == sorted(set(valid))  # ascending, no duplicates
                assert all(0 <= b <= own for b in valid)  # document-local and causal
                forced = {b for b in range(own + 1) if b < init or b > own - local}
                assert forced <= set(valid)


def test_topk_pads_when_few_blocks():
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=4, init_blocks=1, local_blocks=1, window=8
    )
    cu, k_c = compressed_keys([20], 1, 8, cfg, seed=0)
    q = torch.randn(20, 2, 8, dtype=F64)
    idx = select(q, k_c, cu, cfg)
    assert idx[0, 0].tolist() == [0, -1, -1, -1]
    assert idx[0, 7].tolist() == [0, -1, -1, -1]
    assert idx[0, 8].tolist() == [0, 1, -1, -1]
    assert idx[0, 19].tolist() == [0, 1, 2, -1]


def test_topk_ids_are_local_to_each_document():
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=8
    )
    lengths = [37, 29]
    cu, k_c = compressed_keys(lengths, 1, 8, cfg, seed=1)
    q = torch.randn(sum(lengths), 3, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    idx = select(q, k_c, cu, cfg)
    assert idx[0, 37].tolist() == [0, -1, -1]  # the second document restarts at block 0
    assert idx[0, 37 + 8].tolist() == [0, 1, -1]
    second = idx[0, 37:]
    assert int(second.max()) == (29 - 1) // 8
    # the same document alone gives the same ids
    first_c = int(reference.compressed_lengths(cu, 8, 4)[1])
    alone = select(q[37:], k_c[first_c:], cu_seqlens([29], device="cpu"), cfg)
    assert torch.equal(alone[0], second)


def test_topk_ties_go_to_lower_block_ids():
    """Zero queries: every visible compressed token gets the same probability, so all blocks whose
    windows are all visible tie; the lowest ids must win."""
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=8
    )
    cu, k_c = compressed_keys([64], 2, 8, cfg, seed=3)
    q = torch.zeros(64, 4, 8, dtype=F64)
    idx = select(q, k_c, cu, cfg)
    # t = 40: valid blocks 0..5, forced 0 and 5; blocks 1, 2, 3 see all three windows
    # (2b-1, 2b, 2b+1), block 4 only two of them: the tie among 1..3 goes to block 1.
    assert idx[:, 40].tolist() == [[0, 1, 5], [0, 1, 5]]
    assert idx[:, 63].tolist() == [[0, 1, 7], [0, 1, 7]]
    want = naive_select(
        q,
        k_c,
        select_lse(q, k_c, cu, cfg),
        cu,
        reference.compressed_lengths(cu, 8, 4),
        8,
        4,
        8,
        3,
        1,
        1,
        1 / math.sqrt(8),
    )
    assert torch.equal(idx, want)


def select_lse(q, k_c, cu, cfg):
    cu_c = reference.compressed_lengths(cu, cfg.cmp_kernel, cfg.cmp_stride)
    return reference.compressed_attention(q, k_c, k_c, cu, cu_c, cfg.cmp_kernel, cfg.cmp_stride)[1]


def test_topk_group_sums_all_heads():
    """The selection of a KV head depends on every query head of its group, not only the first."""
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=8
    )
    cu, k_c = compressed_keys([64], 1, 8, cfg, seed=4)
    q = torch.zeros(64, 2, 8, dtype=F64)
    q[:, 1] = 4.0 * k_c[5, 0]  # head 1 points at compressed token 5 (block 2 and 3)
    idx = select(q, k_c, cu, cfg)
    assert idx[0, 40].tolist() == [0, 2, 5] or idx[0, 40].tolist() == [0, 3, 5]
    q[:, 1] = 0.0
    assert select(q, k_c, cu, cfg)[0, 40].tolist() == [0, 1, 5]


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_gradcheck_compress():
    inp = make_inputs([3, 11, 9], 2, 2, 3, 4, seed=11)
    x, w, pe = leaf(inp["k"]), leaf(inp["w_k"]), leaf(inp["pe"])
    fn = lambda x, w, pe: reference.compress(x, w, pe, inp["cu"], 4, 2)[0]
    assert torch.autograd.gradcheck(fn, (x, w, pe))
    fn_v = lambda x, w: reference.compress(x, w, None, inp["cu"], 4, 2)[0]
    assert torch.autograd.gradcheck(fn_v, (x, w))


def test_gradcheck_compressed_attention():
    # a document shorter than l: queries with no visible key
    cu = cu_seqlens([3, 13, 8], device="cpu")
    cu_c = reference.compressed_lengths(cu, 4, 2)
    n_c = int(cu_c[-1])
    g = torch.Generator().manual_seed(12)
    q = leaf(torch.randn(24, 4, 3, generator=g, dtype=F64))
    k_c = leaf(torch.randn(n_c, 2, 3, generator=g, dtype=F64))
    v_c = leaf(torch.randn(n_c, 2, 3, generator=g, dtype=F64))

    def fn(q, k_c, v_c):
        o, lse = reference.compressed_attention(q, k_c, v_c, cu, cu_c, 4, 2)
        return o, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k_c, v_c))


def test_gradcheck_selected_attention():
    cu = cu_seqlens([13, 9], device="cpu")
    g = torch.Generator().manual_seed(13)
    q = leaf(torch.randn(22, 4, 3, generator=g, dtype=F64))
    k = leaf(torch.randn(22, 2, 3, generator=g, dtype=F64))
    v = leaf(torch.randn(22, 2, 3, generator=g, dtype=F64))
    pos = local_positions(cu, 22)
    idx = torch.randint(-1, 4, (2, 22, 2), generator=g)
    idx = torch.minimum(idx, (pos // 4)[None, :, None]).to(torch.int32)  # any -1 / repeats
    fn = lambda q, k, v: reference.selected_attention(q, k, v, idx, cu, 4)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("window", [3, None])
def test_gradcheck_window_attention(window, small_chunks):
    cu = cu_seqlens([10, 1, 6], device="cpu")
    g = torch.Generator().manual_seed(14)
    q = leaf(torch.randn(17, 2, 3, generator=g, dtype=F64))
    k = leaf(torch.randn(17, 1, 3, generator=g, dtype=F64))
    v = leaf(torch.randn(17, 1, 3, generator=g, dtype=F64))
    fn = lambda q, k, v: reference.window_attention(q, k, v, cu, window)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_nsa_attention():
    cfg = NSAConfig(
        cmp_kernel=4, cmp_stride=2, sel_block=4, sel_topk=2, init_blocks=1, local_blocks=1, window=3
    )
    inp = make_inputs([3, 14, 9], 4, 2, 4, 4, seed=15)
    names = ["q", "k", "v", "w_k", "w_v", "pe", "gates"]
    leaves = [leaf(inp[n]) for n in names]

    def fn(*tensors):
        return run_nsa(inp, cfg, rope, **dict(zip(names, tensors, strict=True)))

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=True)
    out = fn(*leaves)
    out.backward(torch.randn_like(out))
    for name, t in zip(names, leaves, strict=True):
        assert t.grad is not None and bool(t.grad.abs().sum() > 0), name


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


def test_pe_matters_only_through_rope():
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=6
    )
    inp = make_inputs([40, 27], 4, 2, 16, 8, seed=16)
    other_pe = inp["pe"] + torch.randn_like(inp["pe"])
    with_rope = (run_nsa(inp, cfg, rope), run_nsa(inp, cfg, rope, pe=other_pe))
    assert (with_rope[0] - with_rope[1]).abs().max() > 1e-3
    # without RoPE, pe adds one constant vector to every compressed key of a head: no effect
    without = (run_nsa(inp, cfg, no_rope), run_nsa(inp, cfg, no_rope, pe=other_pe))
    close(without[0], without[1], 1e-9)


def perturb_document(inp, doc):
    b0, b1 = docs_of(inp["cu"])[doc]
    out = dict(inp)
    for name in ("q", "k", "v", "gates"):
        t = inp[name].clone()
        t[b0:b1] = t[b0:b1] + torch.randn_like(t[b0:b1])
        out[name] = t
    return out


def test_packing_isolation():
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=6
    )
    lengths = [30, 25, 6, 33]
    inp = make_inputs(lengths, 4, 2, 8, 8, seed=17)
    changed = perturb_document(inp, 1)
    cu = inp["cu"]
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[30:55] = False
    cu_c = reference.compressed_lengths(cu, 8, 4).tolist()
    keep_c = torch.ones(cu_c[-1], dtype=torch.bool)
    keep_c[cu_c[1] : cu_c[2]] = False

    def branches(x):
        k_c, cu_c = reference.compress(x["k"], x["w_k"], x["pe"], cu, 8, 4)
        v_c, _ = reference.compress(x["v"], x["w_v"], None, cu, 8, 4)
        o_cmp, lse = reference.compressed_attention(x["q"], k_c, v_c, cu, cu_c, 8, 4)
        idx = reference.select_blocks(x["q"], k_c, lse, cu, cu_c, 8, 4, 8, 3, 1, 1)
        o_sel = reference.selected_attention(x["q"], x["k"], x["v"], idx, cu, 8)
        o_win = reference.window_attention(x["q"], x["k"], x["v"], cu, 6)
        return k_c, v_c, o_cmp, lse.T, idx.transpose(0, 1), o_sel, o_win, run_nsa(x, cfg)

    before, after = branches(inp), branches(changed)
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        mask = keep_c if i < 2 else keep
        assert torch.equal(a[mask], b[mask]), i
        if i != 4:  # the perturbation does reach the perturbed document (idx may not change)
            assert not torch.equal(a[~mask], b[~mask]), i


def test_no_nan_without_visible_compressed_key():
    # l = 8: the first document has no compressed token at all
    cu = cu_seqlens([5, 20], device="cpu")
    cu_c = reference.compressed_lengths(cu, 8, 4)
    n_c = int(cu_c[-1])
    g = torch.Generator().manual_seed(18)
    q = leaf(torch.randn(25, 4, 8, generator=g))
    k_c = leaf(torch.randn(n_c, 2, 8, generator=g))
    v_c = leaf(torch.randn(n_c, 2, 8, generator=g))
    o, lse = reference.compressed_attention(q, k_c, v_c, cu, cu_c, 8, 4)
    blind = torch.tensor([t < 7 for t in local_positions(cu, 25).tolist()])
    assert torch.equal(o[blind], torch.zeros_like(o[blind]))
    assert bool(torch.isneginf(lse[:, blind]).all()) and bool(torch.isfinite(lse[:, ~blind]).all())
    assert lse.dtype == torch.float32
    (o * torch.randn_like(o)).sum().backward()
    for t in (q, k_c, v_c):
        assert bool(torch.isfinite(t.grad).all())
    assert torch.equal(q.grad[blind], torch.zeros_like(q.grad[blind]))


def test_nsa_no_nan_on_short_documents():
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=4
    )
    inp = make_inputs([1, 7, 3], 2, 1, 8, 8, seed=19, dtype=torch.float32)
    tensors = {n: leaf(inp[n]) for n in ("q", "k", "v", "w_k", "w_v", "pe", "gates")}
    out = run_nsa(inp, cfg, **tensors)
    out.sum().backward()
    assert bool(torch.isfinite(out).all())
    for name, t in tensors.items():
        assert t.grad is None or bool(torch.isfinite(t.grad).all()), name


def test_low_precision_and_non_contiguous():
    """bf16 and fp32 inputs (fp32 statistics) stay close to fp64; strided inputs are accepted."""
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=6
    )
    inp = make_inputs([40, 29], 4, 2, 16, 8, seed=20)
    want = run_nsa(inp, cfg)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        low = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in inp.items()}
        out = run_nsa(low, cfg)
        assert out.dtype == dtype
        err = (out.double() - want).norm() / want.norm()
        assert err < tol, (dtype, float(err))
    # strided views: heads-major storage, transposed back
    strided = dict(inp)
    for name in ("q", "k", "v"):
        strided[name] = inp[name].transpose(0, 1).contiguous().transpose(0, 1)
        assert not strided[name].is_contiguous()
    close(run_nsa(strided, cfg), want, 1e-12)
    idx = torch.zeros(2, 69, 3, dtype=torch.int32).transpose(0, 1).contiguous().transpose(0, 1)
    o = reference.selected_attention(strided["q"], strided["k"], strided["v"], idx, inp["cu"], 8)
    close(
        o,
        reference.selected_attention(inp["q"], inp["k"], inp["v"], idx.contiguous(), inp["cu"], 8),
        1e-12,
    )


def test_chunking_does_not_change_results(monkeypatch):
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=5
    )
    inp = make_inputs([45, 31], 4, 2, 8, 8, seed=21)
    tensors = {n: leaf(inp[n]) for n in ("q", "k", "v", "w_k", "w_v", "pe", "gates")}
    out = run_nsa(inp, cfg, **tensors)
    out.backward(torch.ones_like(out))
    grads = {n: t.grad.clone() for n, t in tensors.items()}
    monkeypatch.setattr(naive_attention, "SCORE_BUDGET", 1)
    monkeypatch.setattr(naive_attention, "MIN_CHUNK", 6)
    tensors = {n: leaf(inp[n]) for n in tensors}
    out_chunked = run_nsa(inp, cfg, **tensors)
    out_chunked.backward(torch.ones_like(out))
    close(out_chunked, out, 1e-12)
    for n, t in tensors.items():
        close(t.grad, grads[n], 1e-12)


def test_dispatch_reference_backend():
    inp = make_inputs([12], 2, 1, 8, 4, seed=22)
    got = kernels.window_attention(inp["q"], inp["k"], inp["v"], inp["cu"], 4, backend="reference")
    close(got, reference.window_attention(inp["q"], inp["k"], inp["v"], inp["cu"], 4), 0.0)


def test_nsa_with_the_models_precomputed_varlen_is_the_same():
    """The batch indices the model computes once (nsa_varlen) give exactly the per-call result."""
    cfg = NSAConfig(
        cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1, local_blocks=1, window=6
    )
    inp = make_inputs([21, 3, 40], 4, 2, 8, 8, seed=23)
    total = inp["q"].shape[0]
    varlen = kernels.nsa_varlen(inp["cu"], total, cfg)
    assert torch.equal(varlen.cu_seqlens_c, reference.compressed_lengths(inp["cu"], 8, 4))
    assert varlen.positions_c.shape == (total // 4,)
    params = CompressionParams(inp["w_k"], inp["w_v"], inp["pe"])
    shared = kernels.nsa_attention(inp["q"], inp["k"], inp["v"], inp["gates"], params, inp["cu"],
                                   cfg, rope, backend="reference", varlen=varlen)
    assert torch.equal(shared, run_nsa(inp, cfg))
