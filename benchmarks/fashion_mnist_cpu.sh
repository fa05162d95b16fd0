#!/usr/bin/env bash
# Fashion-MNIST benchmark on 2 CPU cores (recipes/fashion_mnist_cpu/run.yaml): experts,
# ipc 1 / 10 / 50 distillations (validation-selected), evaluation with random-real and
# full-data baselines. Runs in the background and resumes where it stopped: run this
# script again after an interruption. Output: outputs/fashion_mnist_cpu/ (results.json,
# the synthetic sets) and the log below.
#   bash benchmarks/fashion_mnist_cpu.sh [extra lightning-distill overrides]
#   tail -f outputs/fashion_mnist_cpu/benchmark.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/lightning-distill}
WORK=${WORK:-outputs/fashion_mnist_cpu}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nohup bash -c "date -u +'start %FT%TZ'; git rev-parse --short HEAD; \
  time $PY run --config fashion_mnist_cpu/run --workdir $WORK \
  --trainer.enable_progress_bar false $*; date -u +'end %FT%TZ'" \
  >> "$WORK/benchmark.log" 2>&1 &
echo "started (pid $!); log: $WORK/benchmark.log"
