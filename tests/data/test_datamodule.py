"""TextDataModule end to end on a tiny corpus: caching, batches, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from fsa_train.data.datamodule import TextDataModule, default_cache_dir

SMALL = dict(vocab_size=320, seq_len=64, batch_size=4, val_documents=2)


def make(corpus, cache, **kw) -> TextDataModule:
    return TextDataModule(corpus=str(corpus), cache_dir=str(cache), **{**SMALL, **kw})


def ready(corpus, cache, **kw) -> TextDataModule:
    dm = make(corpus, cache, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def first_batches(dm: TextDataModule, n: int = 3) -> list[dict]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_end_to_end_batches(tiny_corpus, tmp_path, capsys):
    dm = ready(tiny_corpus, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "tokenizer: trained" in out and "dataset: prepared" in out
    assert dm.tokenizer is not None and dm.tokenizer.vocab_size == 320
    assert dm.tokenizer_path() == dm.tokenizer.path and dm.tokenizer_path().is_file()

    batches = first_batches(dm, 2)
    for batch in batches:
        assert batch["n_windows"] == 4
        assert batch["input_ids"].shape == batch["targets"].shape == (4 * 64,)
        assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 256
        assert (cu.diff() > 0).all() and set(range(0, 257, 64)) <= set(cu.tolist())
        assert int(batch["input_ids"].max()) < 320
    assert len(dm.train_dataloader()) == len(dm.train_set) // 4  # full batches only

    val = list(dm.val_dataloader())
    assert sum(b["n_windows"] for b in val) == len(dm.val_set) >= 1
    assert torch.equal(val[0]["input_ids"][:64], dm.val_set[0]["input_ids"])  # in order

    text = dm.describe()
    assert "train:" in text and "val:" in text and "windows" in text
    # The stream decodes back to the corpus text (first training document, BOS/EOS framed).
    doc0 = dm.train_set.data.document(0).tolist()
    assert doc0[0] == dm.tokenizer.bos_id and doc0[-1] == dm.tokenizer.eos_id


def test_cache_is_reused(tiny_corpus, tmp_path, capsys):
    ready(tiny_corpus, tmp_path / "cache")
    model = make(tiny_corpus, tmp_path / "cache").tokenizer_path()
    mtime = model.stat().st_mtime_ns
    capsys.readouterr()
    dm = ready(tiny_corpus, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "tokenizer: cached" in out and "dataset: cached" in out
    assert model.stat().st_mtime_ns == mtime
    # A different split seed reuses the tokenizer but prepares new token files.
    ready(tiny_corpus, tmp_path / "cache", seed=5)
    out = capsys.readouterr().out
    assert "tokenizer: cached" in out and "dataset: prepared" in out
    leftovers = [p.name for p in (tmp_path / "cache").rglob(".*tmp-*")]
    assert leftovers == [] and dm.tokenizer is not None


def test_order_is_deterministic_and_reshuffled_per_epoch(tiny_corpus, tmp_path):
    a = ready(tiny_corpus, tmp_path / "cache")
    b = ready(tiny_corpus, tmp_path / "cache")
    for x, y in zip(first_batches(a), first_batches(b), strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["cu_seqlens"], y["cu_seqlens"])

    loader = a.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = next(iter(loader))["input_ids"]
    assert not torch.equal(epoch1, first_batches(a, 1)[0]["input_ids"])
    c = ready(tiny_corpus, tmp_path / "cache", seed=99)
    assert not torch.equal(first_batches(c, 1)[0]["input_ids"], first_batches(a, 1)[0]["input_ids"])


def test_missing_corpus(tmp_path):
    dm = make(tmp_path / "missing.jsonl", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing.jsonl") as info:
        dm.prepare_data()
    assert "\n" not in str(info.value)


def test_val_split_too_short(tiny_corpus, tmp_path):
    dm = make(tiny_corpus, tmp_path / "cache", seq_len=4096)
    dm.prepare_data()
    with pytest.raises(ValueError, match="smaller seq_len or more val_documents") as info:
        dm.setup("fit")
    assert "\n" not in str(info.value)


def test_setup_does_not_build(tiny_corpus, tmp_path):
    dm = make(tiny_corpus, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup("fit")
    assert not (tmp_path / "cache" / "datasets").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FSA_TRAIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert TextDataModule().cache_dir == tmp_path / "c"
    monkeypatch.delenv("FSA_TRAIN_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "fsa-train")


def test_config_keys_parse():
    """The constructor's type hints are what LightningCLI turns into ``data:`` YAML keys."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_args(["--data.seq_len=128", "--data.val_documents=0.1"])
    assert cfg.data.seq_len == 128 and cfg.data.val_documents == 0.1
    assert cfg.data.corpus is None and cfg.data.vocab_size == 4096


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # lightning internals vs torch 2.13
def test_lightning_sets_the_epoch(tiny_corpus, tmp_path):
    """Under a real Trainer the sampler is reshuffled every epoch and batches reach the model."""
    import lightning as L

    seen: list[torch.Tensor] = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(320, 8)
            self.head = torch.nn.Linear(8, 320)

        def training_step(self, batch, _):
            seen.append((self.current_epoch, batch["input_ids"].clone()))
            logits = self.head(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits, batch["targets"], ignore_index=-100)

        def validation_step(self, batch, _):
            assert batch["cu_seqlens"][-1] == batch["input_ids"].numel()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make(tiny_corpus, tmp_path / "cache")
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Probe(), datamodule=dm)
    assert [e for e, _ in seen] == [0, 1]
    assert not torch.equal(seen[0][1], seen[1][1])
