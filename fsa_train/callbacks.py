"""Callbacks: throughput and MFU monitoring, and the end-of-training summary."""

from __future__ import annotations

import json
import os
import time

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from fsa_train.parallel.sequence import degree_of


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
        for callback in trainer.callbacks:
            if isinstance(callback, MetricsFile) and callback.path:
                lines.append(f"metrics: {os.path.abspath(callback.path)} "
                             f"(fsa-train plot {os.path.abspath(trainer.default_root_dir)})")
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
        # eager, also where model.compile compiled the blocks: every sampled length would be a
        # new shape to compile (minutes with Inductor on a GPU, for a few dozen tokens)
        with torch.compiler.set_stance("force_eager"):
            new_tokens = pl_module.model.generate(
                prompt, hparams.sample_tokens, stop_token=tokenizer.eos_id, generator=generator
            )
        pl_module.train(was_training)
        return tokenizer.decode(prompt[1:] + new_tokens)


class ThroughputMonitor(L.Callback):
    """Logs tokens/s (global and per device), MFU, data-wait time and peak memory (and the
    gradient norm under DeepSpeed, which owns the gradients; otherwise LitGPT logs it).

    MFU uses the analytical FLOPs of :mod:`fsa_train.flops` for the documents of each batch:
    ``perf/mfu`` counts what the model computes (NSA's branches), ``perf/mfu_dense_equiv`` what
    dense attention would have cost in the same time. ``peak_tflops`` overrides the device's
    peak (bf16 dense); MFU is not logged where the peak is unknown (CPUs).

    Args:
        peak_tflops: per-device peak in TFLOP/s, or None to look the device up.
        synchronize: wait for the GPU at the end of each step so the step time is exact.
    """

    def __init__(self, peak_tflops: float | None = None, synchronize: bool = True) -> None:
        self.peak_tflops = peak_tflops
        self.synchronize = synchronize
        self._batch_started: float | None = None
        self._previous_end: float | None = None
        self._peak: float | None = None
        self._smoothed: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from fsa_train.flops import device_peak_flops

        if self.peak_tflops is not None:
            self._peak = self.peak_tflops * 1e12
        elif pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            self._peak = device_peak_flops(name, str(trainer.precision))
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._previous_end is not None:
            pl_module.log("time/data_wait_s", now - self._previous_end, on_step=True)
        self._batch_started = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from fsa_train.flops import batch_flops

        if self._batch_started is None:
            return
        if self.synchronize and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        end = time.perf_counter()
        self._previous_end = end
        elapsed = max(end - self._batch_started, 1e-9)
        tokens = batch["input_ids"].numel()
        world = trainer.world_size
        # under sequence parallelism P ranks share each batch: 1/P of its tokens and FLOPs each
        sharing = degree_of(pl_module)
        log = {
            "throughput/tokens_per_s": tokens * world / sharing / elapsed,
            "throughput/tokens_per_s_per_device": tokens / sharing / elapsed,
        }
        config = getattr(pl_module, "config", None)
        if config is not None and self._peak:
            lengths = torch.diff(batch["cu_seqlens"].to("cpu", torch.int64)).numpy()
            flops = batch_flops(config, lengths)
            log["perf/mfu"] = flops.actual / sharing / elapsed / self._peak
            log["perf/mfu_dense_equiv"] = flops.dense_equivalent / sharing / elapsed / self._peak
        if pl_module.device.type == "cuda":
            log["memory/peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and engine.get_global_grad_norm() is not None:
            log["train/grad_norm"] = float(engine.get_global_grad_norm())
        pl_module.log_dict(log, on_step=True)
        rate = log["throughput/tokens_per_s"]
        # the progress bar's tok/s: an exponential average over about 10 steps (one step's rate
        # jumps with autotuning, validation and data waits); the logs keep every step's
        self._smoothed = rate if self._smoothed is None else 0.9 * self._smoothed + 0.1 * rate
        pl_module.log("tok/s", self._smoothed, prog_bar=True, on_step=True, logger=False)


class MetricsFile(L.Callback):
    """Appends every training step's logged metrics to a JSON-lines file (global rank 0), and
    optionally every validation's to a second one.

    A plain local record beside wandb: easy to diff between runs, to plot, or to read in tests.
    Each record carries ``train_time_s``, the seconds spent in training batches so far (data
    loading and validation excluded; kept across resumes in the checkpoint), so runs can be
    compared by time as well as by step (the loss-parity experiment's "time to reach a loss").

    Args:
        path: the ``.jsonl`` file of training steps; created with its directory, appended to on
            resume. None (the presets' choice): ``metrics.jsonl`` in the run directory, with
            the validations in ``val.jsonl`` beside it.
        val_path: the ``.jsonl`` file of validation results (``val/*`` metrics), or None.
    """

    def __init__(self, path: str | None = None, val_path: str | None = None) -> None:
        self.path = path
        self.val_path = val_path
        self.train_time_s = 0.0
        self._batch_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.path is None:
            self.path = os.path.join(trainer.default_root_dir, "metrics.jsonl")
            self.val_path = self.val_path or os.path.join(trainer.default_root_dir, "val.jsonl")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self.train_time_s += time.perf_counter() - self._batch_start
            self._batch_start = None
        if not trainer.is_global_zero:
            return
        record = {"step": trainer.global_step, "train_time_s": round(self.train_time_s, 4)}
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("train/", "throughput/", "perf/", "memory/", "lr")):
                record[name] = float(value)
        _append_json_line(self.path, record)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.val_path is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        record = {"step": trainer.global_step, "train_time_s": round(self.train_time_s, 4),
                  "tokens_seen": int(getattr(pl_module, "tokens_seen", 0))}
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/"):
                record[name] = float(value)
        _append_json_line(self.val_path, record)

    def state_dict(self) -> dict:
        return {"train_time_s": self.train_time_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))


def _append_json_line(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


class StopAtStep(L.Callback):
    """Ends ``fit`` cleanly after ``step`` optimizer steps, leaving ``max_steps`` (and so the
    learning-rate schedule) as configured: a long run split into jobs of fixed length, each
    continued with ``--resume auto``. Pair it with a checkpoint every ``step`` steps
    (``every_n_train_steps`` dividing ``step``) so each job ends on a saved state.

    Args:
        step: the global step at which to stop.
    """

    def __init__(self, step: int) -> None:
        if step < 1:
            raise ValueError(f"StopAtStep.step must be >= 1, got {step}")
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
