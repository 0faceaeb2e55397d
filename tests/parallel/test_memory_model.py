"""The memory model of benchmarks/memory_model.py against what was measured: the bytes per token
per layer against the H200's saved-tensor counts by node, the step's peak against the H200's
peaks (one GPU), and activation checkpointing on the CPU (a checkpointed block keeps nothing
but its input)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks import memory_model as mm
from benchmarks.memory import PackedStorages
from fsa_train.config import GPTConfig, NSAConfig

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _h200_block() -> tuple[GPTConfig, dict[str, dict]]:
    report = json.loads((RESULTS / "memory_h200_2026-12-03.json").read_text())
    model = {k: v for k, v in report["model"].items() if k in
             {f.name for f in dataclasses.fields(GPTConfig)}}
    return GPTConfig(**model), {row["mode"]: row for row in report["rows"]}


MODES = {"dense": {"attention": "dense"}, "nsa": {"attention": "nsa"},
         "nsa_block": {"attention": "nsa", "selection": "block"}}


def _variant(cfg: GPTConfig, mode: str) -> GPTConfig:
    fields = dict(MODES[mode])
    selection = fields.pop("selection", "token")
    return dataclasses.replace(cfg, nsa=dataclasses.replace(cfg.nsa, selection=selection),
                               **fields)


@pytest.mark.parametrize("mode", list(MODES))
def test_layer_bytes_are_the_h200_block_counts(mode):
    cfg, rows = _h200_block()
    row = rows[mode]
    cfg = _variant(cfg, mode)
    parts = mm.layer_bytes(cfg, "autocast_per_linear")  # the code those counts measured
    per_token = {name: n / row["tokens"] for name, n in row["saved_by_node"].items()}
    # the parts that one node keeps alone, to the byte
    assert parts["block input"] == per_token["block input"]
    assert parts["SwiGLU"] == per_token["MulBackward0"] + per_token["SiluBackward0"]
    assert parts["RoPE"] == per_token["RopeFunctionBackward"]
    assert parts["attention core"] == pytest.approx(per_token["_CudnnWindowAttentionBackward"])
    # the linears' inputs; the walk files a few bf16 weight copies (per layer, not per token:
    # 64 B/token at 16K) under MmBackward0
    assert 0 <= per_token["MmBackward0"] - parts["projections"] <= 70
    assert sum(parts.values()) == pytest.approx(row["saved_per_token"], rel=2e-3)


# (file, mode, context): peaks that the code of 2026-12-03 (a cast per linear) measured on one
# H200 (bf16 autocast, no checkpointing); sequences of `context` tokens, 65,536 tokens per step
# unless one per step
PEAKS = [
    ("throughput_h200_2026-12-03_cudnn_window_long.json", "dense", 65536),
    ("throughput_h200_2026-12-03_gated_projection.json", "nsa", 8192),
    ("throughput_h200_2026-12-03_gated_projection.json", "nsa_block", 65536),
    ("throughput_h200_2026-12-03_one_seq.json", "nsa", 16384),
    ("throughput_h200_2026-12-03_fused_auto.json", "nsa", 16384),
]


@pytest.mark.parametrize(("name", "mode", "context"), PEAKS)
def test_predicted_peak_is_within_two_percent_of_the_h200s(name, mode, context):
    report = json.loads((RESULTS / name).read_text())
    (row,) = [r for r in report["rows"] if r["mode"] == mode and r["context"] == context]
    model = report["model"]
    cfg = GPTConfig(vocab_size=model["vocab_size"], n_layer=model["n_layer"],
                    n_head=model["n_head"], n_kv_head=model["n_kv_head"],
                    d_model=model["d_model"], head_dim=model["head_dim"],
                    ffn_hidden=model["ffn_hidden"], nsa=NSAConfig(**report["nsa"]),
                    fused_ops=report["args"].get("fused_ops") or "torch")
    predicted = mm.peak_bytes(_variant(cfg, mode), context * row["sequences"],
                              precision="autocast_per_linear") / mm.GIB
    assert predicted == pytest.approx(row["peak_gib"], rel=0.02), (predicted, row["peak_gib"])


def test_longest_sequence_fits_and_one_more_block_would_not():
    cfg = mm.preset("gpt-350m-nsa")
    n_params = mm.parameters(cfg)
    budget = mm.H200_BYTES - mm.RESERVE_BYTES
    previous = 0
    for degree in (1, 2):
        for checkpointing in (False, True):
            tokens = mm.longest_sequence(cfg, degree, checkpointing=checkpointing,
                                         n_params=n_params)
            peak = dict(checkpointing=checkpointing, precision="bf16", strategy="zero2",
                        n_params=n_params)
            assert mm.peak_bytes(cfg, tokens, degree, **peak) <= budget
            assert mm.peak_bytes(cfg, tokens + 1024, degree, **peak) > budget
        assert tokens > 1.9 * previous  # about P times one GPU's (the static part shrinks)
        previous = tokens
    assert "| nsa, checkpointed |" in mm.markdown("gpt-350m-nsa", cfg)


def _packed_per_token(cfg: GPTConfig, tokens: int) -> float:
    """Bytes autograd packs for the backward in one forward of a GPT on the CPU (reference
    kernels, fp32), per token, parameters left out."""
    from fsa_train.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (tokens,))
    cu = torch.tensor([0, tokens // 3, tokens], dtype=torch.int32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with PackedStorages() as packed:
        hidden = model(ids, cu)
    del hidden
    return sum(n for ptr, n in packed.pointers.items() if ptr not in params) / tokens


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_checkpointed_blocks_keep_nothing_but_their_input_on_the_cpu(attention):
    """One block more costs the reference path's activations without checkpointing, and with it
    only the block's input (r·D per token, fp32 here), which the checkpoint keeps to recompute
    the block from. A checkpointed sub-layer keeps its input instead of its tensors, so the
    attention's and the MLP's checkpointed layers together keep one whole layer and the two
    sub-layers' inputs: what the model's split of the layer bytes predicts too."""
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=4, window=16)
    per_layer = {}
    modes = [c for c in mm.CHECKPOINTING if c != "sparse_branches" or attention == "nsa"]
    for checkpointing in modes:
        sizes = [_packed_per_token(GPTConfig(vocab_size=64, n_layer=n, n_head=4, n_kv_head=2,
                                             d_model=64, attention=attention, nsa=nsa,
                                             activation_checkpointing=checkpointing), 192)
                 for n in (1, 2)]
        per_layer[checkpointing] = sizes[1] - sizes[0]
    assert per_layer[True] == 4 * 64
    assert per_layer[False] > 10 * 4 * 64  # tens of r·D (fp32 on the CPU)
    for part in ("attention", "mlp"):
        assert per_layer[False] > per_layer[part] > per_layer[True], part
    assert per_layer["attention"] + per_layer["mlp"] == per_layer[False] + 2 * 4 * 64
    cfg = _variant(mm.preset("gpt-350m-nsa"), "nsa" if attention == "nsa" else "dense")
    for precision, r in (("autocast", 4), ("bf16", 2)):
        kept = {c: mm.kept_bytes(cfg, precision, c) for c in modes}
        assert kept["attention"] + kept["mlp"] == kept[False] + 2 * r * cfg.d_model
        assert kept[False] > max(kept["attention"], kept["mlp"]) > kept[True] == r * cfg.d_model
        if attention == "nsa":  # two branch outputs fewer, more than the attention recomputed
            H, d = cfg.n_head, cfg.head_dim
            assert kept[False] - kept["sparse_branches"] > 4 * H * d
            assert per_layer[False] - per_layer["sparse_branches"] >= 2 * 64 * 4  # fp32, H·d 64
            assert kept["sparse_branches"] > kept["attention"]
    if attention == "dense":
        with pytest.raises(ValueError, match="sparse_branches"):
            mm.kept_bytes(cfg, "autocast", "sparse_branches")
    with pytest.raises(ValueError, match="checkpointing"):
        mm.kept_bytes(cfg, "autocast", "block")
