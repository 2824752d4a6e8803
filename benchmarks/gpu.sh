#!/usr/bin/env bash
# The GPU measurements behind the README's performance figures, in one run on one H100/H200.
#
#   bash benchmarks/gpu.sh IMAGE_FOLDER RESULTS_FOLDER [table|profile]
#
# table (default, about 6 minutes): the training step eager and compiled, float32, memory at batch 256 with and
# without gradient checkpointing, the input pipeline. profile (about 5 minutes): torch.profiler tables of the eager
# ViT-B/16 and ResNet-50 steps and of the compiled ViT-B/16 step, the step with only the encoder compiled, and the
# input pipeline for 1 to 15 workers.
# IMAGE_FOLDER: JPEGs for the input-pipeline figures (ImageNet samples). RESULTS_FOLDER receives one JSON file per
# group, the profiler tables and the full log. The groups run in order of importance, each under its own time limit.
set -u
images=${1:?image folder}
results=${2:?results folder}
mode=${3:-table}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bench="python run_scripts/benchmark.py --image_size 224 --peak_tflops 989 --steps 20 --warmup_steps 3"
step() {  # name, seconds allowed, arguments...
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" $bench "$@" --json "$results/$name.json" || echo "!! $name failed or timed out ($?)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python -c "import torch, torchvision, transformers, accelerate; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
'cores', __import__('os').cpu_count())"

if [ "$mode" = table ]; then
    # the training step, eager bf16, with the fast-path check against float32; then compiled (Inductor), whose
    # compilation takes a minute or two per model
    step eager_bf16 120 --models mfm-vit-base mfm-resnet50 --batch_size 128 --mixed_precision bf16 --check_fast_path
    step compiled_bf16 240 --models mfm-vit-base mfm-resnet50 --batch_size 128 --mixed_precision bf16 --torch_compile
    # the input pipeline: PIL in the workers (draft decoding), then decoding on the GPU
    step pipeline_cpu 100 --skip_step --data_dir "$images" --num_workers 1 4 8 15 --data_batch_size 64 \
        --data_batches 40 --decode_on_device off --cache_dir /tmp/datasets_cache
    step pipeline_gpu 60 --skip_step --data_dir "$images" --num_workers 1 2 4 --data_batch_size 64 \
        --data_batches 40 --decode_on_device on --cache_dir /tmp/datasets_cache
    # the float32 baseline, and memory at a larger batch with and without gradient checkpointing
    step eager_fp32 60 --models mfm-vit-base mfm-resnet50 --batch_size 128 --mixed_precision no
    step memory_b256 45 --models mfm-vit-base --batch_size 256 --mixed_precision bf16
    step memory_b256_gc 45 --models mfm-vit-base --batch_size 256 --mixed_precision bf16 --gradient_checkpointing
elif [ "$mode" = profile ]; then
    step profile_eager 90 --models mfm-vit-base mfm-resnet50 --batch_size 128 --mixed_precision bf16 \
        --profile_dir "$results"
    step compiled_backbone 150 --models mfm-vit-base --batch_size 128 --mixed_precision bf16 --torch_compile \
        --compile_scope backbone
    step profile_compiled 150 --models mfm-vit-base --batch_size 128 --mixed_precision bf16 --torch_compile \
        --profile_dir "$results"
    step pipeline 120 --skip_step --data_dir "$images" --num_workers 1 2 4 8 15 --data_batch_size 64 \
        --data_batches 40 --decode_on_device both --cache_dir /tmp/datasets_cache
else
    echo "unknown mode $mode (table or profile)" >&2
    exit 2
fi
echo "== done"
