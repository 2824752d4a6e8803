#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, in one run on one GPU.
#
#   bash benchmarks/gpu.sh IMAGE_FOLDER RESULTS_FOLDER [table|headline|quick|autotune|profile|train]
#
# Modes (each takes at most about 10 minutes):
#   table (default, about 9 minutes): the training step eager, compiled and compiled with CUDA graphs, float32,
#     memory at batch 256 and 512 with and without gradient checkpointing, the input pipeline.
#   headline (at most 540 s): the package's fastest compiled steps: ViT-B/16 at batch 128 in the official float32
#     stream, then with CUDA graphs and the bf16 stream at batch 128 and 256, ResNet-50 with CUDA graphs; then
#     Inductor's max-autotune with the bf16 stream for the time left.
#   quick (at most 470 s): benchmarks/vit_step_variants.py (the ViT-B/16 variants, compiled, with a profiler table
#     each; then at batch 512), ResNet-50 with CUDA graphs.
#   autotune (at most 560 s): the ViT-B/16 step with Inductor's max-autotune, alone and with the bf16 residual stream.
#   profile (about 5 minutes): torch.profiler tables of the eager ViT-B/16 and ResNet-50 steps and of the compiled
#     ViT-B/16 step, the step with only the encoder compiled, and the input pipeline for 1 to 15 workers.
#   train (about 7 minutes): pre-training ViT-B/16 on the image folder for 60 steps with PIL workers, with
#     --decode_on_device and compiled, then ResNet-50 compiled with CUDA graphs: what the training loop achieves on
#     real JPEGs.
# IMAGE_FOLDER: JPEGs for the input-pipeline figures (ImageNet samples). RESULTS_FOLDER receives one JSON file per
# group, the profiler tables and the full log. The groups run in order of importance, each under its own time limit.
# MFU is computed against 989 TFLOP/s (H100/H200 dense bf16): change --peak_tflops below for another card.
set -u
images=${1:?image folder}
results=${2:?results folder}
mode=${3:-table}
mkdir -p "$results"
scratch=${TMPDIR:-/tmp}/mfm-benchmarks  # caches, copied images and training runs
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bench="python benchmarks/benchmark.py --image_size 224 --peak_tflops 989 --steps 20 --warmup_steps 3"
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
    step eager_bf16 120 --presets mfm-vit-base mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision bf16 --check_fast_path
    step compiled_bf16 240 --presets mfm-vit-base mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile
    step compiled_cudagraphs 260 --presets mfm-resnet50 mfm-vit-base --per_device_train_batch_size 128 256 --mixed_precision bf16 \
        --torch_compile --torch_compile_mode reduce-overhead
    # the input pipeline: PIL in the workers (draft decoding), then decoding on the GPU
    step pipeline_cpu 100 --skip_step --data_dir "$images" --dataloader_num_workers 1 4 8 15 --data_batch_size 64 \
        --data_batches 40 --decode_on_device off --cache_dir "$scratch/datasets_cache"
    step pipeline_gpu 60 --skip_step --data_dir "$images" --dataloader_num_workers 1 2 4 --data_batch_size 64 \
        --data_batches 40 --decode_on_device on --cache_dir "$scratch/datasets_cache"
    # the float32 baseline, and memory at larger batches with and without gradient checkpointing
    step eager_fp32 60 --presets mfm-vit-base mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision no
    step memory_sweep 75 --presets mfm-vit-base --per_device_train_batch_size 256 512 --mixed_precision bf16
    step memory_sweep_gc 75 --presets mfm-vit-base --per_device_train_batch_size 256 512 --mixed_precision bf16 --gradient_checkpointing
elif [ "$mode" = headline ]; then
    step vit_compiled 110 --presets mfm-vit-base --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile
    step vit_cudagraphs_bf16_stream 130 --presets mfm-vit-base --per_device_train_batch_size 128 256 --mixed_precision bf16 \
        --torch_compile --torch_compile_mode reduce-overhead --bf16_residual_stream
    step resnet_cudagraphs 100 --presets mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile \
        --torch_compile_mode reduce-overhead
    echo "== vit_max_autotune ($((540 - SECONDS)) s left)"
    timeout $((540 - SECONDS)) python benchmarks/vit_step_variants.py --variants bf16_residual+max_autotune \
        > "$results/vit_max_autotune.txt" 2>&1 || echo "!! vit_max_autotune failed or timed out ($?)"
    grep -E "img/s|FAILED|^float32|^mfm" "$results/vit_max_autotune.txt"
