#!/usr/bin/env bash
# The device-session plumbing of the benchmarks, one subcommand per job. Run from anywhere (it
# changes to the repo root); PY is the Python to use (default python3).
#
#   bash benchmarks/device.sh wheels
#     Install the carried wheels in .whl/ (no index, no deps) into /tmp/site; the other
#     subcommands do it themselves and put /tmp/site and the repo on PYTHONPATH.
#   bash benchmarks/device.sh split-wheels DIR...
#     Here: the wheels of DIR... (e.g. FlashAttention-4 and its 92 MB CuTe DSL runtime, more than
#     one call's 64 MiB carry) cut into parts of at most 45 MiB, in .wheel-parts-1/, -2/, ...
#     (git-excluded). Carry one folder per call, in calls back to back (a warm machine keeps the
#     folders an earlier call carried), then in the last call:
#   bash benchmarks/device.sh join-wheels
#     On the device: reassembles every .wheel-parts-*/ into /tmp/joined-wheels (checking each
#     wheel's sha256) and installs them like the carried .whl/ (no index, no deps).
#   WORKERS=4 bash benchmarks/device.sh gpu-tests [pytest args, default tests]
#     The GPU-only tests (`-m gpu`: kernels at real sizes, bf16/fp16, determinism, CUDA graphs), in
#     parallel over WORKERS processes when pytest-xdist is there (the suite is mostly Triton
#     compilation and autotuning, which is CPU work: one process took > 330 s for 40 of its 60
#     tests on an H200 machine). Carry ".whl" holding pytest-xdist and execnet wheels
#     (`device.sh loss-parity local` downloads them). The log, with the 25 slowest tests, goes to
#     $OUT/gpu_tests.log (or ./gpu_tests.log).
#   bash benchmarks/device.sh bench NAME [flags]
#     `python -m benchmarks run NAME [flags]` with the carried wheels installed.
#   bash benchmarks/device.sh loss-parity local|data|run MODE [SEED]|finish|advance
#     The loss-parity experiment (benchmarks/loss_parity.py) as steps that each fit one device
#     call of at most 10 minutes; every step is idempotent.
#     Here, on the CPU machine, once per checkout (needs apt-get and the project's .venv):
#       local   → .parity/natural.jsonl.gz (Debian docs, dictionary, KJV) and .parity/spm32k.model
#                 (a 32K BPE trained on it and this machine's Python standard library), .whl/
#                 (jsonargparse; pytest-xdist for gpu-tests)
#     On the device, carry [".parity", ".whl"], one call per line:
#       data                 the dataset (+ Python code of that machine)
#       STOP_AT=800 ... run dense 0   first half of one run;  run dense 0: the rest (resumes)
#       run nsa 0
#       finish               position loss, passkey, selection overlap, report → $OUT
#     or the same command in every call until it prints "finish rc=0" (each call goes as far as
#     its BUDGET seconds allow, then stops at the last checkpoint; the next call resumes):
#       BUDGET=570 SEEDS="0 1" bash benchmarks/device.sh loss-parity advance
#     Runs live under runs/parity (ignored by git; kept between calls while the machine stays
#     warm). Knobs: SEQ_LEN (8192), BATCH (4), STEPS (1600: 52.4M tokens at 8192 x 4), VAL_EVERY
#     (100); MODEL_CONFIG, VOCAB, PRECISION, VAL_BATCHES, PASSKEY_LENGTHS (loss_parity's
#     defaults); advance: BUDGET (570 s), SEEDS ("0"), MODES ("dense nsa"; add nsa_block for
#     block-shared selection, dense_window for the window-only ablation), RETRIEVAL (the
#     fraction of training windows that are retrieval documents), RETRIEVAL_KEYS; finish:
#     RETRIEVAL_LENGTHS (fsa-train retrieval at these lengths), SHORT_CONTEXT (key tokens),
#     KEY_REFERENCE (the mode that chooses them, e.g. dense); FROM (committed loss_parity_*
#     directories, separated by spaces, whose finished, evaluated runs join the report
#     instead of running again: same recipe only), TAG (the report's name suffix). $OUT gets each job's
#     log and the run records (runs_jsonl.tgz), and the report once every run has finished.
#   bash benchmarks/device.sh trainer-check
#     Multi-GPU trainer check on a machine with 2 GPUs (DeepSpeed ZeRO, exact resume, scaling).
#     After a short warm-up run that fills Triton's kernel cache, runs with the same global batch
#     (8 windows of 2048 tokens) and data order:
#       single : 1 GPU, batch 4, gradient accumulation 2
#       zero2  : 2 GPUs, DeepSpeed ZeRO-2, batch 4 per GPU
#       zero3  : 2 GPUs, DeepSpeed ZeRO-3, batch 4 per GPU
#       resume : 2 GPUs, ZeRO-2, stopped at STEPS/2 (StopAtStep), then `--resume auto` to STEPS
#     then `python -m benchmarks run trainer_check` writes trainer_check_<device>x2_<date>.{json,md}
#     (loss agreement, resume agreement, 2-GPU scaling) to OUT (default benchmarks/results).
#     SCALING_ONLY=1: only 1 GPU vs 2 GPUs ZeRO-2 with the same micro-batch per GPU (tag
#     scaling). STEPS (30), RUNS (/tmp/trainer_check); EXTRA_ARGS (options appended to every run)
#     lets it be smoke-tested on CPUs.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
PY=${PY:-python3}

