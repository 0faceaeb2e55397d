"""A real Lightning Trainer on CPU: resuming from a mid-epoch checkpoint sees exactly the batches
of the uninterrupted run (no repeats, no skips), across epoch boundaries."""

from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fsa_train.data.datamodule import TextDataModule
from fsa_train.data.prepare import prepare_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # lightning internals vs torch 2.13
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]
STEPS = 40


class Recorder(L.LightningModule):
    """A tiny LM that records (epoch, batch_idx, fingerprint of the batch) of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(400, 8)
        self.head = torch.nn.Linear(8, 400)
        self.seen: list[tuple[int, int, str]] = []

    def training_step(self, batch, batch_idx):
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        self.seen.append((self.current_epoch, batch_idx, digest))
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits, batch["targets"], ignore_index=-100)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def dataset_dir(kjv_texts, small_tokenizer, tmp_path_factory):
    docs = [t[:260] for t in kjv_texts[:12]]  # about 14 batches of 3 windows per epoch
    return prepare_dataset(docs, small_tokenizer, tmp_path_factory.mktemp("d") / "ds", 2)


def fit(dataset_dir, root, checkpoint: ModelCheckpoint, ckpt_path=None, num_workers=0,
        val_check_interval=None, max_steps=STEPS) -> tuple[list[tuple[int, int, str]], int]:
    """Train to STEPS; returns the steps seen and the number of batches per epoch."""
    dm = TextDataModule(dataset=str(dataset_dir), vocab_size=400, seq_len=32, batch_size=3,
                        num_workers=num_workers, seed=3)
    module = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=root,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module.seen, len(dm.train_set) // dm.batch_size


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_after_train_batch_checkpoint(dataset_dir, tmp_path, num_workers):
    every_step = ModelCheckpoint(tmp_path / "ck", "{step}", every_n_train_steps=1, save_top_k=-1)
    full, per_epoch = fit(dataset_dir, tmp_path / "full", every_step, num_workers=num_workers)
    epochs = [e for e, _, _ in full]
    assert epochs.count(0) == per_epoch and max(epochs) >= 2  # spans several epochs
    assert len({d for e, _, d in full if e == 0}) == per_epoch
    for step in (per_epoch + 5, per_epoch, 1):  # mid-epoch, at an epoch boundary, after 1 batch
        ckpt = tmp_path / "ck" / f"step={step}.ckpt"
        state = torch.load(ckpt, weights_only=False)["TextDataModule"]
        assert state["position"] == 3 * step
        resumed, _ = fit(dataset_dir, tmp_path / f"r{step}", ModelCheckpoint(tmp_path / f"x{step}"),
                         ckpt_path=ckpt, num_workers=num_workers)
        assert resumed == full[step:], f"resumed from step {step}"


def test_resume_after_mid_epoch_validation_checkpoint(dataset_dir, tmp_path):
    on_val = ModelCheckpoint(tmp_path / "ck", "{step}", save_top_k=-1)  # saved after validation
    full, per_epoch = fit(dataset_dir, tmp_path / "full", on_val, val_check_interval=5)
    step = per_epoch + 5  # epoch 1, after its 5th batch and a validation
    resumed, _ = fit(dataset_dir, tmp_path / "r", ModelCheckpoint(tmp_path / "x"),
                     ckpt_path=tmp_path / "ck" / f"step={step}.ckpt", val_check_interval=5)
    assert resumed == full[step:]


def test_resume_after_a_run_stopped_by_max_steps(dataset_dir, tmp_path):
    """A run stopped at max_steps in mid-epoch, then continued to more steps: Lightning starts a
    new epoch on resume, but the data must go on where it stopped."""
    full, per_epoch = fit(dataset_dir, tmp_path / "full", ModelCheckpoint(tmp_path / "a"),
                          val_check_interval=5)
    stop = per_epoch + 5
    last = ModelCheckpoint(tmp_path / "ck", save_last=True, save_top_k=0)
    first, _ = fit(dataset_dir, tmp_path / "first", last, val_check_interval=5, max_steps=stop)
    second, _ = fit(dataset_dir, tmp_path / "second", ModelCheckpoint(tmp_path / "b"),
                    ckpt_path=tmp_path / "ck" / "last.ckpt", val_check_interval=5)
    digests = [d for _, _, d in full]
    assert [d for _, _, d in first + second] == digests
