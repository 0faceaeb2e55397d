#!/usr/bin/env bash
# The loss-parity experiment (benchmarks/loss_parity.py) on a lent GPU machine, as steps that
# each fit one device call of at most 10 minutes. Every step is idempotent.
#
# Here, on the CPU machine, once per checkout (needs apt-get and the project's .venv):
#   bash benchmarks/loss_parity_device.sh local
#     → .parity/natural.jsonl.gz (Debian docs, dictionary, KJV) and .parity/spm32k.model (a 32K
#       BPE trained on it and this machine's Python standard library), .whl/ (jsonargparse)
# On the device, carry [".parity", ".whl"], one call per line:
#   bash benchmarks/loss_parity_device.sh data            # + Python code of that machine → dataset
#   STOP_AT=800 bash benchmarks/loss_parity_device.sh run dense 0   # first half of one run
#   bash benchmarks/loss_parity_device.sh run dense 0     # the rest (resumes)
#   bash benchmarks/loss_parity_device.sh run nsa 0
#   bash benchmarks/loss_parity_device.sh finish          # position loss, passkey, report → $OUT
# Runs live under runs/parity (ignored by git; kept between calls while the machine stays warm).
# Knobs: SEQ_LEN (8192), BATCH (4), STEPS (1600: 52.4M tokens at 8192 x 4), VAL_EVERY (100).
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ_LEN=${SEQ_LEN:-8192}
BATCH=${BATCH:-4}
STEPS=${STEPS:-1600}
VAL_EVERY=${VAL_EVERY:-100}
RUNS=${RUNS:-runs/parity}
DATA=${DATA:-runs/parity-data}
PY=${PY:-python3}

setup_device() {
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  # Triton's switch: keep autotuning results on disk, so the second job of a run (and the
  # later runs, all of one shape) skip the minute of tuning the first NSA step costs.
  export TRITON_CACHE_AUTOTUNING=1
}

case "${1:-}" in
  local)
    PY=.venv/bin/python
    mkdir -p .parity
    grep -qx '/.parity/' .git/info/exclude 2>/dev/null || echo '/.parity/' >> .git/info/exclude
    stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    "$PY" benchmarks/parity_corpus.py --out .parity --debian /tmp/parity-debs --code "$stdlib"
    .venv/bin/fsa-train train-tokenizer .parity/natural.jsonl.gz .parity/code.jsonl.gz \
      --output .parity/spm32k --vocab_size 32000 --sample_size 400000
    rm .parity/code.jsonl.gz  # the device builds its own from its Python (carry limit 64 MiB)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp -d .whl jsonargparse docstring-parser typeshed-client \
      typing-extensions 2>&1 | grep -v 'is ignored' || true
    du -sh .parity .whl
    ;;
  data)
    setup_device
    if [ -f "$DATA/meta.json" ]; then echo "$DATA: exists"; exit 0; fi
    roots=$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["stdlib"], p["purelib"])')
    # shellcheck disable=SC2086
    "$PY" benchmarks/parity_corpus.py --out runs/parity-corpus $(printf -- '--code %s ' $roots)
    "$PY" -m fsa_train.cli prepare-data .parity/natural.jsonl.gz runs/parity-corpus/code.jsonl.gz \
      --tokenizer .parity/spm32k.model --output "$DATA" --val_documents 0.01 \
      --workers "$(nproc)"
    ;;
  run)
    setup_device
    mode=${2:?run dense|nsa [seed]}
    seed=${3:-0}
    "$PY" benchmarks/loss_parity.py run --dataset "$DATA" --out "$RUNS" --modes "$mode" \
      --seeds "$seed" --tokens $((STEPS * SEQ_LEN * BATCH)) --seq_len "$SEQ_LEN" \
      --batch_size "$BATCH" --val_every "$VAL_EVERY" ${STOP_AT:+--stop_at "$STOP_AT"}
    ;;
  finish)
    setup_device
    "$PY" benchmarks/loss_parity.py evaluate --dataset "$DATA" --out "$RUNS" --seq_len "$SEQ_LEN"
    "$PY" benchmarks/loss_parity.py report --out "$RUNS" --results "${OUT:-$RUNS}"
    ;;
  *)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
