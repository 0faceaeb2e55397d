"""Sequence-parallel training end to end on CPU processes: two ranks sharing each packed batch
(Lightning DDP, gloo) train step for step like one process on the whole batch."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from fsa_train.config import ConfigError, GPTConfig, NSAConfig
from fsa_train.data.datamodule import TextDataModule
from fsa_train.lit_module import LitGPT

pytest.importorskip("deepspeed")

NSA = NSAConfig(cmp_kernel=8, cmp_stride=4, sel_block=16, sel_topk=3, init_blocks=1,
                local_blocks=2, window=16)


class RecordLosses(L.Callback):
    """Rank 0's loss, token count and gradient norm (after the gradient reduction) per step:
    AdamW would hide a wrongly scaled gradient from the losses, the norm does not."""

    def __init__(self, path) -> None:
        self.path = path
        self.grad_norm = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.norm() ** 2 for p in pl_module.parameters() if p.grad is not None]
        self.grad_norm = float(torch.stack(grads).sum().sqrt())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"loss": float(trainer.callback_metrics["train/loss"]),
                                      "tokens": pl_module.tokens_seen,
                                      "grad_norm": self.grad_norm}) + "\n")


def _train(corpus, cache, path, devices: int, sequence_parallel: int) -> list[dict]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=320, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                       attention="nsa", nsa=NSA, loss_chunk=64)
    model = LitGPT(config, learning_rate=3e-3, warmup_steps=0,
                   sequence_parallel=sequence_parallel)
    data = TextDataModule(corpus=str(corpus), cache_dir=str(cache), vocab_size=320, seq_len=128,
                          batch_size=2, val_documents=2)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp_spawn" if devices > 1 else "auto", max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[RecordLosses(path)],
                        enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_train_like_one_process(small_corpus, tmp_path):
    one = _train(small_corpus, tmp_path / "cache", tmp_path / "one.jsonl", 1, 1)
    two = _train(small_corpus, tmp_path / "cache", tmp_path / "two.jsonl", 2, 2)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (one, two)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"], (one, two)
        assert a["tokens"] == b["tokens"]  # one packed batch per step in both


def test_degree_is_checked_against_the_kv_heads():
    config = GPTConfig(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, d_model=32)
    with pytest.raises(ConfigError, match="sequence-parallel degree 3"):
        LitGPT(config, sequence_parallel=3)
