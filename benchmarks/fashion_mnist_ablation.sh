#!/usr/bin/env bash
# Issue 14, item 6: PAD's parameter selection, PAD's data selection and ATT on the
# Fashion-MNIST CPU benchmark. Three runs, one after the other in the background:
#   ds    benchmarks/fashion_mnist_ablation_ds.yaml: 4 experts trained easy-to-hard
#         (EL2N scores first), then ipc 1 and ipc 10 from them, in $WORK/ds;
#   main  benchmarks/fashion_mnist_ablation.yaml: parameter selection and ATT at ipc 1
#         and 10 from the benchmark's 4 experts (copied from
#         benchmarks/artifacts/fashion_mnist_r1/experts), in $WORK;
#   ipc50 the best combination at ipc 50 (benchmarks/fashion_mnist_ablation_ipc50.yaml
#         laid over the main recipe), from the same experts, in $WORK/ipc50.
# Then the validation comparison of every set, the bases included
# (benchmarks/val_select.py: 5 networks x 1000 epochs on the validation split; a set
# already in validation.json with the same SHA-256 is not trained again); each run's
# evaluate stage writes the test accuracies to its results.json. Everything resumes:
# run it again after an interruption.
#   bash benchmarks/fashion_mnist_ablation.sh [ds|main|ipc50|validate|all]   # default all
#   tail -f outputs/fashion_mnist_ablation/ablation.log
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
PY=${PY:-.venv/bin/lightning-distill}
PYTHON=${PYTHON:-$(dirname "$PY")/python}
WORK=${WORK:-outputs/fashion_mnist_ablation}
ART=${ART:-benchmarks/artifacts/fashion_mnist_r1}
mkdir -p "$WORK/experts"
[ -f "$WORK/experts/meta.json" ] || cp "$ART"/experts/* "$WORK/experts/"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RUN="$PY run --trainer.enable_progress_bar false"
DS="$RUN --config benchmarks/fashion_mnist_ablation_ds.yaml --workdir $WORK/ds"
MAIN="$RUN --config benchmarks/fashion_mnist_ablation.yaml --workdir $WORK"
IPC50="$RUN --config benchmarks/fashion_mnist_ablation.yaml \
  --config benchmarks/fashion_mnist_ablation_ipc50.yaml --workdir $WORK/ipc50 \
  --experts.store $WORK/experts"
SETS="$ART/ipc1/best.pt $WORK/ipc1_att/best.pt $WORK/ipc1_pad25/best.pt \
  $WORK/ipc1_pad25_att/best.pt $WORK/ds/ipc1_ds/best.pt $ART/ipc10/best.pt \
  $WORK/ipc10_att/best.pt $WORK/ipc10_pad25/best.pt $WORK/ds/ipc10_ds/best.pt \
  $ART/ipc50/best.pt $WORK/ipc50/ipc50_att/best.pt"
VALIDATE="$PYTHON benchmarks/val_select.py $SETS --json $WORK/validation.json"
case "$PART" in
  ds) STEPS="$DS" ;;
  main) STEPS="$MAIN" ;;
  ipc50) STEPS="$IPC50" ;;
  validate) STEPS="$VALIDATE" ;;
  all) STEPS="$DS && $MAIN && $IPC50 && $VALIDATE" ;;
  *) echo "usage: $0 [ds|main|ipc50|validate|all]" >&2; exit 2 ;;
esac
nohup bash -c "date -u +'start $PART %FT%TZ'; git rev-parse --short HEAD; \
  time ( $STEPS ) || exit 1; date -u +'end %FT%TZ'" >> "$WORK/ablation.log" 2>&1 &
echo "started $PART (pid $!); log: $WORK/ablation.log"
