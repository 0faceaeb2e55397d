"""Two CPU processes (gloo): DDP, DeepSpeed ZeRO-2, and ZeRO-2 with the two ranks sharing each
sequence (`model.sequence_parallel: 2`, the strategy of configs/strategy/ulysses.yaml) resume
exactly where they left off.

Each run goes through the real `fsa-train fit` command, which Lightning re-launches once per
rank. A 20-step run keeps its step-10 checkpoint; a second run resumed from it (`--resume
PATH`: sharded optimizer state, per-rank sampler position, schedule) must end with exactly the
weights of the 20 uninterrupted steps and log the same losses for steps 11-20 (with the
sampler's position not restored, tried once, the sequence-parallel case fails). (Two launches
instead of three: stopping a run and `--resume auto` are covered in tests/test_cli.py and the
loss-parity end-to-end test.) The sequence-parallel run's losses equal a one-process run's
(checked once by hand to 5 decimals over the 20 steps; tests/parallel checks that in-process).
"""

import os
import shutil
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
STRATEGIES["zero2_sp"] = STRATEGIES["zero2"]
SEQUENCE_PARALLEL = {"zero2_sp": "  sequence_parallel: 2\n"}


def write_overlay(root: Path, corpus: Path, strategy: str, steps: int) -> Path:
    overlay = root / "overlay.yaml"
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
      init_args: {{dirpath: {root / "checkpoints"}, save_last: true, save_top_k: -1,
                   every_n_train_steps: 10}}
    - class_path: fsa_train.callbacks.MetricsFile
      init_args: {{path: {root / "metrics.jsonl"}}}
model:
  config: {{n_layer: 2, d_model: 64}}
  warmup_steps: 3
{SEQUENCE_PARALLEL.get(strategy, "")}data:
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


def fit(root: Path, corpus: Path, strategy: str, *extra: str) -> None:
    """20 steps (the schedule's length), keeping a checkpoint every 10.

    A run whose main process died by a signal is run once more from scratch: gloo can abort a
    rank while the two tear down their sockets (the race that Lightning's own CI reruns,
    Lightning-AI/pytorch-lightning#20620). A second death, or any error exit, fails."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=f"{SUPPORT}{os.pathsep}{ROOT}",
               OMP_NUM_THREADS="1")
    env.pop("WANDB_SERVICE", None)  # a wandb service started by earlier in-process tests
    env.pop("MASTER_PORT", None)  # each launch picks a free port of its own
    for _ in range(2):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        overlay = write_overlay(root, corpus, strategy, 20)
        command = [sys.executable, "-m", "fsa_train.cli", "fit", "--config", "configs/demo.yaml",
                   "--config", str(overlay), *extra]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        if result.returncode >= 0:
            break
    assert result.returncode == 0, result.stderr[-4000:]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    state = _read_training_checkpoint(root / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 20
    return {k: v.float() for k, v in state["state_dict"].items()}


def losses(root: Path) -> dict[int, float]:
    import json

    lines = (root / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["train/loss"] for record in map(json.loads, lines)}


# ZeRO-2 runs once, with sequence parallelism: the same DeepSpeed resume path (partitioned
# optimizer state over the two ranks), plus the sequence-parallel sampler state (the plain
# ZeRO-2 case took another 22 s of the CPU suite)
@pytest.mark.parametrize("strategy", ["ddp", "zero2_sp"])
def test_two_process_resume_equals_uninterrupted(strategy, small_corpus, tmp_path):
    if strategy.startswith("zero2"):
        pytest.importorskip("deepspeed")
    fit(tmp_path / "straight", small_corpus, strategy)
    (middle,) = (tmp_path / "straight" / "checkpoints").glob("*step=10*")
    fit(tmp_path / "resumed", small_corpus, strategy, "--resume", str(middle))
    # it continued from step 10 (a fresh start, ignoring --resume, would also end at the same
    # weights on this deterministic CPU run, but would have written its own step-10 checkpoint)
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*step=10*"))
    assert list((tmp_path / "resumed" / "checkpoints").glob("*step=20*"))
    expected = final_weights(tmp_path / "straight")
    resumed = final_weights(tmp_path / "resumed")
    assert expected.keys() == resumed.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "resumed") == {step: straight[step] for step in range(11, 21)}
