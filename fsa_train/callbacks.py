"""Callbacks: the end-of-training summary (checkpoint, wandb run, validation loss, a sample)."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger


class TrainingSummary(L.Callback):
    """At the end of ``fit``, prints where the checkpoint and wandb run are, the last validation
    loss and a short text sample from the trained model, then closes the wandb run (global rank 0
    only)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = ["", "=== fsa-train: training finished ==="]
        lines.append(f"steps: {trainer.global_step}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            path = checkpoint.last_model_path or checkpoint.best_model_path
            lines.append(f"checkpoint: {os.path.abspath(path) if path else '(none saved)'}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                mode = "offline" if getattr(run.settings, "_offline", False) else "online"
                lines.append(f"wandb run ({mode}): {os.path.abspath(run.dir)}")
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            lines.append(f"validation loss: {float(val_loss):.4f}")
        sample = self._sample(trainer, pl_module)
        if sample is not None:
            lines.append(f"sample: {sample!r}")
        print("\n".join(lines), flush=True)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # flush and close, so a later run starts its own

    @staticmethod
    def _sample(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        hparams = pl_module.hparams
        if tokenizer is None or not hasattr(pl_module, "model"):
            return None
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            return None  # sharded parameters: generation needs every rank; skipped here
        prompt = [tokenizer.bos_id, *tokenizer.encode(hparams.sample_prompt)]
        was_training = pl_module.training
        pl_module.eval()
        generator = torch.Generator().manual_seed(0)
        new_tokens = pl_module.model.generate(
            prompt, hparams.sample_tokens, stop_token=tokenizer.eos_id, generator=generator
        )
        pl_module.train(was_training)
        return tokenizer.decode(prompt[1:] + new_tokens)
