"""LightningModule: the GPT, its loss, AdamW with warmup + cosine decay, and training metrics."""

from __future__ import annotations

import math
import random
from typing import Literal

import lightning as L
import numpy as np
import torch

from fsa_train.config import GPTConfig
from fsa_train.model import GPT


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def capture_rng_state() -> dict:
    """The random generators' states of this process (Python, NumPy, torch CPU and CUDA).

    Only tensors and plain Python values, so checkpoints load with ``weights_only=True``.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LitGPT(L.LightningModule):
    """Trains :class:`~fsa_train.model.GPT` on packed batches from the data module.

    Args:
        config: the model architecture (``model.config`` in YAML).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay (matrices only; norms and embeddings skip it).
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        sample_prompt: prompt for the text sample printed at the end of training.
        sample_tokens: tokens generated for that sample.
        compile: compile each transformer block with ``torch.compile``.
        on_nonfinite: what a non-finite loss or gradient does: ``"stop"`` the run with a clear
            message (checkpoints already written stay intact) or ``"skip"`` that step.
    """

    def __init__(
        self,
        config: GPTConfig,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        sample_prompt: str = "In the beginning",
        sample_tokens: int = 48,
        compile: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be > 0, got {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        self.config = config
        self.model = GPT(config)
        self.skipped_steps = 0
        self.tokens_seen = 0

    def configure_model(self) -> None:
        if self.hparams.compile:
            from fsa_train.kernels.registry import preload_triton_modules

            preload_triton_modules()
            for block in self.model.blocks:
                block.compile()

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        return self.model(input_ids, cu_seqlens, max_seqlen)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(batch["input_ids"], batch["cu_seqlens"], batch.get("max_seqlen"))
        return self.model.loss(hidden, batch["targets"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self._loss(batch)
        # Every rank must take the same branch (a rank that skips alone would hang the others).
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)))
        if not finite:
            if self.hparams.on_nonfinite == "skip":
                self.skipped_steps += 1
                self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
                return None  # Lightning skips backward and the optimizer step
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} (on some rank); the last "
                f"checkpoint is intact. Lower model.learning_rate, check the data, or set "
                f"model.on_nonfinite: skip"
            )
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add what exact resumption needs beyond Lightning's state: counters and RNG states."""
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        checkpoint["fsa_train"] = {
            "tokenizer_path": str(tokenizer.path) if tokenizer is not None else None,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "rng": capture_rng_state(),
            "run": self.run_record(),
        }

    def run_record(self) -> dict:
        """What the checkpoint says about its run: the identity a resuming config must match
        (:func:`fsa_train.runs.run_identity`), the run directory and the wandb run id, so that
        a resumed run or ``validate`` logs into the same wandb run."""
        from lightning.pytorch.loggers import WandbLogger

        from fsa_train.runs import run_identity

        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        record: dict = {"identity": run_identity(self.config, datamodule),
                        "run_dir": str(trainer.default_root_dir)}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version is not None:
                record["wandb_run_id"] = str(logger.version)
        return record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("fsa_train")
        if state is None:
            return
        self.tokens_seen = state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        restore_rng_state(state["rng"])

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the gradient norm (before clipping); stop or skip on a non-finite gradient."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return  # DeepSpeed keeps its own gradients; ThroughputMonitor logs its norm
        norm = torch.nn.utils.get_total_norm(grads)
        self.log("train/grad_norm", norm, on_step=True)
        if torch.isfinite(norm):
            return
        if self.hparams.on_nonfinite == "skip":
            for param in self.parameters():
                param.grad = None  # the optimizer leaves parameters without gradients alone
            self.skipped_steps += 1
            return
        raise FloatingPointError(
            f"non-finite gradient at step {self.global_step}; the last checkpoint is intact. "
            f"Lower model.learning_rate or trainer.gradient_clip_val, or set "
            f"model.on_nonfinite: skip"
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=int((batch["targets"] != -100).sum()))
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 and "embed" not in name else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.hparams.warmup_steps, total_steps, self.hparams.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
