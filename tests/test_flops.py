"""Analytical FLOPs: key counts against a per-query count, and the NSA/dense ratios of nsa.md."""

import numpy as np
import pytest

from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.flops import attention_keys, batch_flops, device_peak_flops

NSA = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, window=10)


def brute_force_keys(nsa: NSAConfig, length: int) -> dict[str, int]:
    keys = {"dense": 0, "compressed": 0, "selected": 0, "window": 0}
    for t in range(length):
        keys["dense"] += t + 1
        keys["compressed"] += sum(
            1 for i in range(length) if i * nsa.cmp_stride + nsa.cmp_kernel - 1 <= t
        )
        own = t // nsa.sel_block
        blocks = min(nsa.sel_topk, own + 1)
        keys["selected"] += (blocks - 1) * nsa.sel_block + (t - own * nsa.sel_block) + 1
        keys["window"] += min(nsa.window, t + 1)
    return keys


@pytest.mark.parametrize("lengths", [[1], [7, 8, 9], [100], [33, 64, 5]])
def test_key_counts_match_per_query_count(lengths):
    cfg = GPTConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=32, attention="nsa", nsa=NSA)
    expected = {name: 0 for name in ("dense", "compressed", "selected", "window")}
    for length in lengths:
        for name, count in brute_force_keys(NSA, length).items():
            expected[name] += count
    assert attention_keys(cfg, np.array(lengths)) == {k: float(v) for k, v in expected.items()}


def test_nsa_fraction_of_dense_attention_falls_with_context():
    cfg = GPTConfig(n_layer=1, n_head=16, n_kv_head=4, head_dim=128, d_model=2048)
    fractions = []
    for length in (8192, 32768, 65536, 131072):
        keys = attention_keys(cfg, np.array([length]))
        fractions.append((keys["compressed"] + keys["selected"] + keys["window"]) / keys["dense"])
    # docs/nsa.md: 43 %, 16.5 %, 12 % and 9.5 % with its rounder per-query approximations.
    for measured, quoted in zip(fractions, (0.43, 0.165, 0.12, 0.095), strict=True):
        assert 0.8 * quoted < measured < 1.05 * quoted
    assert fractions == sorted(fractions, reverse=True)


def test_batch_flops_dense_model_is_its_own_equivalent_and_nsa_is_cheaper_at_long_context():
    dense = GPTConfig(n_layer=2, n_head=8, n_kv_head=2, head_dim=128, d_model=1024,
                      attention="dense")
    flops = batch_flops(dense, np.array([4096, 4096]))
    assert flops.actual == flops.dense_equivalent > 0
    nsa = GPTConfig(n_layer=2, n_head=8, n_kv_head=2, head_dim=128, d_model=1024)
    long = batch_flops(nsa, np.array([65536]))
    assert long.actual < 0.5 * long.dense_equivalent
    assert long.dense_equivalent == batch_flops(
        GPTConfig(n_layer=2, n_head=8, n_kv_head=2, head_dim=128, d_model=1024,
                  attention="dense"), np.array([65536])
    ).dense_equivalent


def test_sliding_window_dense_model_counts_only_its_window():
    kw = dict(n_layer=2, n_head=8, n_kv_head=2, head_dim=128, d_model=1024, attention="dense")
    full = batch_flops(GPTConfig(**kw), np.array([8192]))
    windowed = batch_flops(GPTConfig(**kw, window=512), np.array([8192]))
    assert windowed.dense_equivalent == full.dense_equivalent
    assert windowed.actual < full.actual
    short = batch_flops(GPTConfig(**kw, window=512), np.array([300]))  # window covers it
    assert short.actual == short.dense_equivalent


def test_device_peaks():
    assert device_peak_flops("NVIDIA H200", "bf16-mixed") == pytest.approx(989e12)
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == pytest.approx(989e12)
    assert device_peak_flops("Some CPU", "32-true") is None
