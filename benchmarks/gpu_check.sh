#!/usr/bin/env bash
# Every GPU check of the project in one call (the device tool lends a GPU for minutes, not hours).
# Usage on a machine with a CUDA GPU, from the repository root:  bash benchmarks/gpu_check.sh
# Writes its log to ${OUT:-/tmp/gpu_check}/gpu_check.log; record the output in benchmarks/RESULTS.md.
#  1. models on CUDA against the CPU (logits, gradients, torch.compile, bf16)      benchmarks/cuda_sanity.py
#  2. the real training script for about 2 minutes on a synthetic ImageFolder (1 GPU, bf16, channels_last)
#  3. training step vs convolution floor at 224x224: BNext-T and BNext-L           benchmarks/train_step.py
set -uo pipefail
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
budget() { timeout "$1" "${@:2}" || echo "!! exit $? (timeout ${1}s or failure): ${*:2}"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== 1. CUDA vs CPU"
budget 90 "$python" benchmarks/cuda_sanity.py

echo "== 2. training script, synthetic ImageFolder, 1 GPU"
data="$(mktemp -d)/synthetic"
budget 60 "$python" benchmarks/synthetic_imagefolder.py --output "$data" --classes 10 --train 200 --val 50
budget 150 "$python" ImageNet/train.py --data-dir "$data" --output "$(mktemp -d)/run" --model bnext_tiny \
    --epochs 3 --batch-size 256 --workers 12 --amp bf16 --channels-last --warmup-epochs 1 --log-interval 5

echo "== 3. training step vs convolution floor, 224x224"
budget 90 "$python" benchmarks/train_step.py --model bnext_tiny --stem imagenet --img-size 224 --batch 64 \
    --mode bf16_compile_cl --warmup 2 --iters 5
budget 90 "$python" benchmarks/train_step.py --model bnext_large --stem imagenet --img-size 224 --batch 32 \
    --mode eager --mode bf16 --mode channels_last --warmup 2 --iters 5
echo "== done"
