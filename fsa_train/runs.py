"""Run directories and run identity.

Every output of a run lives in its run directory: checkpoints (``checkpoints/``), the wandb
folder, the resolved config (``config.yaml``; ``config.validate.yaml`` for ``validate``) and the
metrics files. The directory is ``--run_dir``, else ``trainer.default_root_dir`` when a config
sets it, else ``runs/<name>-<YYYYmmdd-HHMMSS>`` with ``<name>`` from ``--name`` or the config
files (``gpt-150m-nsa`` for ``base.yaml + model/gpt-150m-nsa.yaml``): two experiments never share
a directory unless asked to. ``--resume auto`` without a run directory continues the newest
``runs/<name>-*`` that holds a checkpoint.

A run's *identity* is what a checkpoint must share with the config that resumes it: the model
config (``model.config.*``), the tokenizer's checksum and the prepared dataset. Each checkpoint
carries the identity of the run that wrote it (with its wandb run id), so resuming compares the
two and refuses, naming the keys that differ, before any work starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fsa_train.config import ConfigError

RUNS_ROOT = Path("runs")
"""Where run directories go by default (relative to the working directory)."""

_STAMP = "%Y%m%d-%H%M%S"
_STAMP_RE = re.compile(r"-(\d{8}-\d{6})(?:-(\d+))?$")


class ResumeError(ConfigError):
    """A checkpoint that this run may not resume from (another model, tokenizer or dataset)."""


def default_run_name(config_files: Iterable[str | Path]) -> str:
    """The run name from the config files: their stems joined by ``+``, without ``base``
    (``configs/base.yaml`` is the defaults every run starts from); ``run`` when none is left."""
    stems = [Path(str(path)).stem for path in config_files]
    kept = [stem for stem in stems if stem != "base"]
    name = "+".join(kept) or "run"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


RUN_DIR_ENV = "FSA_TRAIN_RUN_DIR"
"""Set by the first process for the ones Lightning starts on the same node (same run dir)."""


def launcher_run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id every rank of one launch shares, when an outside launcher starts them:
    ``FSA_TRAIN_RUN_ID``, else SLURM's job id (kept when SLURM requeues the job), else
    torchrun's run id. None for a launch from one process."""
    import os

    env = os.environ if environ is None else environ
    for key in ("FSA_TRAIN_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = env.get(key)
        if value and value != "none":
            return re.sub(r"[^A-Za-z0-9_.-]", "_", value)
    return None


def inherited_run_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The run directory of the process that started this one (Lightning's DDP launcher on one
    node starts ranks 1.. with ``LOCAL_RANK`` set and this process's environment)."""
    import os

    env = os.environ if environ is None else environ
    if env.get("LOCAL_RANK", "0") != "0":
        return env.get(RUN_DIR_ENV) or None
    return None


def shared_run_dir(name: str, root: str | Path = RUNS_ROOT,
                   environ: Mapping[str, str] | None = None) -> Path | None:
    """``root/<name>-job<id>`` for a launch whose ranks share :func:`launcher_run_id` (every
    rank computes the same directory; a requeued job finds its own again), else None."""
    run_id = launcher_run_id(environ)
    return Path(root) / f"{name}-job{run_id}" if run_id else None


def new_run_dir(name: str, root: str | Path = RUNS_ROOT,
                now: datetime.datetime | None = None) -> Path:
    """A run directory that does not exist yet: ``root/<name>-<timestamp>`` (a ``-2``, ``-3``
    ... suffix if that one is taken)."""
    stamp = (now or datetime.datetime.now()).strftime(_STAMP)
    base = Path(root) / f"{name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def latest_run_dir(name: str, root: str | Path = RUNS_ROOT) -> Path | None:
    """The newest ``root/<name>-<timestamp>`` (or launcher-named ``root/<name>-job<id>``)
    directory that holds a checkpoint, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        checkpoints = entry / "checkpoints"
        ckpts = [p for p in checkpoints.iterdir() if p.name.endswith(".ckpt")] \
            if checkpoints.is_dir() else []
        if not ckpts:
            continue
        match = _STAMP_RE.search(entry.name)
        if match is not None and entry.name[: match.start()] == name:
            found.append((match.group(1), int(match.group(2) or 1), entry))
        elif re.fullmatch(re.escape(name) + r"-job[A-Za-z0-9_.-]+", entry.name):
            # a launcher-named run (SLURM, torchrun): as new as its newest checkpoint
            newest = max(p.stat().st_mtime for p in ckpts)
            found.append((datetime.datetime.fromtimestamp(newest).strftime(_STAMP), 0, entry))
    return max(found, key=lambda item: item[:2])[2] if found else None


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"prefix.key.sub": leaf}`` for nested mappings and dataclasses (lists stay leaves)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}", item))
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix: value}


def data_identity(datamodule: Any) -> dict[str, str | None]:
    """``{"data.tokenizer": sha256, "data.dataset": name}`` of a :class:`TextDataModule` as it
    stands (no tokenizer is trained; a corpus whose tokenizer does not exist yet has None)."""
    from fsa_train.data.corpus import file_sha256

    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None:
        checksum = tokenizer.checksum
    else:
        path = datamodule.tokenizer_path()
        checksum = file_sha256(path) if path.is_file() else None
    dataset = getattr(datamodule, "data_dir", None)
    if dataset is None and checksum is not None:
        dataset = datamodule.dataset_dir(SimpleNamespace(checksum=checksum))
    return {"data.tokenizer": checksum, "data.dataset": Path(dataset).name if dataset else None}


def run_identity(model_config: Any, datamodule: Any | None) -> dict[str, Any]:
    """The identity a checkpoint records and a resuming config must match."""
    identity = flatten("model.config", model_config)
    if datamodule is not None:
        identity.update(data_identity(datamodule))
    return identity


def check_before_work(model_config: Any, datamodule: Any) -> list[str]:
    """The config checks that need no data, run before a tokenizer is trained or a wandb run is
    created: one-line :class:`ConfigError` for a bad value, and the warnings to print (a top-k
    larger than the blocks of one window selects every block: NSA is then dense attention)."""
    from fsa_train.data.packing import check_seq_len

    for key in ("batch_size", "seq_len"):
        value = getattr(datamodule, key, None)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key} must be an integer >= 1, got {value!r}")
    nsa = model_config.nsa if getattr(model_config, "attention", None) == "nsa" else None
    check_seq_len(datamodule.seq_len, nsa)
    warnings = []
    blocks = datamodule.seq_len // nsa.sel_block if nsa is not None else 0
    if nsa is not None and nsa.sel_topk >= blocks:
        warnings.append(
            f"model.config.nsa.sel_topk={nsa.sel_topk} covers all {blocks} selection blocks of "
            f"a {datamodule.seq_len}-token window: the selected branch is dense attention "
            "(raise data.seq_len or lower sel_topk)")
    return warnings


def check_kernel_device(model_config: Any, device: Any) -> None:
    """``kernel_backend: triton`` on a machine the Triton kernels cannot run on is a one-line
    :class:`ConfigError` before any work (not a traceback at the first forward)."""
    from fsa_train.kernels.utils import interpreting

    if getattr(model_config, "kernel_backend", "auto") != "triton":
        return
    if getattr(device, "type", str(device)) != "cuda" and not interpreting():
        raise ConfigError(
            f"model.config.kernel_backend='triton' needs a CUDA GPU, and this run is on {device} "
            "('auto' takes the reference ops there)")


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and re.fullmatch(r"[0-9a-f]+", value):
        return value[:12] + "…"  # a checksum
    return str(value)


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``checkpoint has K=V, config has W`` for each key both sides know and disagree on (a key
    the checkpoint does not record, such as a config field added later, is not compared)."""
    out = []
    for key, value in recorded.items():
        if key not in current:
            continue
        now = current[key]
        if key.startswith("data.") and (value is None or now is None):
            if value is not None and now is None and key == "data.tokenizer":
                out.append(f"checkpoint has {key}={_show(value)}, config has none yet "
                           "(its corpus differs: a new tokenizer would be trained)")
            continue
        if value != now:
            out.append(f"checkpoint has {key}={_show(value)}, config has {_show(now)}")
    return out


def check_resumable(checkpoint: str | Path, recorded: Mapping[str, Any] | None,
                    current: Mapping[str, Any]) -> None:
    """Raise :class:`ResumeError` (one line) when the checkpoint's run is not this run."""
    if not recorded:
        return
    differences = identity_differences(recorded, current)
    if differences:
        shown = "; ".join(differences[:4])
        more = f" (and {len(differences) - 4} more)" if len(differences) > 4 else ""
        raise ResumeError(f"cannot resume from {checkpoint}: it belongs to another run: "
                          f"{shown}{more}")