install_carried_wheels() {
  if [ -d .whl ]; then
    # one wheel at a time: a wheel built for another Python or platform is reported and skipped
    # instead of failing the others
    local wheel
    for wheel in .whl/*.whl; do
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheel" 2>/dev/null || echo "skipped $wheel (not for this Python)" >&2
    done
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
}

gpu_tests() {
  install_carried_wheels
  local parallel=()
  # loadgroup: tests marked xdist_group("gpu_memory") (references at real sizes, tens of GiB
  # each) share one worker, so they do not run side by side: two of them at once ran the 140 GiB
  # H200 out of memory on 2026-12-02 (results/gpu_tests_h200_2026-12-02_core_selected.log).
  # 4 workers, not 8: with 8 the suite of 2026-12-03 ran the GPU out of memory in 10 tests, and
  # an out-of-memory error inside torch's non-reentrant checkpoint leaves its saved-tensor hooks
  # installed in that worker, failing its later tests with CheckpointError
  # (results/gpu_tests_h200_2026-12-03_custom_ops.log)
  if "$PY" -c 'import xdist' 2>/dev/null; then parallel=(-n "${WORKERS:-4}" --dist loadgroup); fi
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  local log=${OUT:-.}/gpu_tests.log
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
  "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider --durations=25 "${parallel[@]}" \
    "${@:-tests}" 2>&1 | tee -a "$log"
}

# ------------------------------------------------------------------------------- loss parity

parity_setup_device() {
  install_carried_wheels
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  # No TRITON_CACHE_AUTOTUNING: Triton's disk cache keys ignore our size classes. Our tuning
  # cache (FSA_TUNING_CACHE, default ~/.cache/fsa-train/tuning) keeps the choices per size class,
  # so the second job of a run and the later runs skip the minute of tuning of the first NSA step.
}

loss_parity() {
  set -e
  SEQ_LEN=${SEQ_LEN:-8192}
  BATCH=${BATCH:-4}
  STEPS=${STEPS:-1600}
  VAL_EVERY=${VAL_EVERY:-100}
  RUNS=${RUNS:-runs/parity}
  DATA=${DATA:-runs/parity-data}
  local parity=("$PY" -m benchmarks run loss_parity)
  case "${1:-}" in
    local)
      PY=.venv/bin/python
      mkdir -p .parity
      grep -qx '/.parity/' .git/info/exclude 2>/dev/null || echo '/.parity/' >> .git/info/exclude
      local stdlib
      stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
      "$PY" -m benchmarks run parity_corpus --out .parity --debian /tmp/parity-debs \
        --code "$stdlib"
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
      parity_setup_device
      if [ -f "$DATA/meta.json" ]; then echo "$DATA: exists"; exit 0; fi
      local roots
      roots=$("$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["stdlib"], p["purelib"])')
      # shellcheck disable=SC2086
      "$PY" -m benchmarks run parity_corpus --out runs/parity-corpus \
        $(printf -- '--code %s ' $roots)
      "$PY" -m fsa_train.cli prepare-data .parity/natural.jsonl.gz runs/parity-corpus/code.jsonl.gz \
        --tokenizer .parity/spm32k.model --output "$DATA" --val_documents 0.01 \
        --workers "$(nproc)"
      ;;
    run)
      parity_setup_device
      local mode=${2:?run dense|nsa [seed]}
      local seed=${3:-0}
      "${parity[@]}" run --dataset "$DATA" --out "$RUNS" --modes "$mode" \
        --seeds "$seed" --tokens $((STEPS * SEQ_LEN * BATCH)) --seq_len "$SEQ_LEN" \
        --batch_size "$BATCH" --val_every "$VAL_EVERY" ${STOP_AT:+--stop_at "$STOP_AT"} \
        ${MODEL_CONFIG:+--model_config "$MODEL_CONFIG"} ${VOCAB:+--vocab_size "$VOCAB"} \
        ${PRECISION:+--precision "$PRECISION"} ${VAL_BATCHES:+--val_batches "$VAL_BATCHES"} \
        ${RETRIEVAL:+--retrieval_fraction "$RETRIEVAL"} \
        ${RETRIEVAL_KEYS:+--retrieval_keys "$RETRIEVAL_KEYS"}
      ;;
    finish)
      parity_setup_device
      # shellcheck disable=SC2086
      "${parity[@]}" evaluate --dataset "$DATA" --out "$RUNS" --seq_len "$SEQ_LEN" \
        ${PASSKEY_LENGTHS:+--passkey_lengths $PASSKEY_LENGTHS} \
        ${RETRIEVAL_LENGTHS:+--retrieval_lengths $RETRIEVAL_LENGTHS} \
        ${RETRIEVAL_KEYS:+--retrieval_keys "$RETRIEVAL_KEYS"} \
        ${SHORT_CONTEXT:+--short_context "$SHORT_CONTEXT"} \
        ${KEY_REFERENCE:+--key_reference "$KEY_REFERENCE"}
      "${parity[@]}" report --out "$RUNS" --results "${OUT:-$RUNS}" ${TAG:+--tag "$TAG"}
      ;;
    advance)
      local deadline=$((SECONDS + ${BUDGET:-570}))
      local out=${OUT:-$RUNS}
      mkdir -p "$out"
      save() {  # the small run records, so a call that loses the machine still returns its curves
        find "$RUNS" \( -name '*.jsonl' -o -name '*.yaml' -o -name '*.json' \
          -o -name 'key_tokens.npz' \) -print0 \
          2>/dev/null | tar czf "$out/runs_jsonl.tgz" --null -T - 2>/dev/null || true
      }
      # step LOG STEP...: one step of this script within the time left; 124 when it ran out
      step() {
        local log=$1 left=$((deadline - SECONDS)) rc=0
        shift
        if [ "$left" -lt 30 ]; then echo "$*: in the next call ($left s left)"; return 124; fi
        timeout "$left" bash "$SELF" loss-parity "$@" > "$out/$log" 2>&1 || rc=$?
        echo "$* rc=$rc, $((deadline - SECONDS)) s left"
        tail -c 600 "$out/$log" | tr '\r' '\n' | tail -4
        return "$rc"
      }
      if [ -n "${FROM:-}" ]; then  # committed runs to compare with, instead of running them again
        mkdir -p "$RUNS"
        local from
        for from in $FROM; do
          for run in "$from"/*/; do
            if [ ! -e "$RUNS/$(basename "$run")" ]; then cp -r "$run" "$RUNS/"; echo "$run: copied"; fi
          done
        done
      fi
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
      echo "usage: bash benchmarks/device.sh loss-parity local|data|run MODE [SEED]|finish|advance" >&2
      exit 2
      ;;
  esac
}

