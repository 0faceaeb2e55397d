"""The selection-overlap measurement: its statistics against a per-tile loop, and a run on a
tiny NSA model's real selections."""

import sys
from pathlib import Path

import pytest
import torch

from fsa_train.config import GPTConfig, NSAConfig
from fsa_train.model import GPT

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks import selection_overlap  # noqa: E402


def naive_stats(idx: torch.Tensor, lengths: list[int], tile: int) -> dict[str, float]:
    unions, union_work, selected, jaccards = [], 0, 0, []
    h = idx.shape[0]
    for head in range(h):
        start = 0
        for length in lengths:
            for t0 in range(0, length, tile):
                rows = range(start + t0, start + min(t0 + tile, length))
                chosen = [set(int(b) for b in idx[head, r] if b >= 0) for r in rows]
                union = set().union(*chosen)
                if union:
                    unions.append(len(union))
                union_work += len(union) * len(rows)
                selected += sum(len(c) for c in chosen)
            for t in range(start + 1, start + length):
                a = {int(b) for b in idx[head, t] if b >= 0}
                b = {int(b) for b in idx[head, t - 1] if b >= 0}
                jaccards.append(len(a & b) / max(1, len(a | b)))
            start += length
    return {"union": sum(unions) / len(unions), "inflation": union_work / selected,
            "adjacent_jaccard": sum(jaccards) / len(jaccards)}


@pytest.mark.parametrize("tile", [1, 3, 8])
def test_overlap_stats_match_a_per_tile_loop(tile):
    lengths = [11, 5, 17]
    total, h, topk = sum(lengths), 2, 4
    gen = torch.Generator().manual_seed(0)
    # distinct blocks per token, as select_blocks gives (ascending, then -1)
    idx = torch.rand(h, total, 6, generator=gen).argsort(-1)[..., :topk].sort(-1).values
    idx = idx.to(torch.int32)
    idx[:, ::3, 2:] = -1  # padded selections, as early tokens have
    idx[0, 4] = -1  # a token with none
    cu = torch.tensor([0, 11, 16, 33], dtype=torch.int32)
    got = selection_overlap.overlap_stats(idx, cu, tile)
    want = naive_stats(idx, lengths, tile)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_identical_selections_give_no_inflation():
    idx = torch.tensor([[0, 1, 2]], dtype=torch.int32).repeat(1, 8, 1)  # [1, 8, 3]
    stats = selection_overlap.overlap_stats(idx, torch.tensor([0, 8], dtype=torch.int32), 4)
    assert stats == {"union": 3.0, "inflation": 1.0, "adjacent_jaccard": 1.0}


def test_measure_records_every_layer_of_a_model():
    torch.manual_seed(0)
    nsa = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=8, sel_topk=3, init_blocks=1,
                    local_blocks=1, window=8)
    model = GPT(GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, d_model=32,
                          attention="nsa", nsa=nsa)).eval()
    batch = {"input_ids": torch.randint(0, 64, (80,)),
             "cu_seqlens": torch.tensor([0, 50, 80], dtype=torch.int32)}
    result = selection_overlap.measure(model, [batch, batch], [8, 16], torch.device("cpu"))
    assert [layer["layer"] for layer in result["layers"]] == [0, 1, 2]
    for stats in result["overall"].values():
        assert 1.0 <= stats["inflation"] and 0.0 <= stats["adjacent_jaccard"] <= 1.0
        assert nsa.init_blocks + nsa.local_blocks <= stats["union"]
    assert selection_overlap.ops.select_blocks is not None  # the wrapper was removed
    assert "| mean |" in selection_overlap.markdown(result)
    dense = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                          attention="dense"))
    with pytest.raises(ValueError, match="needs an NSA model"):
        selection_overlap.measure(dense, [batch], [8], torch.device("cpu"))
