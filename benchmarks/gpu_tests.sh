#!/usr/bin/env bash
# The GPU-only tests (`-m gpu`: kernels at real sizes, bf16/fp16, determinism, CUDA graphs) on a
# lent GPU machine, in parallel over WORKERS processes when pytest-xdist is there (the suite is
# mostly Triton compilation and autotuning, which is CPU work: one process took > 330 s for 40
# of its 60 tests on an H200 machine). Carry ".whl" holding pytest-xdist and execnet wheels
# (`bash benchmarks/loss_parity_device.sh local` downloads them) and run from the repo root:
#   WORKERS=8 bash benchmarks/gpu_tests.sh [pytest args, default tests]
# The log, with the 25 slowest tests, goes to $OUT/gpu_tests.log (or ./gpu_tests.log).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# shellcheck source=benchmarks/device_wheels.sh
source benchmarks/device_wheels.sh
install_carried_wheels
parallel=()
# loadgroup: tests marked xdist_group("gpu_memory") (references at real sizes, tens of GiB
# each) share one worker, so they do not run side by side: two of them at once ran the 140 GiB
# H200 out of memory on 2026-12-02 (results/gpu_tests_2026-12-02_final.log).
if "$PY" -c 'import xdist' 2>/dev/null; then parallel=(-n "${WORKERS:-8}" --dist loadgroup); fi
log=${OUT:-.}/gpu_tests.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"
"$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider --durations=25 "${parallel[@]}" \
  "${@:-tests}" 2>&1 | tee -a "$log"
