#!/usr/bin/env python
"""Throughput, FLOPs, MFU and peak memory of MFM pre-training: the training step and, separately, the input pipeline.

    python benchmarks/benchmark.py --presets mfm-vit-tiny mfm-vit-base --per_device_train_batch_size 8 --plain_baseline
    python benchmarks/benchmark.py --presets mfm-vit-base --per_device_train_batch_size 64 128 256 512 \
        --mixed_precision bf16
    python benchmarks/benchmark.py --presets mfm-vit-base mfm-resnet50 --per_device_train_batch_size 128 \
        --mixed_precision bf16 --torch_compile --peak_tflops 989 --check_fast_path
    python benchmarks/benchmark.py --skip_step --data_dir path/to/jpegs --dataloader_num_workers 0 1 2 --pipeline_stages
    python benchmarks/benchmark.py --skip_step --data_dir path/to/jpegs --decode_on_device both
    python benchmarks/benchmark.py ... --json results.json
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from fast_path_check import fast_path_agreement
from step_benchmark import (
    benchmark_input_pipeline,
    benchmark_training_step,
    benchmark_transform_stages,
)

from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.configuration_mfm import MFMConfig
from modeling_mfm.training.loops.pretraining_arguments import COMPILE_MODES
from modeling_mfm.training.models.model_factory import cudnn_autotuning


@dataclass
class BenchmarkArguments:
    # ---- the training step, on synthetic images
    presets: list[str] = field(default_factory=lambda: ["mfm-vit-tiny", "mfm-vit-base"],
                               metadata={"help": "Preset names."})
    image_size: int = field(default=224, metadata={"help": "Side of the square images, in pixels."})
    per_device_train_batch_size: list[int] = field(
        default_factory=lambda: [8],
        metadata={"help": "Per-device batch of the training step; several values sweep them (peak memory per batch "
                          "size; a batch that does not fit in the accelerator's memory is reported as such)."},
    )
    steps: int = field(default=5, metadata={"help": "Timed steps."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed steps first."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Autocast precision."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile the step with torch.compile."})
    compile_scope: Literal["model", "backbone"] = field(
        default="model", metadata={"help": "With --torch_compile: compile the whole model or only its encoder."}
    )
    torch_compile_mode: str = field(
        default="default",
        metadata={"help": "With --torch_compile: torch.compile's mode (reduce-overhead replays CUDA graphs).",
                  "choices": COMPILE_MODES},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    bf16_residual_stream: bool = field(
        default=False,
        metadata={"help": "ViTs with --mixed_precision bf16: the residual stream in bf16 (as pre-training's flag)."},
    )
    cudnn_benchmark: bool = field(
        default=True,
        metadata={"help": "On CUDA, let cuDNN time its convolution algorithms once for the benchmark's shapes "
                          "(torch.backends.cudnn.benchmark, on in pre-training by default); --no_cudnn_benchmark "
                          "keeps its heuristic choice."},
    )
    profile_dir: str | None = field(
        default=None, metadata={"help": "Write a torch.profiler table of three more steps per model to this folder."}
    )
    cpu: bool = field(
        default=False, metadata={"help": "Run the step (and device decoding) on the CPU even if an accelerator exists."}
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Dense peak of the device in the benchmark's precision, from its data sheet: MFU = FLOPs "
                          "per image x img/s / peak."},
    )
    check_fast_path: bool = field(
        default=False,
        metadata={"help": "First compare the loss and gradients of one batch by the fast step (this precision, SDPA, "
                          "channels_last, compile) with the plain float32 eager step, same masks."},
    )
    plain_baseline: bool = field(
        default=False,
        metadata={"help": "Also time the plain float32 formulation of the same step (the model without fast paths, "
                          "host-built masks, complex arithmetic, eager attention, for-loop AdamW), alternating steps "
                          "with this one, and print the speed-up over it."},
    )
    fast_paths: bool = field(
        default=True,
        metadata={"help": "Apply modeling_mfm.fast_paths; --no_fast_paths times the stock model (as pre-training's "
                          "--no_fast_paths)."},
    )
    skip_step: bool = field(default=False, metadata={"help": "Only benchmark the input pipeline."})
    # ---- the input pipeline, on a folder of images
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of images; the input-pipeline benchmark runs when given."}
    )
    dataloader_num_workers: list[int] = field(default_factory=lambda: [0, 1, 2],
                                   metadata={"help": "DataLoader workers to try."})
    data_batch_size: int = field(default=32, metadata={"help": "Batch of the input-pipeline benchmark."})
    data_batches: int = field(default=10, metadata={"help": "Timed batches per setting."})
    pipeline_stages: bool = field(
        default=False,
        metadata={"help": "Also time the stages of one worker's transform per image on one core (open, decode, crop "
                          "+ resize) and PIL's resize of the same crops."},
    )
    compare_jpeg_draft: bool = field(default=False, metadata={"help": "Also measure with JPEG draft decoding off."})
    decode_on_device: Literal["off", "on", "both"] = field(
        default="off",
        metadata={"help": "Decode, crop and resize the JPEGs on the accelerator (workers only read files); 'both' "
                          "measures the two pipelines."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches the folder's file list."})
    json: str | None = field(default=None, metadata={"help": "Write all results to this JSON file."})


def print_step(name: str, result: dict) -> None:
    print(f"step  {name:<16} {result['image_size']}px batch {result['batch_size']:<4} "
          f"{result['img_per_s']:8.1f} img/s  {result['step_seconds'] * 1000:8.0f} ms/step  "
          f"{result['gflops_per_image']:7.1f} GFLOP/img  {result['achieved_tflops']:7.2f} TFLOP/s  "
          + (f"MFU {result['mfu']:.1%}  " if "mfu" in result else "")
          + f"peak {result['peak_memory_mib']:8.0f} MiB  "
          + (f"reserved {result['peak_reserved_mib']:6.0f} MiB  " if "peak_reserved_mib" in result else "")
          + f"({result['hardware']}, "
          f"{result['mixed_precision']}, {result['threads']} threads)", flush=True)


def benchmark_batch_size(args: BenchmarkArguments, name: str, config: MFMConfig, batch_size: int,
                         results: list[dict]) -> None:
    """The step of one model at one batch size (and its plain baseline when asked); an accelerator running out of
    memory is recorded and the sweep goes on."""
    profile_path = None
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        variant = f"compiled-{args.compile_scope}-{args.torch_compile_mode}" if args.torch_compile else "eager"
        profile_path = os.path.join(args.profile_dir, f"{name}-b{batch_size}-{args.mixed_precision}-{variant}.txt")
    try:
        result = benchmark_training_step(
            config, batch_size, args.steps, args.warmup_steps, args.mixed_precision, args.torch_compile,
            args.gradient_checkpointing, args.cpu, args.peak_tflops, compile_scope=args.compile_scope,
            profile_path=profile_path, plain_baseline=args.plain_baseline, compile_mode=args.torch_compile_mode,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(BenchmarkArguments, prog="benchmark.py", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv)
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
            for decode_on_device, draft, workers in itertools.product(on_device, drafts, args.dataloader_num_workers):
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
            for name in args.presets:
                config = MFMConfig.from_preset(name, image_size=args.image_size)
                if args.check_fast_path:
                    batch = min(args.per_device_train_batch_size[0], 32)
                    check = fast_path_agreement(config, batch, args.mixed_precision, args.torch_compile,
                                                device="cpu" if args.cpu else None)
                    results.append({"benchmark": "fast_path_check", "model": name, **check})
                    print(f"check {name:<16} loss plain {check['loss_plain']:.6f} fast {check['loss_fast']:.6f} "
                          f"(rel. diff. {check['loss_relative_difference']:.1e}); gradient norm rel. diff. "
                          f"{check['grad_norm_relative_difference']:.1e}, cosine {check['grad_cosine_similarity']:.5f} "
                          f"(input rounding alone: {check['grad_cosine_similarity_input_rounded']:.5f})"
                          f"  ({check['device']}, {check['mixed_precision']}, compile {check['torch_compile']})",
                          flush=True)
                device = "cpu" if args.cpu else (torch.accelerator.current_accelerator() or "cpu")
                with cudnn_autotuning(args.cudnn_benchmark, device):
                    for batch_size in args.per_device_train_batch_size:
                        benchmark_batch_size(args, name, config, batch_size, results)
    except ValueError as error:  # an unknown preset, a setting the step refuses
        raise ScriptError(str(error)) from error
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
