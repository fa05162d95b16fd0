#!/usr/bin/env bash
# Fashion-MNIST round 2 (issue 26) on 2 CPU cores, in parts that each resume where they
# stopped (by expert and, within an expert, by epoch; later parts by distillation
# checkpoint and evaluation row):
#
#   bash benchmarks/fashion_mnist_r2.sh probe     # 1 expert x 30 epochs per candidate lr
#   bash benchmarks/fashion_mnist_r2.sh experts   # the other 9 experts at the chosen lr
#   bash benchmarks/fashion_mnist_r2.sh store     # the store's test accuracy by epoch
#   bash benchmarks/fashion_mnist_r2.sh pilot     # ipc 1: labels x initial syn_lr, on val
#   bash benchmarks/fashion_mnist_r2.sh all       # probe, experts, store, pilot
#   bash benchmarks/fashion_mnist_r2.sh ipc1      # 3 seeds of the pilot's choice, on val
#   bash benchmarks/fashion_mnist_r2.sh pilot2    # ipc 1: T+, syn_steps, lr_img, syn_lr
#   bash benchmarks/fashion_mnist_r2.sh zca       # ipc 1 in ZCA space (6-epoch experts)
#   bash benchmarks/fashion_mnist_r2.sh clip      # ipc 1 with AdaptiveGradientClip
#   bash benchmarks/fashion_mnist_r2.sh pilot50   # ipc 50: lr_img 100 against 1000
#   bash benchmarks/fashion_mnist_r2.sh ipc10     # soft labels (DATM), seeds $SEEDS
#   bash benchmarks/fashion_mnist_r2.sh ipc10hard # hard labels (MTT), seeds $HARD_SEEDS
#   bash benchmarks/fashion_mnist_r2.sh ipc50     # the same at ipc 50 (ipc50hard: 300
#                                                 # iterations, against pilot50's soft set)
#   bash benchmarks/fashion_mnist_r2.sh ablation  # ipc 1: PAD / ATT / EL2N x 3 seeds
#   bash benchmarks/fashion_mnist_r2.sh full      # full data: validation by epoch budget
#   bash benchmarks/fashion_mnist_r2.sh "ipc1 ipc10:0 ipc50:0 ipc10:1,2"  # in this order;
#                                                 # :SEEDS overrides the seeds of a part
#   bash benchmarks/fashion_mnist_r2.sh save      # finished parts -> benchmarks/artifacts/
#   bash benchmarks/fashion_mnist_r2.sh assemble  # the store and ipc{1,10,50}_s* sets ->
#                                                 # the recipe's layout (fashion_mnist_cpu)
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
LOG=${LOG:-$WORK/benchmark.log}  # another log for a part run beside a running queue
LRS=${LRS:-"0.03 0.1 0.01"}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# glibc keeps freed large blocks for reuse (what lightning_distill/allocator.py does in the
# CLI since aa7eaa0; the environment gives it to every process, this script's helpers and
# older commits included): 1.35-1.8x faster CPU training, the same results
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-1073741824}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}

copy_run() {  # SRC DEST: a distillation's set, best.pt, last checkpoint and logs
  local run=$1 dest=$2 f
  mkdir -p "$dest"
  for f in synthetic.pt best.pt; do
    if [ -f "$run/$f" ]; then cp "$run/$f" "$dest/"; fi
  done
  # the last iteration checkpoint (under 4 MB at ipc 50), so an unfinished run resumes
  # there; synthetic.pt alone does not say the run finished (it is written at every
  # checkpoint)
  rm -rf "$dest/checkpoints"
  if [ -f "$run/checkpoints/last.ckpt" ]; then
    mkdir -p "$dest/checkpoints" && cp "$run/checkpoints/last.ckpt" "$dest/checkpoints/"
  fi
  if [ -d "$run/logs" ]; then cp -r "$run/logs" "$dest/"; fi
}

