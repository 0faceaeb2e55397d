"""Two real DDP processes on CPU (gloo): Lightning's default ``use_distributed_sampler=True`` keeps
our sampler, each rank trains on exactly its own slice of every global batch, and a run resumed
from a mid-epoch checkpoint gives every rank exactly the batches of the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.multiprocessing import ProcessExitedException

from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import prepare_dataset
from fsa_train.data.sampling import ResumableWindowSampler

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]
STEPS, SAVE_AT = 12, 5  # about 1.5 epochs; the checkpoint is in the middle of the first


class Recorder(L.LightningModule):
    """Writes this rank's batches and sampler type to ``{out}/rank{r}.json`` at the end."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.emb = torch.nn.Embedding(400, 4)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].tolist())
        return self.emb(batch["input_ids"]).sum() * 0.0

    def on_train_end(self) -> None:
        sampler = self.trainer.train_dataloader.sampler
        record = {"seen": self.seen, "sampler": type(sampler).__name__}
        with open(f"{self.out}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def make(ds) -> TextDataModule:
    return TextDataModule(dataset=str(ds), vocab_size=400, seq_len=32, batch_size=2)


def fit_two_ranks(ds, out, save_dir=None, ckpt_path=None) -> list[dict]:
    """Fits on two spawned CPU ranks and returns each rank's record.

    gloo can abort a worker while the ranks tear down their sockets (a known race that Lightning's
    own CI reruns, Lightning-AI/pytorch-lightning#20620), so a launch whose worker died by a signal
    is run once more from scratch, on a fresh port. A second death, or any Python error, fails."""
    for attempt in (1, 2):
        for leftover in (out, save_dir):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        out.mkdir()
        os.environ.pop("MASTER_PORT", None)  # Lightning keeps the first launch's port otherwise
        save = None
        if save_dir is not None:
            save = ModelCheckpoint(save_dir, "{step}", every_n_train_steps=SAVE_AT, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, logger=False,
            callbacks=[save] if save else [], enable_checkpointing=save is not None,
            enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
            enable_model_summary=False,
        )
        try:
            trainer.fit(Recorder(str(out)), datamodule=make(ds), ckpt_path=ckpt_path)
            break
        except ProcessExitedException as died:
            if attempt == 2 or died.signal_name is None:
                raise
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_disjoint_and_resumable(kjv_texts, small_tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)  # the launches set it; undone after the test
    ds = prepare_dataset([t[:200] for t in kjv_texts[:12]], small_tokenizer, tmp_path / "ds", 2)
    straight = fit_two_ranks(ds, tmp_path / "straight", save_dir=tmp_path / "ck")

    dm = make(ds)
    dm.prepare_data()
    dm.setup("fit")
    sampler = ResumableWindowSampler(len(dm.train_set), 2, seed=dm.seed, world_size=2)
    assert STEPS > sampler.batches_per_epoch > SAVE_AT
    for rank in (0, 1):
        assert straight[rank]["sampler"] == "ResumableWindowSampler"  # not wrapped or replaced
        sampler = ResumableWindowSampler(len(dm.train_set), 2, seed=dm.seed, rank=rank,
                                         world_size=2)
        want = []
        while len(want) < STEPS:
            order = list(sampler)
            want += [torch.cat([dm.train_set[w]["input_ids"] for w in order[i : i + 2]]).tolist()
                     for i in range(0, len(order), 2)]
            sampler.advance(sampler.batches_per_epoch)
        assert straight[rank]["seen"] == want[:STEPS]

    resumed = fit_two_ranks(ds, tmp_path / "resumed", ckpt_path=tmp_path / "ck" / "step=5.ckpt")
    for rank in (0, 1):
        assert resumed[rank]["seen"] == straight[rank]["seen"][SAVE_AT:]
