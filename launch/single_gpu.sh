#!/usr/bin/env bash
# Train on one GPU. Extra arguments are passed to `fsa-train fit` (more --config files, overrides).
#   launch/single_gpu.sh --config configs/model/gpt-150m-nsa.yaml --resume auto
set -euo pipefail
exec fsa-train fit --config configs/base.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.precision bf16-mixed "$@"