elif [ "$mode" = quick ]; then
    # the ViT-B/16 step: as it was (patch convolutions, complex FFTs, three QKV projections), the package's without
    # fused QKV, the package's, the bf16 residual stream, with CUDA graphs; compiled, with their agreement with
    # float32 and a profiler table each (20-30 s of compilation each)
    echo "== vit_step_variants"
    timeout 230 python benchmarks/vit_step_variants.py --profile_dir "$results" > "$results/vit_step_variants.txt" \
        2>&1 || echo "!! vit_step_variants failed or timed out ($?)"
    grep -E "img/s|FAILED|^float32|^mfm" "$results/vit_step_variants.txt"
    echo "== vit_step_variants_b512"
    timeout 130 python benchmarks/vit_step_variants.py --per_device_train_batch_size 512 --steps 10 --variants autocast \
        bf16_residual+cudagraphs > "$results/vit_step_variants_b512.txt" 2>&1 \
        || echo "!! vit_step_variants_b512 failed or timed out ($?)"
    grep -E "img/s|FAILED|^float32|^mfm" "$results/vit_step_variants_b512.txt"
    # ResNet-50 with CUDA graphs at batch 128
    step resnet_cudagraphs 110 --presets mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile \
        --torch_compile_mode reduce-overhead
elif [ "$mode" = autotune ]; then
    # Inductor's max-autotune (Triton GEMM templates with the bias and GELU fused in), alone and with the bf16
    # residual stream; several minutes of autotuning each
    echo "== vit_max_autotune"
    timeout 560 python benchmarks/vit_step_variants.py --variants autocast max_autotune bf16_residual+max_autotune \
        > "$results/vit_max_autotune.txt" 2>&1 || echo "!! vit_max_autotune failed or timed out ($?)"
    grep -E "img/s|FAILED|^float32|^mfm" "$results/vit_max_autotune.txt"
elif [ "$mode" = profile ]; then
    step profile_eager 90 --presets mfm-vit-base mfm-resnet50 --per_device_train_batch_size 128 --mixed_precision bf16 \
        --profile_dir "$results"
    step compiled_backbone 150 --presets mfm-vit-base --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile \
        --compile_scope backbone
    step profile_compiled 150 --presets mfm-vit-base --per_device_train_batch_size 128 --mixed_precision bf16 --torch_compile \
        --profile_dir "$results"
    step pipeline 120 --skip_step --data_dir "$images" --dataloader_num_workers 1 2 4 8 15 --data_batch_size 64 \
        --data_batches 40 --decode_on_device both --cache_dir "$scratch/datasets_cache"
elif [ "$mode" = train ]; then
    # end to end: pre-training ViT-B/16 on the JPEGs (copied 10x, so that an epoch spans many steps) with PIL
    # workers, with --decode_on_device, and compiled; the img/s the training loop logs (steps 21-60)
    data="$scratch/train_images"
    rm -rf "$data"
    for i in $(seq 10); do mkdir -p "$data/$i" && cp "$images"/* "$data/$i/"; done
    for variant in pil device compiled resnet_cudagraphs; do
        preset=mfm-vit-base extra=()
        [ "$variant" = device ] && extra=(--decode_on_device)
        [ "$variant" = compiled ] && extra=(--torch_compile)
        [ "$variant" = resnet_cudagraphs ] && preset=mfm-resnet50 extra=(--torch_compile --torch_compile_mode \
            reduce-overhead)
        echo "== train_$variant"
        timeout 200 python run_scripts/run_pretrain.py --preset "$preset" --train_dir "$data" \
            --output_dir "$scratch/run_$variant" --per_device_train_batch_size 128 --max_train_steps 60 \
            --warmup_steps 5 --mixed_precision bf16 --logging_steps 10 --visualization_steps 0 \
            --checkpointing_steps 1000 --report_to none --dataloader_num_workers 15 \
            --cache_dir "$scratch/datasets_cache" "${extra[@]}" > "$scratch/run_$variant.log" 2>&1 \
            || { echo "!! train_$variant failed or timed out"; tail -5 "$scratch/run_$variant.log"; }
        python - "$scratch/run_$variant/logs/metrics.jsonl" "$results/train_$variant.json" <<'PYTHON'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"train/img_per_s"' in line]
late = [r["train/img_per_s"] for r in records if r["step"] > 20]
summary = {"img_per_s_by_step": {r["step"]: r["train/img_per_s"] for r in records},
           "img_per_s_steps_21_60": sum(late) / max(1, len(late)),
           "peak_memory_mib": max(r["train/peak_memory_mib"] for r in records)}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(f"img/s (steps 21-60) {summary['img_per_s_steps_21_60']:.0f}, peak {summary['peak_memory_mib']:.0f} MiB")
PYTHON
    done
else
    echo "unknown mode $mode (table, headline, quick, autotune, profile or train)" >&2
    exit 2
fi
echo "== done"
