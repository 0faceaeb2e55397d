#!/usr/bin/env bash
# The loss-parity experiment (benchmarks/loss_parity.py) on a lent GPU machine, as steps that
# each fit one device call of at most 10 minutes. Every step is idempotent.
#
# Here, on the CPU machine, once per checkout (needs apt-get and the project's .venv):
#   bash benchmarks/loss_parity_device.sh local
#     → .parity/natural.jsonl.gz (Debian docs, dictionary, KJV) and .parity/spm32k.model (a 32K
#       BPE trained on it and this machine's Python standard library), .whl/ (jsonargparse;
#       pytest-xdist for benchmarks/gpu_tests.sh)
# On the device, carry [".parity", ".whl"], one call per line:
#   bash benchmarks/loss_parity_device.sh data            # + Python code of that machine → dataset
#   STOP_AT=800 bash benchmarks/loss_parity_device.sh run dense 0   # first half of one run
#   bash benchmarks/loss_parity_device.sh run dense 0     # the rest (resumes)
#   bash benchmarks/loss_parity_device.sh run nsa 0
#   bash benchmarks/loss_parity_device.sh finish          # position loss, passkey, report → $OUT
# or the same command in every call until it prints "finish rc=0" (each call goes as far as its
# BUDGET seconds allow, then stops at the last checkpoint; the next call resumes):
#   BUDGET=570 SEEDS="0 1" bash benchmarks/loss_parity_device.sh advance
# Runs live under runs/parity (ignored by git; kept between calls while the machine stays warm).
# Knobs: SEQ_LEN (8192), BATCH (4), STEPS (1600: 52.4M tokens at 8192 x 4), VAL_EVERY (100);
# MODEL_CONFIG, VOCAB, PRECISION, VAL_BATCHES, PASSKEY_LENGTHS (loss_parity.py's defaults);
# advance: BUDGET (570 s), SEEDS ("0"), MODES ("dense nsa"). $OUT gets each job's log and the run
# records (runs_jsonl.tgz), and the report once every run has finished.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
SEQ_LEN=${SEQ_LEN:-8192}
BATCH=${BATCH:-4}
STEPS=${STEPS:-1600}
VAL_EVERY=${VAL_EVERY:-100}
RUNS=${RUNS:-runs/parity}
DATA=${DATA:-runs/parity-data}
PY=${PY:-python3}

# shellcheck source=benchmarks/device_wheels.sh
source benchmarks/device_wheels.sh

setup_device() {
  install_carried_wheels
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
      typing-extensions pytest-xdist execnet 2>&1 | grep -v 'is ignored' || true
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
      --batch_size "$BATCH" --val_every "$VAL_EVERY" ${STOP_AT:+--stop_at "$STOP_AT"} \
      ${MODEL_CONFIG:+--model_config "$MODEL_CONFIG"} ${VOCAB:+--vocab_size "$VOCAB"} \
      ${PRECISION:+--precision "$PRECISION"} ${VAL_BATCHES:+--val_batches "$VAL_BATCHES"}
    ;;
  finish)
    setup_device
    # shellcheck disable=SC2086
    "$PY" benchmarks/loss_parity.py evaluate --dataset "$DATA" --out "$RUNS" --seq_len "$SEQ_LEN" \
      ${PASSKEY_LENGTHS:+--passkey_lengths $PASSKEY_LENGTHS}
    "$PY" benchmarks/loss_parity.py report --out "$RUNS" --results "${OUT:-$RUNS}"
    ;;
  advance)
    deadline=$((SECONDS + ${BUDGET:-570}))
    out=${OUT:-$RUNS}
    mkdir -p "$out"
    save() {  # the small run records, so a call that loses the machine still returns its curves
      find "$RUNS" \( -name '*.jsonl' -o -name '*.yaml' -o -name '*.json' \) -print0 \
        2>/dev/null | tar czf "$out/runs_jsonl.tgz" --null -T - 2>/dev/null || true
    }
    # step LOG STEP...: one step of this script within the time left; 124 when it ran out
    step() {
      local log=$1 left=$((deadline - SECONDS)) rc=0
      shift
      if [ "$left" -lt 30 ]; then echo "$*: in the next call ($left s left)"; return 124; fi
      timeout "$left" bash "$SELF" "$@" > "$out/$log" 2>&1 || rc=$?
      echo "$* rc=$rc, $((deadline - SECONDS)) s left"
      tail -c 600 "$out/$log" | tr '\r' '\n' | tail -4
      return "$rc"
    }
    step data.log data || exit 1
    for seed in ${SEEDS:-0}; do
      for mode in ${MODES:-dense nsa}; do
        step "$mode-s$seed.log" run "$mode" "$seed" || { save; exit 0; }  # next call resumes
      done
    done
    save
    if [ $((deadline - SECONDS)) -lt 90 ]; then echo "finish: in the next call"; exit 0; fi
    step finish.log finish || true
    tail -25 "$out/finish.log"
    save
    ;;
  *)
    sed -n '2,23p' "$SELF"
    exit 2
    ;;
esac
