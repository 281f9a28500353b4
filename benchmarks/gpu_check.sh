#!/usr/bin/env bash
# Every GPU check of the project in one call (the device tool lends a GPU for minutes, not hours).
# Usage on a machine with a CUDA GPU, from the repository root:  bash benchmarks/gpu_check.sh [PART ...]
# PART is 1 to 4 (default: all). All parts take about 15 minutes; where one command may run at most
# 10 minutes (the device tool), run `bash benchmarks/gpu_check.sh 1 2 4` and then `bash benchmarks/gpu_check.sh 3`.
# Writes its log to ${OUT:-/tmp/gpu_check}/gpu_check.log; record the output in benchmarks/RESULTS.md.
#  1. models on CUDA against the CPU (logits, gradients, torch.compile, bf16)      benchmarks/cuda_sanity.py
#  2. the real training script for about 2 minutes on a synthetic ImageFolder (1 GPU, bf16, channels_last)
#  3. training step vs convolution floor at 224x224, BNext-T and BNext-L: eager fp32, bf16 autocast,
#     bf16 + torch.compile + channels_last                                          benchmarks/train_step.py
#  4. data loading: images per second per worker of the recipe's transforms        benchmarks/data_loading.py
set -uo pipefail
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
budget() { timeout "$1" "${@:2}" || echo "!! exit $? (timeout ${1}s or failure): ${*:2}"; }
parts="${*:-1 2 3 4}"
want() { [[ " $parts " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

if want 1; then
echo "== 1. CUDA vs CPU"
budget 90 "$python" benchmarks/cuda_sanity.py
fi

if want 2; then
echo "== 2. training script, synthetic ImageFolder, 1 GPU"
data="$(mktemp -d)/synthetic"
budget 60 "$python" benchmarks/synthetic_imagefolder.py --output "$data" --classes 10 --train 200 --val 50
budget 150 "$python" ImageNet/train.py --data-dir "$data" --output "$(mktemp -d)/run" --model bnext_tiny \
    --epochs 3 --batch-size 256 --workers 12 --amp bf16 --channels-last --warmup-epochs 1 --log-interval 5
fi

if want 3; then
echo "== 3. training step vs convolution floor, 224x224"
budget 100 "$python" benchmarks/train_step.py --model bnext_tiny --stem imagenet --img-size 224 --batch 64 \
    --mode eager --mode bf16 --warmup 2 --iters 5
budget 100 "$python" benchmarks/train_step.py --model bnext_large --stem imagenet --img-size 224 --batch 32 \
    --mode eager --mode bf16 --warmup 2 --iters 5
# Compilation takes minutes; each model gets its own budget so one slow compile loses one number.
# --interleave: both modes built first, then timed round by round (each round's compiled step over the eager one).
budget 180 "$python" benchmarks/train_step.py --model bnext_tiny --stem imagenet --img-size 224 --batch 64 \
    --mode eager --mode bf16_compile_cl --interleave --warmup 2 --iters 5
budget 180 "$python" benchmarks/train_step.py --model bnext_large --stem imagenet --img-size 224 --batch 32 \
    --mode eager --mode bf16_compile_cl --interleave --warmup 2 --iters 5
fi

if want 4; then
echo "== 4. data loading per worker (CPU of the GPU machine)"
budget 90 "$python" benchmarks/data_loading.py --images 96 --target 600
fi
echo "== done"
