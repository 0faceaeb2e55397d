"""Checkpoints that an interrupted save cannot spoil, and finding the one to resume from.

A checkpoint (a file, or a directory under DeepSpeed) is written under ``NAME.partial`` and
renamed to ``NAME`` only when every rank has finished writing, so a run killed mid-save leaves
the previous checkpoints untouched and at worst a ``.partial`` entry that resuming ignores.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class SafeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes to a temporary name and renames when complete.

    Keeps the ``ModelCheckpoint`` options (``every_n_train_steps``, ``save_last``, ``save_top_k``
    with ``monitor: step`` and ``mode: max`` to keep the last k, ...).
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.fast_dev_run:  # a smoke test leaves nothing that --resume auto could pick
            return
        final = Path(filepath)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if trainer.is_global_zero:
            _remove(partial)
        trainer.strategy.barrier("safe_checkpoint_start")
        super()._save_checkpoint(trainer, str(partial))
        if trainer.is_global_zero:
            replaced = final.with_name(final.name + REPLACED_SUFFIX)
            if final.exists():
                _remove(replaced)
                os.replace(final, replaced)
            os.replace(partial, final)
            _remove(replaced)
        trainer.strategy.barrier("safe_checkpoint_end")
        self._last_checkpoint_saved = str(final)


class CheckpointError(ValueError):
    """A path that is not a readable checkpoint (missing, truncated, corrupt, another format)."""


def _load_meta(path: Path) -> dict:
    """The checkpoint's top-level dict, tensors memory-mapped (nothing large is read)."""
    import torch

    if path.is_dir():  # DeepSpeed: <dir>/checkpoint/mp_rank_00_model_states.pt holds the state
        states = sorted(path.glob("checkpoint/*model_states.pt")) or sorted(
            path.glob("**/*model_states.pt"))
        if not states:
            raise CheckpointError(f"{path} is a directory but not a DeepSpeed checkpoint "
                                  "(no *model_states.pt inside)")
        return torch.load(states[0], map_location="cpu", mmap=True, weights_only=False)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_checkpoint_meta(path: str | Path) -> dict:
    """``{"global_step": int, "run": {...}}`` of a Lightning checkpoint (file or DeepSpeed
    directory); ``run`` is what :class:`fsa_train.lit_module.LitGPT` records (run identity and
    wandb run id), empty for checkpoints written before it did. One-line
    :class:`CheckpointError` for anything that is not a readable checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = _load_meta(path)
    except CheckpointError:
        raise
    except Exception as error:  # truncated zip, pickle garbage, a text file, ...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"not a readable checkpoint: {path} ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise CheckpointError(f"not a Lightning checkpoint: {path} (no global_step)")
    record = checkpoint.get("fsa_train") or {}
    return {"global_step": int(checkpoint["global_step"]), "run": dict(record.get("run") or {})}


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (by modification time)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.name.endswith(PARTIAL_SUFFIX):
            continue
        if entry.is_symlink() and not entry.exists():
            continue
        if entry.suffix == ".ckpt" or entry.name.endswith(".ckpt" + REPLACED_SUFFIX):
            found.append(entry)
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint of ``directory`` with the highest global step (the newest of
    equal steps), or None when there is none. A ``last-v2.ckpt`` of step 1 never wins over a
    ``last.ckpt`` of step 300, whatever their ages; an unreadable one is a :class:`CheckpointError`
    (move it away or pass ``--resume PATH``), never skipped silently."""
    best: tuple[int, int, Path] | None = None
    for order, path in enumerate(complete_checkpoints(directory)):  # oldest first
        step = read_checkpoint_meta(path)["global_step"]
        if best is None or (step, order) > best[:2]:
            best = (step, order, path)
    return best[2] if best else None
