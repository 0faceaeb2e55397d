#!/usr/bin/env bash
# Multi-GPU trainer check on a machine with 2 GPUs (issue: DeepSpeed ZeRO, exact resume, scaling).
# After a short warm-up run that fills Triton's kernel cache, runs with the same global batch
# (8 windows of 2048 tokens) and data order:
#   single : 1 GPU, batch 4, gradient accumulation 2
#   zero2  : 2 GPUs, DeepSpeed ZeRO-2, batch 4 per GPU
#   zero3  : 2 GPUs, DeepSpeed ZeRO-3, batch 4 per GPU
#   resume : 2 GPUs, ZeRO-2, stopped at STEPS/2 (StopAtStep), then `--resume auto` to STEPS
# then writes trainer_check.json / .md (loss agreement, resume agreement, 2-GPU scaling) to OUT.
# SCALING_ONLY=1: only 1 GPU vs 2 GPUs ZeRO-2 with the same micro-batch per GPU (scaling.json).
# EXTRA_ARGS (options appended to every run) lets the script be smoke-tested on CPUs.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-30}
RUNS=${RUNS:-/tmp/trainer_check}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export WANDB_MODE=offline FSA_TRAIN_CACHE=$RUNS/cache PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"

fit() {  # fit NAME DEVICES STEPS [extra args...]
    local name=$1 devices=$2 steps=$3
    shift 3
    mkdir -p "$RUNS/$name"
    local stop_callback=""
    if [ -n "${STOP_AT:-}" ]; then
        stop_callback="    - class_path: fsa_train.callbacks.StopAtStep
      init_args: {step: $STOP_AT}
"
    fi
    cat > "$RUNS/$name/overlay.yaml" <<YAML
trainer:
  default_root_dir: $RUNS/$name
  logger:
    class_path: fsa_train.loggers.AutoWandbLogger
    init_args: {save_dir: $RUNS/$name, name: $name}
  callbacks:
    - class_path: fsa_train.checkpointing.SafeModelCheckpoint
      init_args: {dirpath: $RUNS/$name/checkpoints, save_last: true, save_top_k: 0,
                  every_n_train_steps: $((STEPS / 2))}
$stop_callback    - class_path: fsa_train.callbacks.ThroughputMonitor
    - class_path: fsa_train.callbacks.MetricsFile
      init_args: {path: $RUNS/$name/metrics.jsonl}
YAML
    python3 -m fsa_train.cli fit --config configs/base.yaml \
        --config benchmarks/configs/trainer_check.yaml --config "$RUNS/$name/overlay.yaml" \
        --trainer.devices "$devices" --trainer.max_steps "$steps" "$@" ${EXTRA_ARGS:-} \
        > "$RUNS/$name.${STOP_AT:-$steps}.log" 2>&1 || { tail -40 "$RUNS/$name.${STOP_AT:-$steps}.log"; exit 1; }
    echo "done: $name ($devices GPU, ${STOP_AT:-$steps} of $steps steps)"
}

# Fill Triton's on-disk kernel cache first, so no run times compilations (discarded).
fit warmup 1 10 --trainer.strategy auto
if [ -n "${SCALING_ONLY:-}" ]; then
    # Scaling only: the same micro-batch per GPU on 1 GPU and on 2 GPUs with ZeRO-2; tokens/s
    # per GPU after warm-up (EXTRA_ARGS sets a realistic model and sequence length).
    fit scale1 1 "$STEPS" --trainer.strategy auto
    fit scale2 2 "$STEPS" --config configs/strategy/zero2.yaml
    python3 benchmarks/summarize_trainer_check.py --scaling "$RUNS" "$OUT"
    exit 0
fi
fit single 1 "$STEPS" --trainer.strategy auto --trainer.accumulate_grad_batches 2
fit zero2 2 "$STEPS" --config configs/strategy/zero2.yaml
fit zero3 2 "$STEPS" --config configs/strategy/zero3.yaml
STOP_AT=$((STEPS / 2)) fit resume 2 "$STEPS" --config configs/strategy/zero2.yaml
fit resume 2 "$STEPS" --config configs/strategy/zero2.yaml --resume auto
python3 benchmarks/summarize_trainer_check.py "$RUNS" "$OUT"
