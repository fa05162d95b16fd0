#!/usr/bin/env bash
# Issue 14, item 6 at ipc 1: PAD's parameter selection and ATT on the Fashion-MNIST CPU
# benchmark (benchmarks/fashion_mnist_ablation.yaml says what each row changes). Uses
# the benchmark's 4 experts (copied from benchmarks/artifacts/fashion_mnist_cpu/experts);
# resumable: run it again after an interruption. Then the validation comparison of
# every set, the base included (benchmarks/val_select.py: 5 networks x 1000 epochs on
# the validation split) into validation.json; the run's evaluate stage writes the test
# accuracies to results.json.
#   bash benchmarks/fashion_mnist_ablation.sh      # in the background
#   tail -f outputs/fashion_mnist_ablation/ablation.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/lightning-distill}
PYTHON=${PYTHON:-$(dirname "$PY")/python}
WORK=${WORK:-outputs/fashion_mnist_ablation}
ART=${ART:-benchmarks/artifacts/fashion_mnist_cpu}
mkdir -p "$WORK/experts"
[ -f "$WORK/experts/meta.json" ] || cp "$ART"/experts/* "$WORK/experts/"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nohup bash -c "date -u +'start %FT%TZ'; git rev-parse --short HEAD; \
  time $PY run --config benchmarks/fashion_mnist_ablation.yaml --workdir $WORK \
    --trainer.enable_progress_bar false || exit 1; \
  time $PYTHON benchmarks/val_select.py $ART/ipc1/best.pt $WORK/ipc1_att/best.pt \
    $WORK/ipc1_pad25/best.pt $WORK/ipc1_pad25_att/best.pt --json $WORK/validation.json; \
  date -u +'end %FT%TZ'" >> "$WORK/ablation.log" 2>&1 &
echo "started (pid $!); log: $WORK/ablation.log"
