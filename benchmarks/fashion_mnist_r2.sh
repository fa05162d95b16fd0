#!/usr/bin/env bash
# Fashion-MNIST round 2 (issue 26) on 2 CPU cores, in parts that each resume where they
# stopped (by expert and, within an expert, by epoch; later parts by distillation
# checkpoint and evaluation row):
#
#   bash benchmarks/fashion_mnist_r2.sh probe     # 1 expert x 30 epochs per candidate lr
#   bash benchmarks/fashion_mnist_r2.sh experts   # the other 9 experts at the chosen lr
#   bash benchmarks/fashion_mnist_r2.sh all       # probe, then experts
#   bash benchmarks/fashion_mnist_r2.sh save      # finished parts -> benchmarks/artifacts/
#
# Work directory outputs/fashion_mnist_r2/ (not in git); `save` copies what a fresh
# checkout needs to go on to benchmarks/artifacts/fashion_mnist_r2/, and every start
# restores from there what the work directory lacks (never overwriting). Each part runs
# in the background at low priority and appends to $WORK/benchmark.log. Run it from a
# worktree at a fixed commit with its own non-editable install (PY=...), so edits to
# main cannot reach a running part.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/lightning-distill}
PYTHON=${PYTHON:-$(dirname "$PY")/python}
WORK=${WORK:-outputs/fashion_mnist_r2}
ART=${ART:-benchmarks/artifacts/fashion_mnist_r2}
BASE=${BASE:-benchmarks/fashion_mnist_r2_experts.yaml}
LRS=${LRS:-"0.03 0.1 0.01"}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

save() {
  mkdir -p "$ART"
  for store in "$WORK"/experts "$WORK"/probe_lr*/experts; do
    [ -f "$store/meta.json" ] || continue
    rel=${store#"$WORK"/}
    mkdir -p "$ART/$rel"
    cp "$store/meta.json" "$ART/$rel/"
    cp "$store"/expert_*.pt "$ART/$rel/" 2>/dev/null || true
    # the interrupted expert's checkpoint after its last finished epoch (a few MB), so a
    # fresh checkout resumes it there; a finished expert's is gone from the work dir
    rm -rf "$ART/$rel/.partial"
    [ -d "$store/.partial" ] && cp -r "$store/.partial" "$ART/$rel/"
  done
  for d in "$WORK" "$WORK"/probe_lr*; do  # the experts' TensorBoard logs (small)
    [ -d "$d/logs" ] || continue
    rel=${d#"$WORK"}
    mkdir -p "$ART/$rel" && cp -r "$d/logs" "$ART/$rel/"
  done
  for f in lr_probe.json benchmark.log; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$ART/"
  done
  du -sh "$ART"
}

probe() {
  local args=()
  for lr in $LRS; do
    # expert 0 of a 10-expert store (shard 0 of 10): the same expert, seeds and store
    # hparams as expert 0 of the final store, so the chosen lr's probe is reused there
    $PY experts --config "$BASE" --model.lr "$lr" --num_shards 10 --shard_index 0 \
      --store "$WORK/probe_lr$lr/experts" --log_dir "$WORK/probe_lr$lr/logs"
    args+=("$WORK/probe_lr$lr/logs=$lr")
  done
  $PYTHON benchmarks/expert_curves.py --choose --output "$WORK/lr_probe.json" "${args[@]}"
}

experts() {
  local lr
  lr=$($PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lr'])" \
       "$WORK/lr_probe.json")
  if [ ! -f "$WORK/experts/meta.json" ]; then  # start from the chosen lr's probe expert
    mkdir -p "$WORK/experts"
    cp -n "$WORK/probe_lr$lr/experts"/* "$WORK/experts/"
  fi
  $PY experts --config "$BASE" --model.lr "$lr" --store "$WORK/experts" \
    --log_dir "$WORK/logs"
}

if [ "${1:-}" = "_run" ]; then  # the background body
  part=$2
  date -u +"start $part %FT%TZ"; git rev-parse --short HEAD
  case "$part" in
    probe) time probe ;;
    experts) time experts ;;
    all) time probe; time experts ;;
  esac
  date -u +"end $part %FT%TZ"
  exit 0
fi
part=${1:-all}
case "$part" in
  save) save; exit 0 ;;
  probe|experts|all) ;;
  *) echo "unknown part $part (probe, experts, all, save)" >&2; exit 2 ;;
esac
if [ -d "$ART" ]; then cp -rn "$ART"/. "$WORK"/; fi  # restore, never overwrite
PY=$PY PYTHON=$PYTHON WORK=$WORK ART=$ART LRS=$LRS BASE=$BASE \
  nohup nice -n 10 bash "$0" _run "$part" >> "$WORK/benchmark.log" 2>&1 &
echo "started $part (pid $!); log: $WORK/benchmark.log"