save() {
  mkdir -p "$ART"
  for store in "$WORK"/experts "$WORK"/experts_zca "$WORK"/probe_lr*/experts; do
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
  [ -d "$WORK/logs_zca" ] && cp -r "$WORK/logs_zca" "$ART/"
  for f in lr_probe.json store_accuracy.json pilot_ipc1.json pilot2_ipc1.json validation.json \
           pilot50_ipc50.json ablation_validation.json full_curve.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$ART/"
  done
  cp "$WORK"/*.log "$ART/" 2>/dev/null || true  # benchmark.log and any other part's log
  for run in "$WORK"/*/; do  # distillations: the set, best.pt, the last checkpoint, logs
    [ -f "$run/synthetic.pt" ] || [ -d "$run/checkpoints" ] || continue
    copy_run "$run" "$ART/$(basename "$run")"
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

chosen_lr() {  # the probe's choice of the experts' lr
  $PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_lr'])" \
    "$WORK/lr_probe.json"
}

experts() {
  local lr
  lr=$(chosen_lr)
  if [ ! -f "$WORK/experts/meta.json" ]; then  # start from the chosen lr's probe expert
    mkdir -p "$WORK/experts"
    cp -n "$WORK/probe_lr$lr/experts"/* "$WORK/experts/"
  fi
  $PY experts --config "$BASE" --model.lr "$lr" --store "$WORK/experts" \
    --log_dir "$WORK/logs"
}

store() {  # the experts' test accuracy by epoch (issue 26: they should reach the ceiling)
  $PYTHON benchmarks/store_accuracy.py "$WORK/experts" --epochs 2 4 6 8 10 12 15 20 25 30 \
    --json "$WORK/store_accuracy.json"
}

distill_run() {  # NAME CONFIG [overrides]: one distillation, resumed from its checkpoint
  local name=$1 config=$2
  shift 2
  $PY distill --config "$config" --model.store "$WORK/experts" --output "$WORK/$name" "$@"
}

label_args() {  # hard: MTT (real init, hard labels); soft: DATM (correct-sample init,
  # learned soft labels)
  if [ "$1" = soft ]; then
    echo --model.label_init soft --model.learn_labels true \
      --model.image_init samples_predicted_correctly
  else
    echo --model.label_init hard --model.learn_labels false --model.image_init real
  fi
}

pilot() {  # ipc 1, 300 iterations: hard (MTT) against learned soft labels (DATM), each
  # with the initial syn_lr of round 1 (0.01) and the experts' lr (0.1); the four
  # best.pt are compared on the validation split (5 networks x 1000 epochs)
  local sets=() labels lr
  for labels in hard soft; do
    for lr in 0.01 0.1; do
      # shellcheck disable=SC2046
      distill_run "pilot_ipc1_${labels}_lr$lr" benchmarks/fashion_mnist_r2_ipc1.yaml \
        $(label_args "$labels") --model.lr_teacher "$lr" --model.iterations 300
      sets+=("$WORK/pilot_ipc1_${labels}_lr$lr/best.pt")
    done
  done
  $PYTHON benchmarks/val_select.py --json "$WORK/pilot_ipc1.json" "${sets[@]}"
}

SEEDS=${SEEDS:-"0 1 2"}
HARD_SEEDS=${HARD_SEEDS:-0}

seeds() {  # NAME CONFIG LABELS SEEDS [overrides]: one distillation per seed, then every
  # finished best.pt of NAME on the validation split (5 networks x 1000 epochs)
  local name=$1 config=$2 labels=$3 seeds=$4 seed sets=()
  shift 4
  for seed in $seeds; do
    # shellcheck disable=SC2046
    distill_run "${name}_s$seed" "$config" $(label_args "$labels") \
      --seed_everything "$seed" --model.seed "$seed" "$@"
  done
  for seed in $seeds; do sets+=("$WORK/${name}_s$seed/best.pt"); done
  $PYTHON benchmarks/val_select.py --json "$WORK/validation.json" "${sets[@]}"
}

ipc1() {  # the pilot's choice (labels, initial syn_lr): its best validation mean
  local best labels lr
  best=$($PYTHON -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(max(d, key=lambda k: d[k]['mean']))" "$WORK/pilot_ipc1.json")
  best=$(basename "$(dirname "$best")")   # pilot_ipc1_<labels>_lr<lr>
  labels=${best#pilot_ipc1_}; labels=${labels%%_*}; lr=${best##*_lr}
  echo "ipc 1: the pilot chose $labels labels, syn_lr $lr ($best)"
  seeds ipc1 benchmarks/fashion_mnist_r2_ipc1.yaml "$labels" "$SEEDS" --model.lr_teacher "$lr"
}

pilot2_run() {  # NAME CONFIG SEED [overrides]: an ipc 1 pilot run, the ipc 1 settings
  # (hard labels, syn_lr 0.1) for 300 iterations from SEED; the overrides come last and win
  local name=$1 config=$2 seed=$3
  shift 3
  # shellcheck disable=SC2046
  distill_run "$name" "$config" $(label_args hard) --model.lr_teacher 0.1 \
    --model.iterations 300 --seed_everything "$seed" --model.seed "$seed" "$@"
}

pilot2() {  # ipc 1 is short of its target after the first pilot: one lever at a time
  # from the ipc 1 settings (hard labels, syn_lr 0.1), 300 iterations, seeds $SEEDS, each
  # best.pt on the validation split (5 networks x 1000 epochs)
  local seed variant sets cfg=$WORK/configs/ipc1_tplus2.yaml
  mkdir -p "$WORK/configs"  # MTT's ipc 1 window T+ = 2, in the model and MatchingWindow
  sed 's/max_start_epoch: 4/max_start_epoch: 2/' benchmarks/fashion_mnist_r2_ipc1.yaml > "$cfg"
  for seed in $SEEDS; do
    sets=()
    for variant in base tplus2 steps80 lrimg1000 lrt0.3; do
      local conf=benchmarks/fashion_mnist_r2_ipc1.yaml args=()
      case $variant in
        tplus2) conf=$cfg ;;
        steps80) args=(--model.syn_steps 80) ;;
        lrimg1000) args=(--model.lr_img 1000) ;;
        lrt0.3) args=(--model.lr_teacher 0.3) ;;
      esac
      pilot2_run "pilot2_${variant}_s$seed" "$conf" "$seed" "${args[@]}"
      sets+=("$WORK/pilot2_${variant}_s$seed/best.pt")
    done
    $PYTHON benchmarks/val_select.py --json "$WORK/pilot2_ipc1.json" "${sets[@]}"
  done
}

zca() {  # ipc 1 with ZCA-whitened images (MTT's and DATM's input space for CIFAR): its
  # own experts, 10 x 6 epochs (ipc 1 matches epochs 0 to 4 + 2), at the chosen lr; then
  # the ipc 1 settings over seeds $SEEDS, 300 iterations, on the validation split
  local lr seed sets=()
  lr=$(chosen_lr)
  $PY experts --config "$BASE" --model.lr "$lr" --data.zca true --trainer.max_epochs 6 \
    --store "$WORK/experts_zca" --log_dir "$WORK/logs_zca"
  for seed in $SEEDS; do
    pilot2_run "pilot2_zca_s$seed" benchmarks/fashion_mnist_r2_ipc1.yaml "$seed" \
      --model.lr_teacher "$lr" --model.store "$WORK/experts_zca" --data.zca true
    sets+=("$WORK/pilot2_zca_s$seed/best.pt")
  done
  $PYTHON benchmarks/val_select.py --json "$WORK/pilot2_ipc1.json" "${sets[@]}"
}

clip() {  # ipc 1's base settings with AdaptiveGradientClip (factor 5, history 50): the
  # pilot2 base again with each gradient clipped against its recent norms, seeds $SEEDS
  local seed sets=() cfg=$WORK/configs/ipc1_clip.yaml
  mkdir -p "$WORK/configs"
  awk '{print} /^  callbacks:$/ {print "  - class_path: lightning_distill.callbacks.AdaptiveGradientClip"; \
       print "    init_args:"; print "      factor: 5.0"; print "      history: 50"}' \
    benchmarks/fashion_mnist_r2_ipc1.yaml > "$cfg"
  for seed in $SEEDS; do
    pilot2_run "pilot2_clip_s$seed" "$cfg" "$seed"
    sets+=("$WORK/pilot2_clip_s$seed/best.pt")
  done
  $PYTHON benchmarks/val_select.py --json "$WORK/pilot2_ipc1.json" "${sets[@]}"
}

pilot50() {  # ipc 50, seed 0, 300 iterations: the config's lr_img 100 (DATM's ipc 10
  # value) against DATM's ipc 50 value 1000. Each ipc 50 image is in 6 of an iteration's
  # 30 batches of 100 (an ipc 10 image in all 30), so its steps are smaller at the same
  # lr_img; round 1's ipc 50 (lr_img 100) peaked at iteration 100. Both best.pt on the
  # validation split (5 networks x 1000 epochs)
  local lr sets=()
  for lr in 100 1000; do
    # shellcheck disable=SC2046
    distill_run "pilot50_lrimg${lr}_s0" benchmarks/fashion_mnist_r2_ipc50.yaml \
      $(label_args soft) --model.lr_img "$lr" --model.iterations 300
    sets+=("$WORK/pilot50_lrimg${lr}_s0/best.pt")
  done
  $PYTHON benchmarks/val_select.py --json "$WORK/pilot50_ipc50.json" "${sets[@]}"
}

ablation() {  # round 1's ipc 1 ablation (benchmarks/fashion_mnist_r2_ablation.yaml) over
  # 3 seeds: the base and each option from round 1's own experts
  local r1=${R1_ART:-benchmarks/artifacts/fashion_mnist_r1}
  local ds=${R1_DS_ART:-benchmarks/artifacts/fashion_mnist_ablation/ds}
  mkdir -p "$WORK/round1_experts" "$WORK/round1_ds_experts"
  cp -n "$r1"/experts/* "$WORK/round1_experts/"
  cp -n "$ds"/experts/* "$WORK/round1_ds_experts/"
  local cfg=benchmarks/fashion_mnist_r2_ablation.yaml seed sets=() variant
  for seed in $SEEDS; do
    for variant in base att pad25 pad25_att ds; do
      local args=(--seed_everything "$seed" --model.seed "$seed"
                  --model.store "$WORK/round1_experts")
      case $variant in
        att) args+=(--model.match closest) ;;
        pad25) args+=(--model.param_drop_ratio 0.25) ;;
        pad25_att) args+=(--model.match closest --model.param_drop_ratio 0.25) ;;
        ds) args+=(--model.store "$WORK/round1_ds_experts") ;;
      esac
      $PY distill --config "$cfg" --output "$WORK/ablation_${variant}_s$seed" "${args[@]}"
      sets+=("$WORK/ablation_${variant}_s$seed/best.pt")
    done
  done
  $PYTHON benchmarks/val_select.py --json "$WORK/ablation_validation.json" "${sets[@]}"
}

full() {  # how long the full-data row must train: 1 network per budget on validation
  # (10 / 20 / 40 epochs gave 90.6 / 91.6 / 92.6 %: still rising at 40, so 80 follows;
  # budgets already in full_curve.json are not trained again)
  # shellcheck disable=SC2086
  $PYTHON benchmarks/full_data_curve.py --epochs ${FULL_EPOCHS:-10 20 40 80} \
    --json "$WORK/full_curve.json"
}

if [ "${1:-}" = "_run" ]; then  # the background body
  all_seeds=$SEEDS all_hard_seeds=$HARD_SEEDS
  for item in $2; do  # PART or PART:SEEDS (ipc10:0, ablation:1,2)
    part=${item%%:*}
    # an item's :SEEDS holds for that item only (before, `ipc10:0 ablation` ran the
    # ablation with seed 0 alone)
    SEEDS=$all_seeds HARD_SEEDS=$all_hard_seeds
    if [ "$item" != "$part" ]; then SEEDS=${item#*:}; SEEDS=${SEEDS//,/ }; HARD_SEEDS=$SEEDS; fi
    date -u +"start $item %FT%TZ"; git rev-parse --short HEAD
    case "$part" in
      all) time probe; time experts; time store; time pilot ;;
      ipc10|ipc50) time seeds "$part" "benchmarks/fashion_mnist_r2_$part.yaml" soft "$SEEDS" ;;
      ipc10hard)
        time seeds "$part" "benchmarks/fashion_mnist_r2_ipc10.yaml" hard "$HARD_SEEDS" ;;
      # 300 iterations, beside pilot50's soft-label set of the same length and seed (at
      # ipc 10 the two kinds of labels stayed within a point for 1500 iterations; ipc 50's 1500
      # cost about 1.75 h on idle cores)
      ipc50hard)
        time seeds "$part" benchmarks/fashion_mnist_r2_ipc50.yaml hard "$HARD_SEEDS" \
          --model.iterations 300 ;;
      *) time "$part" ;;
    esac
    date -u +"end $item %FT%TZ"
  done
  exit 0
fi
assemble() {  # the store and the recipe's sets (ipc1_s*, ipc10_s*, ipc50_s*) into the
  # layout of `lightning-distill run --config fashion_mnist_cpu/run` under $CPU_ART, where
  # `bash benchmarks/fashion_mnist_cpu.sh` restores them: the experts stage finds the
  # store complete, each distill stage its set finished (or resumes its checkpoint), and
  # the evaluate stage tests every best.pt (tests/test_cli.py keeps the recipe's settings
  # equal to the ones these parts ran)
  local dest=${CPU_ART:-benchmarks/artifacts/fashion_mnist_cpu} run
  local store=${CPU_STORE:-outputs/fashion_mnist_cpu/experts}  # the recipe's workdir
  mkdir -p "$dest/experts"
  cp "$WORK/experts/meta.json" "$WORK"/experts/expert_*.pt "$dest/experts/"
  for run in "$WORK"/ipc*_s*; do  # ipc10_s0, not ipc10_s0_unguarded
    [[ $(basename "$run") =~ ^ipc(1|10|50)_s[0-9]+$ ]] || continue
    if [ -f "$run/synthetic.pt" ]; then copy_run "$run" "$dest/$(basename "$run")"; fi
  done
  # each set names the store it was distilled from (meta source_store), where the
  # evaluate stage's scores find the experts' soft labels for the random-real subsets:
  # the same experts, now at the recipe's store
  $PYTHON - "$store" "$dest"/ipc*_s*/*.pt <<'PYEOF'
import sys
import torch
from lightning_distill.io import atomic_save
for path in sys.argv[2:]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["meta"].get("source_store") != sys.argv[1]:
        payload["meta"]["source_store"] = sys.argv[1]
        atomic_save(payload, path)
PYEOF
  du -sh "$dest"
}

part=${1:-all}
PARTS="probe experts store pilot pilot2 zca clip pilot50 all ipc1 ipc10 ipc10hard ipc50 ipc50hard ablation full"
[ "$part" = save ] && { save; exit 0; }
[ "$part" = assemble ] && { assemble; exit 0; }
for p in $part; do
  p=${p%%:*}
  case " $PARTS " in
    *" $p "*) ;;
    *) echo "unknown part $p ($PARTS, save)" >&2; exit 2 ;;
  esac
done
if [ -d "$ART" ]; then cp -rn "$ART"/. "$WORK"/; fi  # restore, never overwrite
PY=$PY PYTHON=$PYTHON WORK=$WORK ART=$ART LRS=$LRS BASE=$BASE SEEDS=$SEEDS \
  HARD_SEEDS=$HARD_SEEDS nohup nice -n 10 bash "$0" _run "$part" >> "$LOG" 2>&1 &
echo "started $part (pid $!); log: $LOG"
