"""Per-token losses, position buckets, and the position-loss command on a prepared dataset."""

from __future__ import annotations

import json

import pytest
import torch

from fsa_train.data.prepare import prepare_dataset
from fsa_train.evaluate.position_loss import (
    PositionLoss,
    bucket_edges,
    format_buckets,
    position_loss,
    position_loss_main,
    token_losses,
)


def packed_batch(vocab: int, lengths: list[int], seed: int = 0) -> dict:
    """Random documents packed with -100 at each document's last target."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(4, vocab, (total,), generator=generator)
    targets = torch.randint(4, vocab, (total,), generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    targets[cu[1:].long() - 1] = -100
    return {"input_ids": ids, "targets": targets, "cu_seqlens": cu}


def test_bucket_edges():
    assert bucket_edges("pow2", 8) == [0, 1, 2, 4]
    assert bucket_edges("pow2", 9) == [0, 1, 2, 4, 8]
    assert bucket_edges("16", 64) == [0, 16, 32, 48]
    assert bucket_edges(32, 64) == [0, 32]
    assert bucket_edges("100,10", 128) == [0, 10, 100]
    with pytest.raises(ValueError):
        bucket_edges("0", 64)


def test_token_losses_match_the_model_loss(tiny_model):
    batch = packed_batch(tiny_model.cfg.vocab_size, [70, 33, 100])
    losses = token_losses(tiny_model, batch["input_ids"], batch["targets"], batch["cu_seqlens"],
                          chunk=40)
    with torch.no_grad():
        hidden = tiny_model(batch["input_ids"], batch["cu_seqlens"])
        expected = tiny_model.loss(hidden, batch["targets"])
    keep = batch["targets"] != -100
    assert losses.shape == (203,) and (losses[~keep] == 0).all()
    torch.testing.assert_close(losses[keep].mean(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("buckets", ["pow2", "32"])
def test_buckets_average_back_to_the_overall_loss(tiny_model, buckets):
    batches = [packed_batch(tiny_model.cfg.vocab_size, lengths, seed)
               for seed, lengths in enumerate([[70, 33, 100], [128, 64]])]
    result = position_loss(tiny_model, batches, bucket_edges(buckets, 128))
    filled = [b for b in result["buckets"] if b["tokens"]]
    weighted = sum(b["loss"] * b["tokens"] for b in filled) / sum(b["tokens"] for b in filled)
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"] == 395 - 5
    assert weighted == pytest.approx(result["loss"], rel=1e-9)
    with torch.no_grad():
        all_losses = [tiny_model.loss(tiny_model(b["input_ids"], b["cu_seqlens"]), b["targets"])
                      * (b["targets"] != -100).sum() for b in batches]
    assert result["loss"] == pytest.approx(float(sum(all_losses)) / 390, rel=1e-5)
    if buckets == "32":  # positions restart at every document: count tokens by hand
        counts = [b["tokens"] for b in result["buckets"]]
        # documents 70, 33, 100, 128, 64 tokens; each one's last target is ignored
        assert counts == [5 * 32, 32 + 0 + 32 + 32 + 31, 5 + 32 + 32, 3 + 31]
    assert "overall" in format_buckets(result)


def test_accumulator_rejects_bad_edges():
    with pytest.raises(ValueError):
        PositionLoss([1, 4])
    with pytest.raises(ValueError):
        PositionLoss([0, 4, 4])


def test_cli_on_a_prepared_dataset(exported, tokenizer, texts, tmp_path, capsys):
    dataset = prepare_dataset(texts, tokenizer, tmp_path / "ds", val_documents=2)
    out = tmp_path / "loss.json"
    position_loss_main([str(exported), str(dataset), "--seq_len", "64", "--batch_size", "2",
                        "--batches", "3", "--buckets", "16", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["batches"] == 3 and [b["start"] for b in result["buckets"]] == [0, 16, 32, 48]
    assert 0 < result["tokens"] <= 3 * 2 * 64
    assert "| 48+ |" in capsys.readouterr().out


# ---- key tokens: the loss on what only distant context predicts ------------------------------


class LagCopier(torch.nn.Module):
    """Predicts the token ``lag`` positions back in its own segment (one-hot logits), uniform
    where the segment is shorter: perfect on text that repeats with period ``lag`` if and only
    if it sees at least ``lag`` tokens."""

    def __init__(self, vocab: int, lag: int) -> None:
        super().__init__()
        self.vocab, self.lag = vocab, lag
        self.head = torch.nn.Identity()
        self.cfg = type("Cfg", (), {"loss_chunk": 64})()

    def forward(self, ids, cu_seqlens, max_seqlen=None):
        from fsa_train.kernels.varlen import document_positions

        logits = torch.zeros(len(ids), self.vocab)
        pos = document_positions(cu_seqlens, len(ids))
        sees = pos + 1 >= self.lag  # the target of p is token p + 1 = token p + 1 - lag
        rows = torch.nonzero(sees).flatten()
        logits[rows, ids[rows + 1 - self.lag]] = 30.0
        return logits


def _periodic(vocab: int, n: int, lag: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    period = torch.randint(0, vocab, (lag,), generator=generator)
    ids = period.repeat(n // lag + 2)[: n + 1]
    return {"input_ids": ids[:-1], "targets": ids[1:].clone(),
            "cu_seqlens": torch.tensor([0, n], dtype=torch.int32)}


def test_cut_every_adds_boundaries_inside_documents():
    from fsa_train.evaluate.position_loss import cut_every

    cu = torch.tensor([0, 10, 13], dtype=torch.int32)
    assert cut_every(cu, 13, 4).tolist() == [0, 4, 8, 10, 13]
    assert cut_every(cu, 13, 4, 2).tolist() == [0, 2, 6, 10, 12, 13]
    assert cut_every(cu, 13, 4).dtype == torch.int32


def test_short_context_sees_between_half_and_all_of_it():
    from fsa_train.evaluate.position_loss import short_context_losses

    vocab = 50
    batch = _periodic(vocab, 200, lag=24)
    # a copier needing 24 tokens of context: with 32 it has 17..32 tokens, so sometimes enough
    loss = short_context_losses(LagCopier(vocab, 24), batch["input_ids"], batch["targets"],
                                batch["cu_seqlens"], 32)
    assert (loss < 1e-3).any() and (loss > 1.0).any()
    # with 64 it always has more than 32: enough everywhere past the first period
    loss = short_context_losses(LagCopier(vocab, 24), batch["input_ids"], batch["targets"],
                                batch["cu_seqlens"], 64)
    assert (loss[23:] < 1e-3).all()


def test_key_tokens_separate_a_long_range_model_from_a_short_one():
    vocab, n = 50, 512
    batch = _periodic(vocab, n, lag=100)
    edges = bucket_edges("pow2", n)
    long_range = position_loss(LagCopier(vocab, 100), [batch], edges, torch.device("cpu"),
                               short_context=32)
    keys = long_range["key_tokens"]
    assert keys["candidates"] == n - 32 and keys["tokens"] == keys["candidates"] - (100 - 1 - 32)
    assert keys["loss"] < 1e-3 and keys["short_loss"] > 3.0
    short_range = position_loss(LagCopier(vocab, 10), [_periodic(vocab, n, lag=100)], edges,
                                torch.device("cpu"), short_context=32)
    assert short_range["key_tokens"]["tokens"] == 0
    assert "key tokens: none" in format_buckets(short_range)
    # the long-range model's key tokens, chosen by it, score the short-range model badly
    judged = position_loss(LagCopier(vocab, 10), [batch], edges, torch.device("cpu"),
                           short_context=32, reference=LagCopier(vocab, 100))
    assert judged["key_tokens"]["tokens"] == keys["tokens"]
    assert judged["key_tokens"]["loss"] > 3.0 and judged["key_tokens"]["chosen_by"] == "reference"
    assert "key tokens (chosen by reference" in format_buckets(judged)


def test_cli_key_tokens(exported, tokenizer, texts, tmp_path):
    dataset = prepare_dataset(texts, tokenizer, tmp_path / "ds", val_documents=2)
    out = tmp_path / "loss.json"
    position_loss_main([str(exported), str(dataset), "--seq_len", "64", "--batches", "2",
                        "--short_context", "16", "--reference", str(exported),
                        "--out", str(out)])
    keys = json.loads(out.read_text())["key_tokens"]
    assert keys["short_context"] == 16 and keys["chosen_by"] == "reference"
    assert keys["candidates"] > 0


def test_key_tokens_from_a_file_score_like_the_reference(tmp_path):
    """A key-token mask written from one evaluation scores another model on the same tokens as
    passing the reference model would; a file of another evaluation is one line."""
    from fsa_train.evaluate.position_loss import read_key_tokens, write_key_tokens

    vocab, n = 50, 512
    edges = bucket_edges("pow2", n)
    masks: list = []
    chooser = position_loss(LagCopier(vocab, 100), [_periodic(vocab, n, 100)], edges,
                            torch.device("cpu"), short_context=32, key_masks_out=masks)
    meta = {"split": "val", "seq_len": n, "batch_size": 1, "batches": 1, "short_context": 32,
            "threshold": 2.0, "document_mask": True}
    path = tmp_path / "keys.npz"
    write_key_tokens(path, masks, {**meta, "chosen_by": "itself"})
    mask = read_key_tokens(path, meta)
    assert mask.dtype == bool and mask.size == n
    assert int(mask.sum()) == chooser["key_tokens"]["tokens"] > 0
    judged_by_reference = position_loss(LagCopier(vocab, 10), [_periodic(vocab, n, 100)], edges,
                                        torch.device("cpu"), short_context=32,
                                        reference=LagCopier(vocab, 100))
    judged_by_file = position_loss(LagCopier(vocab, 10), [_periodic(vocab, n, 100)], edges,
                                   torch.device("cpu"), short_context=32, key_mask=mask)
    assert judged_by_file["key_tokens"]["chosen_by"] == "file"
    for field in ("tokens", "candidates", "loss", "short_loss"):
        assert judged_by_file["key_tokens"][field] == judged_by_reference["key_tokens"][field]
    with pytest.raises(ValueError, match=r"another evaluation: seq_len=512 \(here 256\)") as info:
        read_key_tokens(path, {**meta, "seq_len": 256})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="holds 512 tokens, this evaluation 256"):
        position_loss(LagCopier(vocab, 10), [_periodic(vocab, 256, 100)], bucket_edges("pow2", 256),
                      torch.device("cpu"), short_context=32, key_mask=mask)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a key-token file"):
        read_key_tokens(tmp_path / "bad.npz", meta)


def test_cli_key_tokens_out_then_in(exported, tokenizer, texts, tmp_path):
    dataset = prepare_dataset(texts, tokenizer, tmp_path / "ds", val_documents=2)
    common = [str(exported), str(dataset), "--seq_len", "64", "--batches", "2",
              "--short_context", "16"]
    position_loss_main([*common, "--key_tokens_out", str(tmp_path / "k.npz"),
                        "--out", str(tmp_path / "a.json")])
    position_loss_main([*common, "--key_tokens", str(tmp_path / "k.npz"),
                        "--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f).read_text())["key_tokens"] for f in ("a.json", "b.json"))
    assert b["chosen_by"] == "file" and b["tokens"] == a["tokens"] and b["loss"] == a["loss"]
    assert not list(tmp_path.glob("*.tmp.npz"))
    with pytest.raises(ValueError, match="another evaluation: batches=2"):
        position_loss_main([*common[:5], "1", *common[6:], "--key_tokens",
                            str(tmp_path / "k.npz"), "--out", str(tmp_path / "c.json")])
