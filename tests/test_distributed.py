"""Two CPU processes (gloo): DDP and DeepSpeed ZeRO-2 resume exactly where they stopped.

Each run goes through the real `fsa-train fit` command, which Lightning re-launches once per
rank. A 20-step run stopped at step 10 and continued with `--resume auto` must end with exactly
the weights of 20 uninterrupted steps.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsa_train.export import _read_training_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "support"

STRATEGIES = {
    "ddp": "  strategy: ddp\n",
    "zero2": (
        "  strategy:\n"
        "    class_path: cpu_deepspeed.CPUDeepSpeedStrategy\n"
        "    init_args: {stage: 2}\n"
    ),
}


def write_overlay(root: Path, corpus: Path, strategy: str, steps: int, stop_at: int | None) -> Path:
    overlay = root / f"overlay-{stop_at}.yaml"
    stop = (
        f"    - class_path: fsa_train.callbacks.StopAtStep\n      init_args: {{step: {stop_at}}}\n"
        if stop_at else ""
    )
    overlay.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 2
{STRATEGIES[strategy]}  precision: 32-true
  max_steps: {steps}
  val_check_interval: null
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: fsa_train.loggers.AutoWandbLogger
    init_args: {{save_dir: {root}, offline: true}}
  callbacks:
    - class_path: fsa_train.checkpointing.SafeModelCheckpoint
      init_args: {{dirpath: {root / "checkpoints"}, save_last: true, save_top_k: 0,
                   every_n_train_steps: 10}}
{stop}model:
  config: {{n_layer: 2, d_model: 64}}
  warmup_steps: 3
data:
  corpus: {corpus}
  cache_dir: {root.parent / "cache"}
  vocab_size: 320
  seq_len: 128
  batch_size: 2
  val_documents: 2
""",
        encoding="utf-8",
    )
    return overlay


def fit(root: Path, corpus: Path, strategy: str, stop_at: int | None, *extra: str) -> None:
    """20 steps (the schedule's length), stopped early at ``stop_at`` when given."""
    root.mkdir(parents=True, exist_ok=True)
    overlay = write_overlay(root, corpus, strategy, 20, stop_at)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=f"{SUPPORT}{os.pathsep}{ROOT}",
               OMP_NUM_THREADS="1")
    env.pop("WANDB_SERVICE", None)  # a wandb service started by earlier in-process tests
    command = [sys.executable, "-m", "fsa_train.cli", "fit", "--config", "configs/demo.yaml",
               "--config", str(overlay), *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    state = _read_training_checkpoint(root / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 20
    return {k: v.float() for k, v in state["state_dict"].items()}


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_process_resume_equals_uninterrupted(strategy, small_corpus, tmp_path):
    if strategy == "zero2":
        pytest.importorskip("deepspeed")
    fit(tmp_path / "straight", small_corpus, strategy, None)
    fit(tmp_path / "split", small_corpus, strategy, 10)
    fit(tmp_path / "split", small_corpus, strategy, None, "--resume", "auto")
    expected = final_weights(tmp_path / "straight")
    resumed = final_weights(tmp_path / "split")
    assert expected.keys() == resumed.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
