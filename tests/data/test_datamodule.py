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
    epoch0 = list(loader)  # a full pass moves the loader on to the next data epoch
    epoch1 = next(iter(loader))["input_ids"]
    assert not torch.equal(epoch1, epoch0[0]["input_ids"])
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
    cfg = parser.parse_args(["--data.dataset=/data/ds", "--data.corpus=[a.jsonl, dir]"])
    assert cfg.data.dataset == "/data/ds" and cfg.data.corpus == ["a.jsonl", "dir"]


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # lightning internals vs torch 2.13
def test_lightning_sets_the_epoch(tiny_corpus, tmp_path):
    """Under a real Trainer the order moves on every epoch and batches reach the model."""
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


# ---- dataset mode: a directory made by prepare-data ------------------------------------------


@pytest.fixture
def dataset_dir(kjv_texts, small_tokenizer, tmp_path):
    from fsa_train.data.prepare import prepare_dataset

    docs = [t[:2000] for t in kjv_texts[:10]]
    return prepare_dataset(docs, small_tokenizer, tmp_path / "ds", val_documents=2,
                           shard_tokens=1000)


def from_dataset(path, **kw) -> TextDataModule:
    dm = TextDataModule(dataset=str(path), **{"vocab_size": 400, "seq_len": 64, "batch_size": 4,
                                              **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_dataset_mode_batches(dataset_dir, small_tokenizer):
    dm = from_dataset(dataset_dir)
    assert dm.tokenizer.checksum == small_tokenizer.checksum  # the copy inside the dataset
    assert dm.tokenizer.path == dataset_dir / "tokenizer.model"
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets", "cu_seqlens", "max_seqlen", "n_windows"}
    assert batch["max_seqlen"] == int(batch["cu_seqlens"].diff().max())
    assert batch["input_ids"].shape == (256,) and batch["cu_seqlens"][-1] == 256
    assert "train:" in dm.describe() and str(dataset_dir) in dm.describe()
    assert dm.state_dict()["position"] == 4 and dm.state_dict()["seed"] == 1234  # one batch out


def test_dataset_vocab_must_match(dataset_dir):
    from fsa_train.data.prepare import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="set data.vocab_size: 400") as info:
        from_dataset(dataset_dir, vocab_size=512)
    assert "\n" not in str(info.value)


def test_dataset_tokenizer_swapped(dataset_dir, kjv_texts, tmp_path):
    from fsa_train.data.prepare import DatasetFormatError
    from fsa_train.data.tokenizer import train_tokenizer

    other = train_tokenizer([kjv_texts[2][:20_000]], tmp_path / "other", 400)
    (dataset_dir / "tokenizer.model").write_bytes(other.read_bytes())
    with pytest.raises(DatasetFormatError, match="made with tokenizer"):
        from_dataset(dataset_dir)


def test_dataset_of_unknown_format(dataset_dir):
    import json

    from fsa_train.data.prepare import DatasetFormatError

    meta = json.loads((dataset_dir / "meta.json").read_text())
    (dataset_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(DatasetFormatError, match="format_version 1, expected 2; re-run"):
        from_dataset(dataset_dir)
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        from_dataset(dataset_dir.parent / "missing")


def test_corpus_and_dataset_are_exclusive(dataset_dir, tiny_corpus):
    from fsa_train.config import ConfigError

    with pytest.raises(ConfigError, match="not both"):
        TextDataModule(corpus=str(tiny_corpus), dataset=str(dataset_dir))


def test_checked_against_the_model_config(dataset_dir):
    from types import SimpleNamespace

    from fsa_train.config import ConfigError, GPTConfig, NSAConfig

    nsa = NSAConfig(cmp_kernel=16, cmp_stride=8, sel_block=32, sel_topk=4, window=64)
    dm = from_dataset(dataset_dir, seq_len=48)
    for cfg, message in [
        (GPTConfig(vocab_size=300, n_layer=1, d_model=64, n_head=4, n_kv_head=2), "smaller"),
        (GPTConfig(vocab_size=400, n_layer=1, d_model=64, n_head=4, n_kv_head=2, nsa=nsa),
         "seq_len=48 must be a multiple of model.config.nsa.sel_block=32"),
    ]:
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(config=cfg))
        with pytest.raises(ConfigError, match=message):
            dm.setup("fit")
    dense = GPTConfig(vocab_size=400, n_layer=1, d_model=64, n_head=4, n_kv_head=2,
                      attention="dense")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(config=dense))
    dm.setup("fit")  # dense attention takes any seq_len


def test_corpus_directory_with_glob(tmp_path, kjv_texts):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(kjv_texts[:8]):
        (src / f"book{i}.txt").write_text(text[:3000])
    (src / "skip.md").write_text("# not read")
    dm = TextDataModule(corpus=str(src), glob="*.txt", cache_dir=str(tmp_path / "cache"),
                        vocab_size=320, seq_len=64, batch_size=2, val_documents=1)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set.data.n_documents + dm.val_set.data.n_documents == 8


def test_reloaded_loader_keeps_the_position(dataset_dir):
    dm = from_dataset(dataset_dir)
    first = iter(dm.train_dataloader())
    seen = [next(first)["input_ids"] for _ in range(3)]
    again = next(iter(dm.train_dataloader()))["input_ids"]  # e.g. reload_dataloaders_every_n_epochs
    assert dm.state_dict()["position"] == 4 * 4
    fresh = iter(from_dataset(dataset_dir).train_dataloader())
    want = [next(fresh)["input_ids"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip([*seen, again], want, strict=True))
