"""On one GPU: the sequence-parallel preset with P = 1 trains like a plain run (issue 21).

``model.sequence_parallel: 1`` is the plain path in the code (``LitGPT.setup`` forms no group,
batches are not sharded, the attention core runs without the all-to-all); what
``configs/strategy/ulysses.yaml`` adds is DeepSpeed ZeRO-2 with bf16. A tiny NSA GPT trains a
few steps through the real ``fsa-train fit`` twice on one GPU, with ``--config
configs/strategy/ulysses.yaml --model.sequence_parallel 1`` and without it (Lightning's
automatic strategy, bf16-mixed), and the losses must agree to bf16 rounding: DeepSpeed keeps
the weights in bf16 and updates an fp32 master copy, the plain run keeps fp32 weights under
autocast. Run with ``pytest -m gpu tests/parallel``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _fit(root: Path, corpus: Path, *extra: str) -> list[dict]:
    """``fsa-train fit`` of the demo's NSA GPT cut to 2 layers and 256-token windows, in a
    process of its own (DeepSpeed's process group must not outlive the run); each step's
    metrics."""
    root.mkdir(parents=True)
    overlay = root / "overlay.yaml"
    overlay.write_text(
        f"""
trainer:
  accelerator: gpu
  devices: 1
  precision: bf16-mixed
  max_steps: {STEPS}
  val_check_interval: null
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger: false
  callbacks:
    - class_path: fsa_train.callbacks.MetricsFile
      init_args: {{path: {root / "metrics.jsonl"}}}
""",
        encoding="utf-8",
    )
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    # the second run reuses the first one's autotuning from Triton's disk cache
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=os.pathsep.join(paths),
               TRITON_CACHE_AUTOTUNING="1")
    env.pop("MASTER_PORT", None)
    command = [sys.executable, "-m", "fsa_train.cli", "fit", "--config", "configs/demo.yaml",
               "--config", str(overlay), *extra, "--model.config.n_layer", "2",
               "--model.warmup_steps", "2", "--model.sample_tokens", "4",
               "--data.corpus", str(corpus), "--data.cache_dir", str(root.parent / "cache"),
               "--data.vocab_size", "320", "--data.seq_len", "256", "--data.batch_size", "2",
               "--data.val_documents", "2"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def test_ulysses_preset_with_one_rank_trains_like_a_plain_run(small_corpus, tmp_path):
    pytest.importorskip("deepspeed")
    plain = _fit(tmp_path / "plain", small_corpus)
    preset = _fit(tmp_path / "ulysses", small_corpus, "--config",
                  "configs/strategy/ulysses.yaml", "--model.sequence_parallel", "1")
    assert [r["step"] for r in plain] == [r["step"] for r in preset] == list(range(1, STEPS + 1))
    for a, b in zip(plain, preset, strict=True):
        assert a["train/tokens_seen"] == b["train/tokens_seen"]
    losses = [(a["train/loss"], b["train/loss"]) for a, b in zip(plain, preset, strict=True)]
    print("plain / ulysses P=1 losses:", losses)
    # bf16 weights against fp32 ones: the first step's loss differs by rounding only, and the
    # runs stay together (a wrong gradient scale or data order would not)
    assert abs(losses[0][0] - losses[0][1]) < 0.01, losses
    assert all(abs(a - b) < 0.05 for a, b in losses), losses
