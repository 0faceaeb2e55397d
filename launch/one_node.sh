#!/usr/bin/env bash
# Train on every GPU of this machine (Lightning starts one process per GPU).
# STRATEGY picks a preset from configs/strategy (ddp, zero1, zero2, zero3; default zero2).
#   STRATEGY=zero3 launch/one_node.sh --config configs/model/gpt-150m-nsa.yaml --resume auto
set -euo pipefail
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -lt 1 ]; then
    echo "launch/one_node.sh: no GPU found (nvidia-smi -L lists none)" >&2
    exit 1
fi
strategy=${STRATEGY:-zero2}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec fsa-train fit --config configs/base.yaml --config "configs/strategy/${strategy}.yaml" \
    --trainer.accelerator gpu --trainer.devices "$gpus" --trainer.num_nodes 1 "$@"
