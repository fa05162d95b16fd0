#!/usr/bin/env bash
# Issue 31, scope 3: one Fashion-MNIST ipc 10 distillation in bf16-mixed beside float32,
# the same seed, store and settings (benchmarks/fashion_mnist_r2_ipc10.yaml, 200
# iterations, no periodic validation), and the same evaluation of both sets (float32,
# 5 networks x 1000 epochs, the project's protocol). Writes $WORK/results.json.
#   bash benchmarks/fashion_mnist_bf16.sh STORE [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:?a trajectory store of Fashion-MNIST experts (width 32)}
WORK=${2:-outputs/fashion_mnist_bf16}
PY=${PY:-.venv/bin/lightning-distill}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK"
for precision in 32-true bf16-mixed; do
  /usr/bin/time -f "$precision distill: %e s wall" \
    $PY distill --config benchmarks/fashion_mnist_r2_ipc10.yaml --model.store "$STORE" \
      --model.iterations 200 --trainer.precision "$precision" \
      --trainer.callbacks "[{class_path: lightning_distill.callbacks.MatchingWindow, init_args: {min_start_epoch: 0, current_max_start_epoch: 6, max_start_epoch: 12, expansion_end: 500, sequential: true}}, {class_path: lightning_distill.callbacks.IterationCheckpoint, init_args: {every_n: 50}}]" \
      --output "$WORK/ipc10_$precision"
done
cat > "$WORK/evaluate.yaml" <<YAML
# the Fashion-MNIST CPU benchmark's evaluation (recipes/fashion_mnist_cpu/run.yaml)
seed_everything: 0
models: [ConvNet]
runs: 5
baselines: []
scores: false
synthetic: [$WORK/ipc10_32-true/synthetic.pt, $WORK/ipc10_bf16-mixed/synthetic.pt]
output: $WORK/results.json
model:
  model: ConvNet
  protocol: {epochs: 1000, batch_size: 256, lr: null, dsa: true, group_size: null,
             precision: 32-true}
data: {name: fashion_mnist, batch_size: 256, val_fraction: 0.1}
trainer: {accelerator: cpu, devices: 1, precision: 32-true}
YAML
$PY evaluate --config "$WORK/evaluate.yaml"
