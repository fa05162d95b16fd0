#!/usr/bin/env bash
# Fashion-MNIST benchmark on 2 CPU cores (recipes/fashion_mnist_cpu/run.yaml): experts,
# ipc 1 / 10 / 50 distillations (validation-selected), evaluation with random-real and
# full-data baselines. Runs in the background and resumes where it stopped: run this
# script again after an interruption. Output: outputs/fashion_mnist_cpu/ (results.json,
# the synthetic sets) and the log below.
#   bash benchmarks/fashion_mnist_cpu.sh [extra lightning-distill overrides]
#   tail -f outputs/fashion_mnist_cpu/benchmark.log
#   bash benchmarks/fashion_mnist_cpu.sh save     # keep the finished parts in git
#   bash benchmarks/fashion_mnist_cpu.sh reproduce  # test the committed sets again
#
# outputs/ is not in git, and the whole run takes longer than one working session, so
# `save` copies what a fresh checkout needs to go on (the experts' store; per
# distillation its set, the validation-selected best.pt and the last checkpoint, so an
# unfinished one resumes; results.json; the log) to benchmarks/artifacts/
# fashion_mnist_cpu/, and a start restores from there whatever the work directory
# lacks: a fresh checkout resumes the benchmark instead of training the experts again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/lightning-distill}
WORK=${WORK:-outputs/fashion_mnist_cpu}
ART=${ART:-benchmarks/artifacts/fashion_mnist_cpu}
mkdir -p "$WORK"

if [ "${1:-}" = "save" ]; then
  mkdir -p "$ART"
  if [ -f "$WORK/experts/meta.json" ]; then
    mkdir -p "$ART/experts"
    cp "$WORK/experts/meta.json" "$WORK"/experts/expert_*.pt "$ART/experts/" 2>/dev/null || true
  fi
  for run in "$WORK"/*/; do
    name=$(basename "$run")
    [ -f "$run/synthetic.pt" ] || continue   # a distillation's directory
    mkdir -p "$ART/$name"
    cp "$run/synthetic.pt" "$ART/$name/"
    [ -f "$run/best.pt" ] && cp "$run/best.pt" "$ART/$name/"
    if [ -f "$run/checkpoints/last.ckpt" ]; then
      mkdir -p "$ART/$name/checkpoints" && cp "$run/checkpoints/last.ckpt" "$ART/$name/checkpoints/"
    fi
  done
  for f in results.json benchmark.log; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$ART/"
  done
  # the merged section of every stage, as the run wrote it (each reruns its stage alone)
  if [ -d "$WORK/configs" ]; then
    mkdir -p "$ART/configs" && cp "$WORK"/configs/*.yaml "$ART/configs/"
  fi
  du -sh "$ART"
  exit 0
fi

if [ "${1:-}" = "reproduce" ]; then
  # the table's distilled rows from the committed sets alone (no experts, no training
  # data beyond Fashion-MNIST itself): the evaluate stage's own configuration, pointed
  # at benchmarks/artifacts/, without the baselines and DD-Ranking's scores (their extra
  # runs would more than double the cost); writes $WORK/reproduce.json.
  # Every seed's set of every ipc by default (ipc1_s0 ... ipc50_s2), then their mean
  # over seeds; names after `reproduce` (ipc10_s1, say) test those instead, and
  # arguments that start with -- are evaluate overrides (--model.protocol.group_size 1).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  shift
  names=() overrides=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --*) overrides+=("$1" "$2"); shift 2 ;;
      *) names+=("$1"); shift ;;
    esac
  done
  if [ ${#names[@]} -eq 0 ]; then  # every seed of every ipc
    for d in "$ART"/ipc*_s*/; do [ -d "$d" ] && names+=("$(basename "$d")"); done
    [ ${#names[@]} -gt 0 ] || names=(ipc1 ipc10 ipc50)  # a layout of one seed per ipc
  fi
  sets=""
  for name in "${names[@]}"; do
    sets="$sets${sets:+, }$ART/$name/best.pt"
  done
  mkdir -p "$WORK"
  $PY evaluate --config "$ART/configs/evaluate.yaml" --synthetic "[$sets]" \
    --baselines "[]" --scores false --output "$WORK/reproduce.json" \
    --trainer.enable_progress_bar false \
    "${overrides[@]}"
  # the table's lines over seeds beside the committed results.json's
  "$(dirname "$PY")/python" benchmarks/seed_table.py "$WORK/reproduce.json"
  exit 0
fi

if [ -d "$ART" ]; then  # restore, never overwrite
  cp -rn "$ART"/. "$WORK"/
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nohup bash -c "date -u +'start %FT%TZ'; git rev-parse --short HEAD; \
  time $PY run --config fashion_mnist_cpu/run --workdir $WORK \
  --trainer.enable_progress_bar false $*; date -u +'end %FT%TZ'" \
  >> "$WORK/benchmark.log" 2>&1 &
echo "started (pid $!); log: $WORK/benchmark.log"
