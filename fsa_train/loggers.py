"""Weights & Biases logging that stays offline unless the user has configured wandb."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_configured() -> bool:
    """True when the user asked for online wandb: an API key, ``WANDB_MODE=online`` or a login."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return False
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to "online only if wandb is configured".

    Args:
        project: wandb project.
        name: run name.
        save_dir: directory that receives the ``wandb/`` run folder (None: the run directory,
            which ``fsa-train`` fills in; ``runs`` when used on its own).
        offline: force offline (True) or online (False); None decides from the environment.
        id: run id to resume (the same run continues after a restart).
        entity: wandb entity (team or user).
        group: run group.
        tags: run tags.
    """

    def __init__(
        self,
        project: str = "fsa-train",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        id: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        if offline is None:
            offline = not wandb_configured()
        save_dir = save_dir or "runs"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=offline,
            id=id,
            entity=entity,
            group=group,
            tags=tags,
        )

    def continue_run(self, run_id: str) -> None:
        """Log into the existing run ``run_id`` (after a restart) instead of starting a new one.

        Must be called before the first metric is logged, when the run is not yet created.
        """
        if self._experiment is not None:
            raise RuntimeError("the wandb run has already started; continue_run comes too late")
        self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"
        self._id = run_id
