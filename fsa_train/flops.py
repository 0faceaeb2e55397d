"""Analytical training FLOPs per batch, dense-equivalent and what NSA actually does.

PyTorch's FLOP counter cannot see Triton kernels, so MFU is computed from closed forms. The
convention is the usual "model FLOPs": forward plus a backward of twice the forward, no
recomputation counted. A multiply-add is 2 FLOPs. Attention forward costs ``4·d·H`` per (query,
key) pair (scores and the weighted sum of values); docs/nsa.md gives the keys each query visits
in each NSA branch. The top-k scoring pass recomputes ``q·k̃`` once (forward only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsa_train.config import GPTConfig

TRAIN_FACTOR = 3.0
"""Forward + backward (2× forward) in the model-FLOPs convention."""


@dataclass(frozen=True)
class BatchFlops:
    """Training FLOPs of one batch: if attention were dense, and as NSA computes it."""

    dense_equivalent: float
    actual: float


def matmul_params(cfg: GPTConfig, with_gates: bool = True) -> int:
    """Weights used in per-token matrix products (projections, MLP, NSA gates, LM head)."""
    d, H, h, D = cfg.head_dim, cfg.n_head, cfg.n_kv_head, cfg.d_model
    attention = D * (H * d) * 2 + D * (h * d) * 2
    if cfg.attention == "nsa" and with_gates:
        attention += D * 3 * H
    mlp = 3 * D * cfg.ffn_hidden
    return cfg.n_layer * (attention + mlp) + D * cfg.vocab_size


def _positions(doc_lengths: np.ndarray) -> np.ndarray:
    """Local position of every token of the concatenated documents."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(lengths.sum(), dtype=np.int64) - starts


def attention_keys(cfg: GPTConfig, doc_lengths: np.ndarray) -> dict[str, float]:
    """Sum over all queries of the keys each attention branch visits (per layer, per head)."""
    t = _positions(doc_lengths)
    keys = {"dense": float((t + 1).sum())}
    if cfg.attention != "nsa":
        if cfg.window is not None:
            keys["window"] = float(np.minimum(cfg.window, t + 1).sum())
        return keys
    n = cfg.nsa
    compressed = np.where(t >= n.cmp_kernel - 1, (t - n.cmp_kernel + 1) // n.cmp_stride + 1, 0)
    valid_blocks = t // n.sel_block + 1
    selected = (np.minimum(n.sel_topk, valid_blocks) - 1) * n.sel_block + t % n.sel_block + 1
    keys.update(
        compressed=float(compressed.sum()),
        selected=float(selected.sum()),
        window=float(np.minimum(n.window, t + 1).sum()),
    )
    return keys


def batch_flops(cfg: GPTConfig, doc_lengths: np.ndarray) -> BatchFlops:
    """Training FLOPs of a packed batch whose documents have ``doc_lengths`` tokens.

    ``dense_equivalent`` is the same model with dense causal attention (no gates, no
    compression); ``actual`` adds what NSA computes: gates, compression of keys and values, the
    three branches and the forward-only scoring pass of the top-k selection.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    tokens = float(lengths.sum())
    pair = 4.0 * cfg.head_dim * cfg.n_head * cfg.n_layer
    keys = attention_keys(cfg, lengths)
    dense_equivalent = (
        2.0 * matmul_params(cfg, with_gates=False) * tokens + pair * keys["dense"]
    ) * TRAIN_FACTOR
    if cfg.attention != "nsa":
        if cfg.window is None:
            return BatchFlops(dense_equivalent, dense_equivalent)
        windowed = (2.0 * matmul_params(cfg) * tokens + pair * keys["window"]) * TRAIN_FACTOR
        return BatchFlops(dense_equivalent, windowed)
    n, d, h = cfg.nsa, cfg.head_dim, cfg.n_kv_head
    compressed_tokens = float(np.maximum(0, (lengths - n.cmp_kernel) // n.cmp_stride + 1).sum())
    compression = 2.0 * 2 * h * (n.cmp_kernel * d) * d * compressed_tokens * cfg.n_layer
    branches = pair * (keys["compressed"] + keys["selected"] + keys["window"])
    scoring = 0.5 * pair * keys["compressed"]  # q·k̃ only, forward only
    actual = (2.0 * matmul_params(cfg) * tokens + compression + branches) * TRAIN_FACTOR
    return BatchFlops(dense_equivalent, actual + scoring)


def device_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of known accelerators for the training precision, or None if unknown."""
    name = device_name.upper()
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
    for key, bf16_peak in table.items():
        if key in name:
            if "32" in precision and "mixed" not in precision and "bf16" not in precision:
                return bf16_peak / 2  # tf32 matmul rate
            return bf16_peak
    return None
