#!/usr/bin/env bash
# Issue 13: the cost of the validation split on Fashion-MNIST, 2 CPU cores
# (benchmarks/fashion_mnist_split.yaml says what is compared). Two arms, each a
# `lightning-distill run` (resumable: run the script again after an interruption):
#   split90: data.val_fraction 0.1, experts 0 and 1 of the Fashion-MNIST benchmark's
#            store (benchmarks/artifacts/fashion_mnist_r1/experts, the same seeds);
#   all:     data.val_fraction 0, two experts trained here (about 30 min);
# then the experts' test accuracy side by side (benchmarks/store_accuracy.py).
#   bash benchmarks/fashion_mnist_split.sh        # in the background
#   tail -f outputs/fashion_mnist_split/split.log
# Results: outputs/fashion_mnist_split/{split90,all}/results.json, experts.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/lightning-distill}
PYTHON=${PYTHON:-$(dirname "$PY")/python}
WORK=${WORK:-outputs/fashion_mnist_split}
SRC=${SRC:-benchmarks/artifacts/fashion_mnist_r1/experts}
mkdir -p "$WORK/split90/experts"
if [ ! -f "$WORK/split90/experts/meta.json" ]; then
  # the first two experts of the benchmark's store: a store is its meta.json and one
  # file per expert, so these two files are a two-expert store
  cp "$SRC/meta.json" "$SRC/expert_00000.pt" "$SRC/expert_00001.pt" "$WORK/split90/experts/"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nohup bash -c "date -u +'start %FT%TZ'; git rev-parse --short HEAD; \
  for arm in split90:0.1 all:0; do \
    name=\${arm%%:*}; frac=\${arm##*:}; echo \"== \$name (val_fraction \$frac)\"; \
    time $PY run --config benchmarks/fashion_mnist_split.yaml --workdir $WORK/\$name \
      --data.val_fraction \$frac --trainer.enable_progress_bar false || exit 1; \
  done; \
  $PYTHON benchmarks/store_accuracy.py $WORK/split90/experts $WORK/all/experts \
    --epochs 2 4 12 --json $WORK/experts.json; date -u +'end %FT%TZ'" \
  >> "$WORK/split.log" 2>&1 &
echo "started (pid $!); log: $WORK/split.log"