# ----------------------------------------------------------------------------- trainer check

trainer_check() {
  set -e
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
    # shellcheck disable=SC2086
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
    python3 -m benchmarks run trainer_check "$RUNS" --scaling --out "$OUT"
    exit 0
  fi
  fit single 1 "$STEPS" --trainer.strategy auto --trainer.accumulate_grad_batches 2
  fit zero2 2 "$STEPS" --config configs/strategy/zero2.yaml
  fit zero3 2 "$STEPS" --config configs/strategy/zero3.yaml
  STOP_AT=$((STEPS / 2)) fit resume 2 "$STEPS" --config configs/strategy/zero2.yaml
  fit resume 2 "$STEPS" --config configs/strategy/zero2.yaml --resume auto
  python3 -m benchmarks run trainer_check "$RUNS" --out "$OUT"
}

split_wheels() {
  set -e
  rm -rf .wheel-parts-*
  grep -qx '/.wheel-parts-\*/' .git/info/exclude 2>/dev/null || echo '/.wheel-parts-*/' >> .git/info/exclude
  local limit=$(( ${WHEEL_PART_MIB:-45} * 1024 * 1024 )) index=1 used=0 wheel name piece size
  local pieces
  pieces=$(mktemp -d)
  for wheel in $(find "$@" -name '*.whl' | sort); do  # big wheels as numbered pieces
    name=$(basename "$wheel")
    if [ "$(stat -c %s "$wheel")" -gt "$limit" ]; then
      sha256sum "$wheel" | cut -d' ' -f1 > "$pieces/$name.sha256"
      split -b "$limit" -d -a 2 "$wheel" "$pieces/$name.piece."
    else
      cp "$wheel" "$pieces/"
    fi
  done
  mkdir -p ".wheel-parts-$index"
  for piece in "$pieces"/*; do  # first fit into parts of at most the limit
    size=$(stat -c %s "$piece")
    if [ $((used + size)) -gt "$limit" ] && [ "$used" -gt 0 ]; then
      index=$((index + 1)); used=0; mkdir -p ".wheel-parts-$index"
    fi
    mv "$piece" ".wheel-parts-$index/"
    used=$((used + size))
  done
  rmdir "$pieces"
  du -sh .wheel-parts-*
}

join_wheels() {
  set -e
  local out=/tmp/joined-wheels sum name wheel
  mkdir -p "$out"
  for wheel in .wheel-parts-*/*.whl; do [ -e "$wheel" ] && cp "$wheel" "$out/"; done
  for sum in .wheel-parts-*/*.sha256; do
    [ -e "$sum" ] || continue
    name=$(basename "$sum" .sha256)
    # the pieces in their numbered order, whichever part carried them
    find . -path './.wheel-parts-*' -name "$name.piece.*" | awk -F. '{print $NF, $0}' | sort -n \
      | cut -d' ' -f2- | xargs cat > "$out/$name"
    if [ "$(sha256sum "$out/$name" | cut -d' ' -f1)" != "$(cat "$sum")" ]; then
      echo "join-wheels: $name: the joined pieces do not match its sha256 (a part is missing)" >&2
      rm -f "$out/$name"
      exit 1
    fi
  done
  for wheel in "$out"/*.whl; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheel" 2>/dev/null || echo "skipped $wheel (not for this Python)" >&2
  done
  ls "$out"
}

command=${1:-}
shift || true
case "$command" in
  wheels) install_carried_wheels; echo "PYTHONPATH=$PYTHONPATH" ;;
  split-wheels) split_wheels "$@" ;;
  join-wheels) join_wheels ;;
  gpu-tests) gpu_tests "$@" ;;
  bench) install_carried_wheels; "$PY" -m benchmarks run "$@" ;;
  loss-parity) loss_parity "$@" ;;
  trainer-check) trainer_check ;;
  *)
    sed -n '2,/^set -uo pipefail/p' "$SELF" | sed '$d'  # the whole header comment
    exit 2
    ;;
esac
