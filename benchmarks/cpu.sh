#!/usr/bin/env bash
# The CPU measurements behind docs/performance.md ("The development CPU"), in one run (about 15 minutes on 2 cores).
#
#   bash benchmarks/cpu.sh IMAGE_FOLDER RESULTS_FOLDER
#
# The training step of four presets against the plain float32 formulation (eager, then compiled), bf16 autocast,
# peak memory per batch size with and without gradient checkpointing, and the input pipeline: per-stage times of one
# worker, then the DataLoader with 0 to 2 workers, draft decoding on and off, and decoding "on the device" (here the
# CPU). IMAGE_FOLDER: JPEGs (ImageNet samples). RESULTS_FOLDER receives one JSON file per group.
set -eu
images=${1:?image folder}
results=${2:?results folder}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bench="python benchmarks/benchmark.py --cpu --image_size 224"
step() {  # name, arguments...
    local name=$1
    shift
    echo "== $name"
    $bench "$@" --json "$results/$name.json" 2>&1 | grep -E "^(step|data|stages|check) |over the plain"
}

python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'threads', torch.get_num_threads())"
step pipeline --skip_step --data_dir "$images" --dataloader_num_workers 0 1 2 --data_batches 20 --compare_jpeg_draft \
    --decode_on_device both --pipeline_stages --cache_dir "${TMPDIR:-/tmp}/mfm-benchmarks/datasets_cache"
step eager --presets mfm-vit-tiny mfm-resnet50 mfm-convnext-tiny mfm-vit-base --per_device_train_batch_size 8 --steps 6 \
    --plain_baseline
step compiled --presets mfm-vit-tiny mfm-resnet50 --per_device_train_batch_size 8 --steps 6 --torch_compile --plain_baseline
step bf16 --presets mfm-vit-tiny --per_device_train_batch_size 8 --steps 6 --mixed_precision bf16
step memory --presets mfm-vit-tiny --per_device_train_batch_size 4 16 32 64 --steps 2 --warmup_steps 1
step memory_gc --presets mfm-vit-tiny --per_device_train_batch_size 4 16 32 64 --steps 2 --warmup_steps 1 --gradient_checkpointing
echo "== done"
