"""Device and precision choices shared by the evaluation commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@contextlib.contextmanager
def precision(device: torch.device, name: str = "auto") -> Iterator[None]:
    """Inference precision: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    use_bf16 = name == "bf16" or (name == "auto" and device.type == "cuda")
    if use_bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every evaluation command takes: the export, device, precision, --out."""
    parser.add_argument("exported", help="file written by `fsa-train export`")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--out", default=None, help="write the full results as JSON here")


def load_model(args: argparse.Namespace, needs_tokenizer: bool = True):
    """``(device, model, tokenizer)`` of ``args.exported`` on ``args.device``; a one-line error
    when a tokenizer is needed and the export holds none."""
    from fsa_train.export import load_exported

    device = pick_device(args.device)
    model, tokenizer = load_exported(args.exported, device)
    if needs_tokenizer and tokenizer is None:
        raise ValueError(f"{args.exported}: the export holds no tokenizer; cannot build prompts")
    return device, model, tokenizer


def write_result(result: dict, out: str | None) -> None:
    """The full result as JSON at ``out`` (parents created), when given."""
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {path}")


def evaluate_grid(label: str, lengths: Sequence[int], depths: Sequence[float], trials: int,
                  score_trial: Callable[[int, float, int], dict], means: dict[str, str],
                  progress: Callable[[str], None] | None = None) -> tuple[list[dict], float]:
    """Run ``score_trial(length, depth, trial)`` over the grid; each cell holds the mean of every
    trial field named in ``means`` (cell key -> trial key; "accuracy" is required) and the
    trials. Returns the cells and the mean accuracy. ``progress`` gets one line per cell."""
    cells = []
    started = time.perf_counter()
    for length in lengths:
        for depth in depths:
            results = [score_trial(length, depth, trial) for trial in range(trials)]
            cell = {"length": length, "depth": depth}
            for name, field in means.items():
                cell[name] = sum(float(r[field]) for r in results) / trials
            cells.append({**cell, "trials": results})
            if progress is not None:
                progress(f"{label}: cell {len(cells)}/{len(lengths) * len(depths)} (length "
                         f"{length}, depth {depth:g}): exact match {cell['accuracy']:.2f}, "
                         f"{time.perf_counter() - started:.0f} s so far")
    overall = sum(c["accuracy"] for c in cells) / len(cells) if cells else 0.0
    return cells, overall


def trial_rng(label: str, seed: int, length: int, depth: float, trial: int) -> random.Random:
    """A generator for one trial of evaluation ``label`` that does not depend on which other
    cells are evaluated."""
    return random.Random(f"{label}:{seed}:{length}:{depth!r}:{trial}")


def add_grid_arguments(parser: argparse.ArgumentParser, lengths: list[int],
                       depths: list[float], trials: int) -> None:
    """--lengths, --depths, --trials and --seed of a (length, depth) evaluation grid."""
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths,
                        help="prompt lengths in tokens (e.g. 1x, 2x, 4x the training context)")
    parser.add_argument("--depths", type=float, nargs="+", default=depths,
                        help="where the key sits in the filler (0: start, farthest back)")
    parser.add_argument("--trials", type=int, default=trials, help="prompts per cell")
    parser.add_argument("--seed", type=int, default=0)


def parse_grid_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the grid's checks (one-line usage errors)."""
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        parser.error("--depths must be in [0, 1]")
    return args
