"""Summarise benchmarks/trainer_gpu_check.sh: loss agreement of ZeRO-2/3 with one GPU, exact
resume under ZeRO-2, and 2-GPU scaling efficiency. Writes trainer_check.json and .md."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

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


def main(runs: Path, out: Path) -> None:
    single, zero2, zero3 = (records(runs / name) for name in ("single", "zero2", "zero3"))
    resumed = records(runs / "resume")
    ref = losses(single, micro_batches=2)
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
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
        f"| 1 GPU | {ref[-1]:.4f} | 0 | {per_device['single']:.0f} | 1.00 |",
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
    (out / "trainer_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def scaling(runs: Path, out: Path) -> None:
    """``SCALING_ONLY`` runs: tokens/s per GPU of 2-GPU ZeRO-2 over 1 GPU, same micro-batch."""
    one, two = (tokens_per_s_per_device(records(runs / name)) for name in ("scale1", "scale2"))
    log = next(runs.glob("scale1.*.log"))
    run_config = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "extra_args": os.environ.get("EXTRA_ARGS", ""),
        "tokens_per_s_per_device": {"1 GPU": one, "2 GPUs ZeRO-2": two},
        "scaling_efficiency": two / one, "log_tail_1gpu": run_config,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail_1gpu"}, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "--scaling":
        scaling(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
