#!/usr/bin/env bash
# Every GPU-only measurement and check of this project in one command, for a session
# that is lent a GPU (see the developers' guide: few, full device calls). Run from the
# repository root on the GPU machine; results go to ${OUT:-benchmarks/out}/.
#
#   device run: bash benchmarks/gpu_session.sh
#
# The GPU image has torch, pytorch-lightning, torchmetrics, torchvision, tensorboard,
# rich, scikit-learn, scipy and pytest, but not jsonargparse: the CLI tests are skipped
# there (they run in CI). Record the tables in benchmarks/RESULTS.md with date, device,
# commit and this command, and the dated entry in benchmarks/HISTORY.md.
set -uo pipefail
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/device.txt"

# Each step has its own time limit, the measurements first, so that one slow step cannot
# starve the others inside a 600 s device call (total of the limits: 570 s).

# 1. CUDA checks against the CPU (tests/test_cuda.py: matching float64, DistillationModule
#    on the GPU with checkpoint resume there and on the CPU, GSAM expert + recorder) and
#    DSA's CUDA test.
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/data/test_augment.py 2>&1 | tail -n 30 | tee "$out/cuda_tests.txt"

# 2. Trajectory matching (issue 4): CIFAR-10-shaped work, four modes + baseline.
timeout 150 python3 benchmarks/matching.py --device cuda --batch-syn 100 --num-images 100 \
  --syn-steps 10 20 40 --repeats 3 --warmup 2 2>&1 | tee "$out/matching.txt"

# 3. Expert training throughput (issue 3): ours vs the reference-style loop, SGD and GSAM.
timeout 100 python3 benchmarks/experts.py --device cuda --batch-size 256 --steps 20 \
  --repeats 3 2>&1 | tee "$out/experts.txt"

# 4. K networks trained as one (issue 12): groups against one at a time, experts at the
#    digits, 28x28 and 32x32 scales and evaluation runs at ipc 1 / 10 / 50.
timeout 80 python3 benchmarks/batched.py --device cuda --ks 1 2 4 8 16 --steps 10 \
  --big-steps 5 --repeats 2 --epochs 10 2>&1 | tee "$out/batched.txt"

# 5. bf16-mixed against float32 and DATM's float32 code (issue 31): a distillation
#    iteration in each mode at the CIFAR and Fashion-MNIST shapes, and an evaluation
#    run. DATM's files come from $DATM (a checkout of NUS-HPC-AI-Lab/DATM, e.g. carried
#    under shared/: the GPU machine has no network); without it, ours only.
precision_args=(--variants full-fp32 full-bf16 recompute-fp32 recompute-bf16 tesla-fp32
                tesla-bf16)
if [ -n "${DATM:-}" ] && [ -d "${DATM:-}" ]; then
  precision_args=(--datm "$DATM" "${precision_args[@]}" datm)
fi
timeout 70 python3 benchmarks/precision.py --device cuda --repeats 2 --iters 3 \
  --parts distill evaluate "${precision_args[@]}" 2>&1 | tee "$out/precision.txt"

# 6. The whole suite on the GPU machine (CLI tests skip themselves there).
timeout 80 python3 -m pytest -q -x -p no:cacheprovider 2>&1 | tail -n 30 \
  | tee "$out/tests.txt"
