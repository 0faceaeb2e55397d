"""LightningModule: the GPT, its loss, AdamW with warmup + cosine decay, and training metrics."""

from __future__ import annotations

import math
import random
from typing import Literal

import lightning as L
import numpy as np
import torch

from fsa_train.config import ConfigError, GPTConfig
from fsa_train.model import GPT
from fsa_train.parallel.sequence import SequenceShard, check_degree, shard_batch, shard_loss


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
        sequence_parallel: ranks that share one packed sequence (DeepSpeed-Ulysses,
            :mod:`fsa_train.parallel.sequence`): each holds 1/P of its tokens. Must divide
            ``config.n_kv_head`` and the number of ranks; 1 = off.
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
        sequence_parallel: int = 1,
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
        check_degree(sequence_parallel, config.n_kv_head)
        self.save_hyperparameters()
        self.config = config
        self.model = GPT(config)
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.sequence_shard: SequenceShard | None = None

    def setup(self, stage: str) -> None:
        """Form the sequence-parallel groups (ranks ``[k·P, (k+1)·P)``) once the processes
        exist; every rank creates every group, as ``torch.distributed.new_group`` requires."""
        degree = self.hparams.sequence_parallel
        if degree == 1 or self.sequence_shard is not None:
            return
        world = self.trainer.world_size
        if world % degree or not torch.distributed.is_initialized():
            raise ConfigError(f"model.sequence_parallel={degree} needs a multiple of {degree} "
                              f"ranks in one distributed run, got {world}")
        for start in range(0, world, degree):
            group = torch.distributed.new_group(list(range(start, start + degree)))
            if start <= self.trainer.global_rank < start + degree:
                self.sequence_shard = SequenceShard(group, degree,
                                                    self.trainer.global_rank - start)

    def configure_model(self) -> None:
        if self.hparams.compile:
            from fsa_train.kernels.registry import preload_triton_modules

            preload_triton_modules()
            for block in self.model.blocks:
                block.compile(fullgraph=True)  # NSA and RoPE kernels are custom ops: no breaks

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        return self.model(input_ids, cu_seqlens, max_seqlen)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to differentiate and the batch's mean loss (to log). Under sequence
        parallelism the first is this rank's share times P: the gradient reduction averages
        over all ranks, P of which hold one sequence, and the sum of the shares is the mean."""
        shard = self.sequence_shard
        if shard is None:
            hidden = self.model(batch["input_ids"], batch["cu_seqlens"], batch.get("max_seqlen"))
            loss = self.model.loss(hidden, batch["targets"])
            return loss, loss
        part = shard_batch(batch, shard)
        hidden = self.model(part["input_ids"], part["cu_seqlens"], part.get("max_seqlen"), shard)
        share = shard_loss(*self.model.loss_terms(hidden, part["targets"]), shard)
        mean = share.detach().clone()
        torch.distributed.all_reduce(mean, group=shard.group)
        return share * shard.size, mean

    def sequences_per_step(self) -> int:
        """Distinct packed batches the ranks train on per step (ranks / sequence_parallel)."""
        return self.trainer.world_size // self.hparams.sequence_parallel

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, mean = self._loss(batch)
        # Every rank must take the same branch (a rank that skips alone would hang the others).
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(mean)))
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
        self.tokens_seen += batch["input_ids"].numel() * self.sequences_per_step()
        self.log("train/loss", mean, prog_bar=True, on_step=True)
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
        _, loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=int((batch["targets"] != -100).sum()))
        return loss

    def _fused_adamw(self, params: list[torch.nn.Parameter]) -> bool:
        """AdamW's one-kernel update where every parameter is on CUDA (the step's optimizer time
        is fixed per step, so it weighs most at one sequence per step; the benchmark has always
        run it). Under DeepSpeed the engine steps its own flat partitions: left to its
        default."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return False
        return bool(params) and all(p.is_cuda for p in params)

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
            fused=self._fused_adamw(decay + no_decay),
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.hparams.warmup_steps, total_steps, self.hparams.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
