"""What every benchmark shares: timing, peak memory, run metadata and the result writer.

Timing is ``triton.testing.do_bench`` (CUDA events around repeated calls, after warm-up; the
median), with each benchmark's own warm-up and repetition budget (:func:`bench`); a wall-clock
median on the CPU smoke modes (:func:`timer`); :class:`StepTimer` times a loop of whole training
steps (CUDA events, synchronised at the end). Results go to
``<out>/<benchmark>_<device>_<date>[_<tag>].{json,md}`` (:class:`Record`): ``<device>`` is a slug
of the device's name (``h200``; ``h200x2`` for two of them; ``cpu``), ``<date>`` the run's UTC day
from its metadata, ``<tag>`` tells several runs of one benchmark on one day apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
"""The committed results (the default ``--out`` when ``$OUT`` is not set)."""

NAME = re.compile(r"^(?P<benchmark>[a-z][a-z_]*?)_(?P<device>[a-z0-9]+)_"
                  r"(?P<date>\d{4}-\d{2}-\d{2})(?:_(?P<tag>[a-z0-9][a-z0-9_-]*))?$")
"""A result file's stem: ``<benchmark>_<device>_<date>[_<tag>]``."""

_TAG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# ---------------------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100,
          grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn`` on the GPU: ``triton.testing.do_bench`` with ``warmup`` and
    ``rep`` milliseconds of warm-up and of timed calls (each benchmark keeps its own budget)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                          return_mode="median"))


def cpu_median(fn: Callable[[], object], samples: int = 3) -> float:
    """Wall-clock median milliseconds of ``samples`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timer(device: str, *, warmup: int = 25, rep: int = 100) -> Callable[[Callable], float]:
    """Median milliseconds of a function: :func:`bench` on CUDA, :func:`cpu_median` elsewhere."""
    if device == "cuda":
        return lambda fn: bench(fn, warmup=warmup, rep=rep)
    return cpu_median


class StepTimer:
    """Seconds between :meth:`start` and :meth:`stop`: CUDA events on the GPU (synchronised at
    the stop), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


def peak_mib(fn: Callable[[], object], device: str = "cuda") -> float | None:
    """MiB allocated above the current level by one call of ``fn`` (None off the GPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` (in fp32)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def require_cuda(name: str) -> None:
    """Stop with a one-line message when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}: error: needs a CUDA GPU (torch.cuda.is_available() is False)")


# -------------------------------------------------------------------------------------- metadata


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` for local changes), or None without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty.strip() else "") if commit else None


def run_meta(device: str = "cuda") -> dict:
    """Device, versions, UTC time and git commit of this run (``device``: "cuda" or "cpu")."""
    meta = {"device": "cpu", "torch": torch.__version__, "triton": None, "cuda": None,
            "python": platform.python_version(), "date": utc_now(), "commit": git_commit()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
        meta["libraries"] = library_versions()
        meta["device_slug"] = device_slug(meta["device"])
    else:
        meta["device"] = platform.processor() or platform.machine() or "cpu"
        meta["device_slug"] = "cpu"
    return meta


def library_versions() -> dict[str, str | None]:
    """Installed versions of the optional kernel libraries (None: not installed)."""
    from importlib import metadata

    versions = {}
    for name in ("nvidia-cudnn-frontend", "flash-attn-4", "fla-core", "liger-kernel"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_slug(name: str, count: int = 1) -> str:
    """A short lower-case name of a device: "NVIDIA H200" → "h200", "NVIDIA A100-SXM4-80GB" →
    "a100", "NVIDIA GeForce RTX 4090" → "rtx4090"; ``count`` > 1 appends "x<count>"."""
    text = re.sub(r"\(.*?\)", " ", name.lower())
    tokens = [t for t in re.findall(r"[a-z0-9]+", text) if t not in ("nvidia", "geforce", "amd")]
    if not tokens or name.lower().startswith("cpu"):
        slug = "cpu"
    else:
        at = next((i for i, t in enumerate(tokens) if re.search(r"\d", t)), 0)
        slug = tokens[at]
        if slug.isdigit() and at > 0:
            slug = tokens[at - 1] + slug
    return f"{slug}x{count}" if count > 1 else slug


def record_name(benchmark: str, device: str, date: str, tag: str | None = None) -> str:
    """``<benchmark>_<device>_<date>[_<tag>]`` (``date`` starts with ``YYYY-MM-DD``)."""
    stem = f"{benchmark}_{device}_{date[:10]}" + (f"_{tag}" if tag else "")
    if not NAME.match(stem):
        raise ValueError(f"not a result name: {stem!r}")
    return stem


# ---------------------------------------------------------------------------------------- output


def default_out() -> str:
    return os.environ.get("OUT") or str(RESULTS)


def tag_type(text: str) -> str:
    if not _TAG.match(text):
        raise argparse.ArgumentTypeError(
            f"a tag is lower-case letters, digits, '_' and '-', got {text!r}")
    return text


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=default_out(),
                        help="directory of the result files (default: $OUT, else "
                             "benchmarks/results)")
    parser.add_argument("--tag", type=tag_type, default=None,
                        help="suffix of the file names, for several runs of one benchmark on "
                             "one day")


def join_tags(*tags: str | None) -> str | None:
    return "_".join(t for t in tags if t) or None


@dataclass
class Record:
    """The result files of one run: ``<out>/<benchmark>_<device>_<date>[_<tag>].<ext>``. The
    name is fixed when the record is made (a run that passes midnight keeps its file)."""

    benchmark: str
    meta: dict
    out: Path | str
    tag: str | None = None
    device: str | None = None
    """The device slug (default: ``meta["device_slug"]``, else a slug of ``meta["device"]``)."""
    stem: str = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        device = self.device or self.meta.get("device_slug") or device_slug(
            str(self.meta.get("device", "cpu")))
        self.stem = record_name(self.benchmark, device, str(self.meta["date"]), self.tag)

    def path(self, suffix: str) -> Path:
        """``<out>/<stem><suffix>`` (``suffix`` such as ".json")."""
        return self.out / f"{self.stem}{suffix}"

    def write_json(self, data: object, **dump) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.path(".json")
        path.write_text(json.dumps(data, **{"indent": 1, **dump}), encoding="utf-8")
        return path

    def write_text(self, text: str, suffix: str = ".md") -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.path(suffix)
        path.write_text(text, encoding="utf-8")
        return path

    def write(self, data: object, markdown: str | None = None, **dump) -> None:
        """The JSON, and the Markdown table when given."""
        self.write_json(data, **dump)
        if markdown is not None:
            self.write_text(markdown)


def write_with_choices(record: Record, data: dict, markdown: Callable[[dict], str]) -> None:
    """``data`` (with the autotuners' choices so far in ``data["meta"]["autotune"]``) and its
    table ``markdown(data)``: the writer of benchmarks that record after every shape."""
    from fsa_train.kernels.tuning import autotune_choices

    data["meta"]["autotune"] = autotune_choices()
    record.write(data, markdown(data), indent=2)


def run_shapes(record: Record, meta: dict, shapes: list[tuple],
               run_shape: Callable[..., dict], markdown: Callable[[dict], str]) -> dict:
    """``run_shape(*shape[1:])`` for every ``(name, ...)`` in ``shapes``; the record is written
    after each (a run cut short still reports) and the table printed at the end."""
    results = {"meta": meta, "shapes": {}}
    for name, *shape in shapes:
        results["shapes"][name] = run_shape(*shape)
        print(name, results["shapes"][name], flush=True)
        torch.cuda.empty_cache()
        record.write(results, markdown(results))
    print(markdown(results))
    return results
