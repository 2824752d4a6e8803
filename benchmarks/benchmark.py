#!/usr/bin/env python
"""Throughput, FLOPs, MFU and peak memory of MFM pre-training: the training step and, separately, the input pipeline.

    python benchmarks/benchmark.py --models mfm-vit-tiny mfm-vit-base --batch_size 8 --plain_baseline
    python benchmarks/benchmark.py --models mfm-vit-base --batch_size 64 128 256 512 --mixed_precision bf16
    python benchmarks/benchmark.py --models mfm-vit-base mfm-resnet50 --batch_size 128 --mixed_precision bf16 \
        --torch_compile --peak_tflops 989 --check_fast_path
    python benchmarks/benchmark.py --skip_step --data_dir path/to/jpegs --num_workers 0 1 2 --pipeline_stages
    python benchmarks/benchmark.py --skip_step --data_dir path/to/jpegs --decode_on_device both
    python benchmarks/benchmark.py ... --json results.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys

import torch
from fast_path_check import fast_path_agreement
from step_benchmark import (
    benchmark_input_pipeline,
    benchmark_training_step,
    benchmark_transform_stages,
)

from modeling_mfm.configuration_mfm import MFMConfig
from modeling_mfm.training.arguments import COMPILE_MODES
from modeling_mfm.training.model_factory import cudnn_autotuning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step = parser.add_argument_group("training step (synthetic images)")
    step.add_argument("--models", nargs="+", default=["mfm-vit-tiny", "mfm-vit-base"], help="Preset names.")
    step.add_argument("--image_size", type=int, default=224)
    step.add_argument("--batch_size", type=int, nargs="+", default=[8],
                      help="Per-device batch of the training step; several values sweep them (peak memory per "
                           "batch size; a batch that does not fit in the accelerator's memory is reported as such).")
    step.add_argument("--steps", type=int, default=5, help="Timed steps.")
    step.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps first.")
    step.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    step.add_argument("--torch_compile", action="store_true")
    step.add_argument("--compile_scope", choices=["model", "backbone"], default="model",
                      help="With --torch_compile: compile the whole model or only its encoder.")
    step.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                      help="With --torch_compile: torch.compile's mode (reduce-overhead replays CUDA graphs).")
    step.add_argument("--gradient_checkpointing", action="store_true")
    step.add_argument("--bf16_residual_stream", action="store_true",
                      help="ViTs with --mixed_precision bf16: the residual stream in bf16 (as pre-training's flag).")
    step.add_argument("--no_cudnn_benchmark", dest="cudnn_benchmark", action="store_false",
                      help="On CUDA, keep cuDNN's heuristic convolution algorithms instead of timing them once for "
                           "the benchmark's shapes (torch.backends.cudnn.benchmark, on in pre-training by default).")
    step.add_argument("--profile_dir",
                      help="Write a torch.profiler table of three more steps per model to this folder.")
    step.add_argument("--cpu", action="store_true",
                      help="Run the step (and device decoding) on the CPU even if an accelerator exists.")
    step.add_argument("--peak_tflops", type=float,
                      help="Dense peak of the device in the benchmark's precision (e.g. 989 for H100/H200 bf16): "
                           "MFU = FLOPs per image x img/s / peak.")
    step.add_argument("--check_fast_path", action="store_true",
                      help="First compare the loss and gradients of one batch by the fast step (this precision, "
                           "SDPA, channels_last, compile) with the plain float32 eager step, same masks.")
    step.add_argument("--plain_baseline", action="store_true",
                      help="Also time the plain float32 formulation of the same step (the model without fast paths, "
                           "host-built masks, complex arithmetic, eager attention, for-loop AdamW), alternating steps "
                           "with this one, and print the speed-up over it.")
    step.add_argument("--no_fast_paths", dest="fast_paths", action="store_false",
                      help="Time the model without modeling_mfm.fast_paths (as pre-training's --no_fast_paths).")
    step.add_argument("--skip_step", action="store_true", help="Only benchmark the input pipeline.")
    data = parser.add_argument_group("input pipeline (a folder of images)")
    data.add_argument("--data_dir", help="Folder of images; the pipeline benchmark runs when given.")
    data.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try.")
    data.add_argument("--data_batch_size", type=int, default=32)
    data.add_argument("--data_batches", type=int, default=10, help="Timed batches per setting.")
    data.add_argument("--pipeline_stages", action="store_true",
                      help="Also time the stages of one worker's transform per image on one core (open, decode, "
                           "crop + resize) and PIL's resize of the same crops.")
    data.add_argument("--compare_jpeg_draft", action="store_true",
                      help="Also measure with JPEG draft decoding off.")
    data.add_argument("--decode_on_device", choices=["off", "on", "both"], default="off",
                      help="Decode, crop and resize the JPEGs on the accelerator (workers only read files); "
                           "'both' measures the two pipelines.")
    data.add_argument("--cache_dir", help="Where datasets caches the folder's file list.")
    parser.add_argument("--json", help="Write all results to this JSON file.")
    return parser.parse_args(argv)


def print_step(name: str, result: dict) -> None:
    print(f"step  {name:<16} {result['image_size']}px batch {result['batch_size']:<4} "
          f"{result['img_per_s']:8.1f} img/s  {result['step_seconds'] * 1000:8.0f} ms/step  "
          f"{result['gflops_per_image']:7.1f} GFLOP/img  {result['achieved_tflops']:7.2f} TFLOP/s  "
          + (f"MFU {result['mfu']:.1%}  " if "mfu" in result else "")
          + f"peak {result['peak_memory_mib']:8.0f} MiB  "
          + (f"reserved {result['peak_reserved_mib']:6.0f} MiB  " if "peak_reserved_mib" in result else "")
          + f"({result['hardware']}, "
          f"{result['mixed_precision']}, {result['threads']} threads)", flush=True)


def benchmark_batch_size(args: argparse.Namespace, name: str, config: MFMConfig, batch_size: int,
                         results: list[dict]) -> None:
    """The step of one model at one batch size (and its plain baseline when asked); an accelerator running out of
    memory is recorded and the sweep goes on."""
    profile_path = None
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        variant = f"compiled-{args.compile_scope}-{args.compile_mode}" if args.torch_compile else "eager"
        profile_path = os.path.join(args.profile_dir, f"{name}-b{batch_size}-{args.mixed_precision}-{variant}.txt")
    try:
        result = benchmark_training_step(
            config, batch_size, args.steps, args.warmup_steps, args.mixed_precision, args.torch_compile,
            args.gradient_checkpointing, args.cpu, args.peak_tflops, compile_scope=args.compile_scope,
            profile_path=profile_path, plain_baseline=args.plain_baseline, compile_mode=args.compile_mode,
            bf16_residual_stream=args.bf16_residual_stream, fast_paths=args.fast_paths,
        )
    except RuntimeError as error:  # torch.OutOfMemoryError on an accelerator, a RuntimeError on the CPU
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        result = None
    if result is None:  # outside the except block, so that the failed step's tensors can be freed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append({"benchmark": "training_step", "model": name, "batch_size": batch_size,
                        "out_of_memory": True})
        print(f"step  {name:<16} batch {batch_size}: out of memory", flush=True)
        return
    result["model"] = name
    results.append(result)
    print_step(name, result)
    if args.plain_baseline:
        plain = result["plain_baseline"]
        print(f"      {name:<16} x{plain['speedup']:.2f} over the plain float32 formulation ({plain['img_per_s']:.1f} "
              f"img/s; this step {plain['fast_img_per_s']:.1f} img/s in the same alternating steps)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    try:
        # the input pipeline first, while this process holds no model (its memory figure stays clean)
        if args.data_dir and args.pipeline_stages:
            stages = benchmark_transform_stages(args.data_dir, args.image_size, cache_dir=args.cache_dir)
            results.append(stages)
            print(f"stages per image, one core: open {stages['open_ms']:.3f} ms, decode {stages['decode_ms']:.3f} ms, "
                  f"crop + resize {stages['crop_resize_ms']:.3f} ms (PIL's resize: {stages['pil_resize_ms']:.3f} ms); "
                  f"{stages['img_per_s_one_core']:.0f} img/s", flush=True)
        if args.data_dir:
            on_device = {"off": [False], "on": [True], "both": [False, True]}[args.decode_on_device]
            drafts = [True, False] if args.compare_jpeg_draft else [True]
            for decode_on_device, draft, workers in itertools.product(on_device, drafts, args.num_workers):
                if decode_on_device and not draft and len(drafts) > 1:
                    continue  # device decoding has no draft mode
                result = benchmark_input_pipeline(
                    args.data_dir, args.image_size, args.data_batch_size, workers, args.data_batches, draft,
                    cache_dir=args.cache_dir, decode_on_device=decode_on_device,
                    device="cpu" if args.cpu else None,
                )
                results.append(result)
                where = f"decode on {result['device']}" if decode_on_device else f"draft {'on ' if draft else 'off'}"
                print(f"data  {workers} workers  {where}  "
                      f"{result['img_per_s']:8.1f} img/s  {result['img_per_s_per_worker']:8.1f} img/s/worker  "
                      f"{result['in_process_ms_per_image']:6.3f} ms/img in process  "
                      f"peak {result['peak_memory_mib']:8.0f} MiB  ({result['images']} images)", flush=True)
        if not args.skip_step:
            for name in args.models:
                config = MFMConfig.from_preset(name, image_size=args.image_size)
                if args.check_fast_path:
                    check = fast_path_agreement(config, min(args.batch_size[0], 32), args.mixed_precision,
                                                args.torch_compile, device="cpu" if args.cpu else None)
                    results.append({"benchmark": "fast_path_check", "model": name, **check})
                    print(f"check {name:<16} loss plain {check['loss_plain']:.6f} fast {check['loss_fast']:.6f} "
                          f"(rel. diff. {check['loss_relative_difference']:.1e}); gradient norm rel. diff. "
                          f"{check['grad_norm_relative_difference']:.1e}, cosine {check['grad_cosine_similarity']:.5f} "
                          f"(input rounding alone: {check['grad_cosine_similarity_input_rounded']:.5f})"
                          f"  ({check['device']}, {check['mixed_precision']}, compile {check['torch_compile']})",
                          flush=True)
                device = "cpu" if args.cpu else (torch.accelerator.current_accelerator() or "cpu")
                with cudnn_autotuning(args.cudnn_benchmark, device):
                    for batch_size in args.batch_size:
                        benchmark_batch_size(args, name, config, batch_size, results)
    except ValueError as error:
        print(f"benchmark.py: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
