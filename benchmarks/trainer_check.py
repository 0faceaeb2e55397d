"""Summary of the multi-GPU trainer check (``bash benchmarks/device.sh trainer-check``, which
trains the runs): loss agreement of ZeRO-2/3 with one GPU, exact resume under ZeRO-2, and 2-GPU
scaling efficiency. Writes ``trainer_check_<device>x<gpus>_<date>[_<tag>].{json,md}`` to
``--out``; ``--scaling`` (the ``SCALING_ONLY`` runs) the JSON with tag ``scaling``.

    python -m benchmarks run trainer_check RUNS [--scaling] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks import REGISTRY, register
from benchmarks.common import Record, device_slug, join_tags, utc_now

WARMUP_RECORDS = 6


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def losses(rows: list[dict], micro_batches: int = 1) -> list[float]:
    """Rank 0's loss on its first micro-batch of every optimizer step."""
    return [row["train/loss"] for row in rows[::micro_batches]]


def tokens_per_s_per_device(rows: list[dict]) -> float:
    """Harmonic mean of per-batch rates after warm-up (equal tokens per batch: total/time)."""
    skip = min(WARMUP_RECORDS, len(rows) // 2)
    rates = [row["throughput/tokens_per_s_per_device"] for row in rows[skip:]]
    return statistics.harmonic_mean(rates)


def device_meta() -> dict:
    """Device (and its count), torch version and date of the summary."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    return {"device": device, "gpus": gpus, "torch": torch.__version__, "date": utc_now()}


def record(meta: dict, out: Path, tag: str | None) -> Record:
    slug = device_slug(meta["device"], meta["gpus"])
    return Record("trainer_check", meta, out, tag, device=slug)


def summarize(runs: Path, out: Path, tag: str | None = None) -> None:
    single, zero2, zero3 = (records(runs / name) for name in ("single", "zero2", "zero3"))
    resumed = records(runs / "resume")
    ref = losses(single, micro_batches=2)
    result = {
        **device_meta(),
        "steps": len(ref),
        "final_loss": {"single": ref[-1], "zero2": losses(zero2)[-1], "zero3": losses(zero3)[-1]},
        "max_abs_loss_diff_vs_single": {
            "zero2": max(abs(a - b) for a, b in zip(losses(zero2), ref, strict=True)),
            "zero3": max(abs(a - b) for a, b in zip(losses(zero3), ref, strict=True)),
        },
        "resume_max_abs_loss_diff_vs_uninterrupted_zero2": max(
            abs(a - b) for a, b in zip(losses(resumed), losses(zero2), strict=True)
        ),
        "tokens_per_s_per_device": {
            "single": tokens_per_s_per_device(single),
            "zero2": tokens_per_s_per_device(zero2),
            "zero3": tokens_per_s_per_device(zero3),
        },
    }
    per_device = result["tokens_per_s_per_device"]
    result["scaling_efficiency"] = {
        name: per_device[name] / per_device["single"] for name in ("zero2", "zero3")
    }
    files = record(result, out, tag)
    files.write_json(result, indent=2)
    text = markdown(result)
    files.write_text(text)
    print(text, end="")


def markdown(result: dict) -> str:
    """The table of a summary (from its JSON)."""
    per_device = result["tokens_per_s_per_device"]
    lines = [
        "# Trainer check: DeepSpeed ZeRO on 2 GPUs against 1 GPU",
        "",
        f"{result['device']} × {result['gpus']}, torch {result['torch']}, {result['date']}. "
        f"{result['steps']} steps of the same global batch (8 windows of 2048 tokens, same "
        "order); one GPU uses 4 windows × 2 accumulation steps. Losses are rank 0's loss on its "
        "first micro-batch (the same 4 windows in every run).",
        "",
        "| run | final loss | max abs loss diff vs 1 GPU | tokens/s per GPU | scaling efficiency |",
        "|---|---|---|---|---|",
        f"| 1 GPU | {result['final_loss']['single']:.4f} | 0 | {per_device['single']:.0f} | 1.00 |",
    ]
    for name in ("zero2", "zero3"):
        lines.append(
            f"| 2 GPUs, {name.upper()} | {result['final_loss'][name]:.4f} | "
            f"{result['max_abs_loss_diff_vs_single'][name]:.4f} | {per_device[name]:.0f} | "
            f"{result['scaling_efficiency'][name]:.2f} |"
        )
    lines += [
        "",
        f"Resume (ZeRO-2, {result['steps'] // 2} steps, checkpoint, `--resume auto` to "
        f"{result['steps']}): max abs loss difference against the uninterrupted ZeRO-2 run "
        f"{result['resume_max_abs_loss_diff_vs_uninterrupted_zero2']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def scaling(runs: Path, out: Path, tag: str | None = None) -> None:
    """``SCALING_ONLY`` runs: tokens/s per GPU of 2-GPU ZeRO-2 over 1 GPU, same micro-batch."""
    one, two = (tokens_per_s_per_device(records(runs / name)) for name in ("scale1", "scale2"))
    log = next(runs.glob("scale1.*.log"))
    run_config = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    result = {
        **device_meta(),
        "extra_args": os.environ.get("EXTRA_ARGS", ""),
        "tokens_per_s_per_device": {"1 GPU": one, "2 GPUs ZeRO-2": two},
        "scaling_efficiency": two / one, "log_tail_1gpu": run_config,
    }
    record(result, out, join_tags("scaling", tag)).write_json(result, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail_1gpu"}, indent=2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, help="the run directories (RUNS of device.sh)")
    parser.add_argument("--scaling", action="store_true",
                        help="the SCALING_ONLY runs (scale1, scale2): 1 vs 2 GPUs")


@register("trainer_check", summary="summary of the multi-GPU trainer check (ZeRO-2/3 losses, "
          "resume, scaling)", arguments=add_arguments, gpu=False)
def main(args: argparse.Namespace) -> None:
    (scaling if args.scaling else summarize)(args.runs, Path(args.out), args.tag)


if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["trainer_check"].run()
