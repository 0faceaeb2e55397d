"""Checkpoints that an interrupted save cannot spoil, and finding the newest one to resume from.

A checkpoint (a file, or a directory under DeepSpeed) is written under ``NAME.partial`` and
renamed to ``NAME`` only when every rank has finished writing, so a run killed mid-save leaves
the previous checkpoints untouched and at worst a ``.partial`` entry that resuming ignores.
"""

from __future__ import annotations

import json
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
            write_run_info(final.parent, trainer)
        trainer.strategy.barrier("safe_checkpoint_end")
        self._last_checkpoint_saved = str(final)


RUN_INFO = "run.json"
"""Beside the checkpoints: what a restarted run needs before it loads one (the wandb run id)."""


def write_run_info(directory: Path, trainer: L.Trainer) -> None:
    """Record the wandb run id next to the checkpoints (atomically)."""
    from lightning.pytorch.loggers import WandbLogger

    info = {"global_step": trainer.global_step}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger.version is not None:
            info["wandb_run_id"] = logger.version
    temporary = directory / (RUN_INFO + PARTIAL_SUFFIX)
    temporary.write_text(json.dumps(info), encoding="utf-8")
    os.replace(temporary, directory / RUN_INFO)


def read_run_info(directory: str | Path) -> dict:
    """What :func:`write_run_info` recorded, or an empty dict."""
    path = Path(directory) / RUN_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


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
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    checkpoints = complete_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None
