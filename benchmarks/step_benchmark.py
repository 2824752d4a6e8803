"""Throughput and memory of pre-training, measured apart: the training step (model, loss, backward, AdamW) on
synthetic input, and the input pipeline (decode, crop, flip, collate) on a folder of real images.

Used by ``benchmarks/benchmark.py``; the numbers show which of the two limits a machine. The step also reports
its FLOPs per image (``torch.utils.flop_counter``) and, given the accelerator's peak, the model FLOPs utilisation.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from plain_step import plain_config, plain_training_step
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from modeling_mfm import MFMForPreTraining
from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.training.data.device_decoding import DeviceDecodeTransform, collate_encoded_batches, decode_batch
from modeling_mfm.training.data.sources import (
    EpochShuffleSampler,
    HFImageSource,
    PretrainingDataset,
    collate_pixel_batches,
    load_image_dataset,
)
from modeling_mfm.training.data.transforms import PretrainTransform, normalize_on_device
from modeling_mfm.training.models.model_factory import enable_activation_checkpointing, preferred_memory_format
from modeling_mfm.training.optim.optimizer import build_optimizer
from modeling_mfm.training.run.monitoring import (
    describe_hardware,
    peak_memory_bytes,
    peak_reserved_bytes,
    reset_peak_memory,
)

__all__ = [
    "benchmark_input_pipeline",
    "benchmark_training_step",
    "benchmark_transform_stages",
    "profile_steps",
    "training_flops_per_image",
]


def _process_tree_memory() -> int:
    """Memory of this process (resident set) plus what its DataLoader workers hold on their own (unique set size:
    forked workers share the parent's pages until they write them), in bytes."""
    import psutil  # a dependency of accelerate

    process = psutil.Process()
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_full_info().uss
        except psutil.Error:
            continue
    return total


def training_flops_per_image(config: Any, batch_size: int = 2, device: torch.device | str = "cpu") -> float:
    """FLOPs of one training step (forward + backward of MFMForPreTraining) per image, counted by
    ``torch.utils.flop_counter`` (matrix multiplications and convolutions; FFTs and element-wise work are not
    counted, as is usual for MFU). Attention is counted as its two matmuls, whichever kernel runs it."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # fused CPU attention kernels have no FLOP formula: count the matmuls
    model = MFMForPreTraining(config).to(device).train()
    images = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=images).loss.backward()
    return counter.get_total_flops() / batch_size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Any, device: torch.device, path: str, steps: int = 3) -> None:
    """Runs ``steps`` steps under ``torch.profiler`` and writes the operators sorted by their own device time (CPU
    time without an accelerator), so that the table shows where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=100)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{steps} steps\n{table}\n")


def benchmark_training_step(
    config: Any,
    batch_size: int,
    steps: int = 10,
    warmup_steps: int = 2,
    mixed_precision: str = "no",
    torch_compile: bool = False,
    gradient_checkpointing: bool = False,
    cpu: bool = False,
    peak_tflops: float | None = None,
    compile_scope: str = "model",
    profile_path: str | None = None,
    plain_baseline: bool = False,
    compile_mode: str = "default",
    bf16_residual_stream: bool = False,
    fast_paths: bool = True,
) -> dict[str, Any]:
    """Images per second and peak memory of the full training step (normalisation on the device, forward with
    frequency masking, frequency loss, backward, gradient clipping, AdamW) on random uint8 images, through
    Accelerate as in training. ``warmup_steps`` untimed steps come first (allocator, compilation); img/s is the
    median over the timed steps (each step is waited for). With ``peak_tflops`` (the accelerator's dense peak in
    the benchmark's precision) the result has the MFU: FLOPs per image x img/s / peak. ``compile_scope`` "model"
    compiles the whole MFMForPreTraining, "backbone" only its encoder; ``compile_mode`` is torch.compile's mode
    ("reduce-overhead": CUDA graphs, for steps whose kernels run faster than Python launches them);
    ``bf16_residual_stream`` is pre-training's ``--bf16_residual_stream`` (ViTs, bf16 only); ``fast_paths`` applies
    `modeling_mfm.fast_paths` (as the scripts do by default). With
    ``profile_path``, three more steps run under ``torch.profiler`` and the table of the operators' device (or CPU)
    time is written there. cuDNN autotuning is as set globally (``torch.backends.cudnn.benchmark``, which the
    benchmark script turns on as pre-training does; see `cudnn_autotuning`), and the result says which.

    ``plain_baseline`` then also builds the same model, with the same initial weights, without fast paths and in the
    plain float32 formulation of `plain_step`, and times it against this step in alternating steps (so that a
    machine whose speed drifts affects both alike): ``result["plain_baseline"]`` has both rates and the speed-up."""

    if batch_size <= 0 or steps <= 0 or warmup_steps < 0:
        raise ValueError(f"batch_size and steps must be positive and warmup_steps >= 0, got {batch_size}, {steps}, "
                         f"{warmup_steps}")
    if compile_scope not in ("model", "backbone"):
        raise ValueError(f"compile_scope must be 'model' or 'backbone', got {compile_scope!r}")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    if bf16_residual_stream and mixed_precision != "bf16":
        raise ValueError(f"bf16_residual_stream needs mixed_precision 'bf16', got {mixed_precision!r}")
    if plain_baseline:
        plain_config(config)  # refuses what the baseline cannot run, before any work
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    device = accelerator.device
    flops_per_image = training_flops_per_image(config, batch_size=min(batch_size, 2), device=device)
    torch.manual_seed(0)
    model = MFMForPreTraining(config)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if fast_paths or bf16_residual_stream:
        apply_fast_paths(model, bf16_residual_stream=bf16_residual_stream, mask_free_sdpa=fast_paths,
                         patch_gemm=fast_paths, decoder_gemm=fast_paths, fused_qkv=fast_paths,
                         unit_layer_scale=fast_paths)
    memory_format = preferred_memory_format(config, device)
    model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, lr=1e-4)
    if torch_compile and compile_scope == "backbone":
        model.mfm.backbone.compile(mode=compile_mode)
    elif torch_compile:
        model = torch.compile(model, mode=compile_mode)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    images = torch.randint(0, 256, (batch_size, config.num_channels, config.image_size, config.image_size),
                           dtype=torch.uint8, device=device)

    def step() -> torch.Tensor:
        pixel_values = normalize_on_device(images, config.image_mean, config.image_std)
        loss = model(pixel_values=pixel_values, return_dict=True).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    warmup_start = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    _synchronize(device)
    warmup_seconds = time.perf_counter() - warmup_start  # with torch.compile, mostly compilation
    reset_peak_memory(device)
    step_times, loss = [], None
    for _ in range(steps):
        seconds, loss = _timed(step, device)
        step_times.append(seconds)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the benchmarked step produced a non-finite loss ({float(loss)})")
    peak_memory, peak_reserved = peak_memory_bytes(device), peak_reserved_bytes(device)
    if profile_path:
        profile_steps(step, device, profile_path)
    median = statistics.median(step_times)
    img_per_s = batch_size / median
    result = {
        "benchmark": "training_step",
        "hardware": describe_hardware(device),
        "device": str(device),
        "image_size": config.image_size,
        "batch_size": batch_size,
        "steps": steps,
        "mixed_precision": accelerator.mixed_precision,
        "torch_compile": torch_compile,
        "compile_scope": compile_scope if torch_compile else None,
        "compile_mode": compile_mode if torch_compile else None,
        "gradient_checkpointing": gradient_checkpointing,
        "bf16_residual_stream": bf16_residual_stream,
        "fast_paths": fast_paths,
        "channels_last": memory_format == torch.channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "final_loss": float(loss),
        "step_seconds": median,
        "step_seconds_mean": sum(step_times) / steps,
        "warmup_seconds": warmup_seconds,
        "img_per_s": img_per_s,
        "gflops_per_image": flops_per_image / 1e9,
        "achieved_tflops": flops_per_image * img_per_s / 1e12,
        "peak_memory_mib": peak_memory / 2**20,
        "threads": torch.get_num_threads(),
    }
    if peak_reserved is not None:
        result["peak_reserved_mib"] = peak_reserved / 2**20
    if peak_tflops is not None:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    if plain_baseline:
        plain_step = plain_training_step(config, images, gradient_checkpointing)
        for _ in range(warmup_steps):
            plain_step()
        fast_times, plain_times = [], []
        for _ in range(steps):
            fast_times.append(_timed(step, device)[0])
            seconds, plain_loss = _timed(plain_step, device)
            plain_times.append(seconds)
        fast_median, plain_median = statistics.median(fast_times), statistics.median(plain_times)
        result["plain_baseline"] = {
            "img_per_s": batch_size / plain_median,
            "fast_img_per_s": batch_size / fast_median,  # this step's rate in the same, alternating, window
            "speedup": plain_median / fast_median,
            "final_loss": float(plain_loss),
        }
    return result


def _timed(step: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    """(seconds, loss) of one step, waited for."""
    start = time.perf_counter()
    loss = step()
    _synchronize(device)
    return time.perf_counter() - start, loss


def benchmark_input_pipeline(
    folder: str,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    batches: int = 10,
    jpeg_draft: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
    decode_on_device: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Images per second of the input pipeline alone: a DataLoader over the image folder with the pre-training
    transform (decode, RandomResizedCrop, flip) and the uint8 collation, as in training. With
    ``decode_on_device`` the workers only read the files and draw the crops, and each batch is decoded, cropped
    and resized on ``device`` (default: the accelerator, else the CPU) inside the timed loop. The first round of
    batches (one per worker, all made at once while the workers start) is not timed: the clock starts when the
    last of them arrives, so that batches made before it do not inflate the rate (with many workers, timing from
    the first batch overstates it many times over). A small
    folder is repeated within one pass so that the workers never drain."""
    if num_workers < 0 or batches <= 0 or batch_size <= 0:
        raise ValueError(f"num_workers must be >= 0, batches and batch_size > 0; got {num_workers}, {batches}, "
                         f"{batch_size}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dataset, column, _ = load_image_dataset(train_dir=folder, cache_dir=cache_dir)
    transform = PretrainTransform(image_size, jpeg_draft=jpeg_draft)
    if decode_on_device:
        transform = DeviceDecodeTransform(transform)
    # one pass covers every timed batch: a new pass drains and refills the workers' queues, which on a small folder
    # would cap the rate at (images per pass) / (one worker's time per batch) whatever the number of workers
    untimed = max(1, num_workers)
    repeats = math.ceil((batches + untimed) * batch_size / len(dataset))
    data = PretrainingDataset(HFImageSource(dataset, column), transform, seed=seed, repeats=repeats)
    sampler = EpochShuffleSampler(len(data), seed=seed)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=False,
                        collate_fn=collate_encoded_batches if decode_on_device else collate_pixel_batches,
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                        pin_memory=device.type == "cuda")
    images, skipped, timed_batches, epoch = 0, 0, -untimed, 0
    start = time.perf_counter()
    peak_rss, in_process = 0, 0.0
    while timed_batches < batches:
        sampler.set_epoch(epoch)
        for batch in loader:
            received = time.perf_counter()
            if decode_on_device:
                pixels, undecodable = decode_batch(batch, image_size, device)
            else:
                pixels, undecodable = batch["pixel_values"].to(device, non_blocking=True), 0
            _synchronize(device)
            if timed_batches < 0:
                if timed_batches == -1:  # the last batch of the first round: the workers are up and busy
                    peak_rss = _process_tree_memory()  # reading the workers' memory is slow: not while timing
                    start = time.perf_counter()
            else:
                images += pixels.shape[0]
                skipped += int(batch["skipped"]) + undecodable
                in_process += time.perf_counter() - received
            timed_batches += 1
            if timed_batches >= batches:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    peak_rss = max(peak_rss, _process_tree_memory())
    rate = images / elapsed
    return {
        "benchmark": "input_pipeline",
        "folder_images": len(dataset),
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "jpeg_draft": jpeg_draft,
        "decode_on_device": decode_on_device,
        "device": str(device),
        "images": images,
        "skipped_images": skipped,
        "img_per_s": rate,
        "img_per_s_per_worker": rate / max(1, num_workers),
        # time spent per image after the batch arrived (copy to the device, or decoding there): in training it adds
        # to the step, while the workers' share runs in parallel with it
        "in_process_ms_per_image": 1000 * in_process / max(1, images),
        "peak_memory_mib": peak_rss / 2**20,
    }


def benchmark_transform_stages(
    folder: str, image_size: int = 224, jpeg_draft: bool = True, passes: int = 3, cache_dir: str | None = None
) -> dict[str, Any]:
    """Where a worker's time goes, in milliseconds per image on one core (DataLoader workers run one thread each):
    opening the file (header), decoding (`PretrainTransform.decode`), cropping and resizing
    (`PretrainTransform.crop`); and, for comparison, PIL's own resize of the same crops. Best of ``passes`` passes
    over the folder."""
    if passes <= 0:
        raise ValueError(f"passes must be positive, got {passes}")
    dataset, column, _ = load_image_dataset(train_dir=folder, cache_dir=cache_dir)
    source = HFImageSource(dataset, column)
    transform = PretrainTransform(image_size, jpeg_draft=jpeg_draft)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best: dict[str, float] = {}
    try:
        for _ in range(passes):
            totals = {"open": 0.0, "decode": 0.0, "crop_resize": 0.0, "pil_resize": 0.0}
            for index in range(len(source)):
                start = time.perf_counter()
                with source.open(index) as image:
                    opened = time.perf_counter()
                    box, flip = transform.draw(image.size, np.random.default_rng(index))
                    pixels, box = transform.decode(image, box)
                decoded = time.perf_counter()
                transform.crop(pixels, box, flip)
                cropped = time.perf_counter()
                top, left, height, width = box
                rgb = Image.fromarray(pixels.permute(1, 2, 0).numpy())
                resize_start = time.perf_counter()
                rgb.resize((image_size,) * 2, Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
                totals["pil_resize"] += time.perf_counter() - resize_start
                totals["open"] += opened - start
                totals["decode"] += decoded - opened
                totals["crop_resize"] += cropped - decoded
            for stage, seconds in totals.items():
                best[stage] = min(best.get(stage, math.inf), 1000 * seconds / len(source))
    finally:
        torch.set_num_threads(threads)
    total = best["open"] + best["decode"] + best["crop_resize"]
    return {
        "benchmark": "transform_stages",
        "folder_images": len(source),
        "image_size": image_size,
        "jpeg_draft": jpeg_draft,
        "open_ms": best["open"],
        "decode_ms": best["decode"],
        "crop_resize_ms": best["crop_resize"],
        "pil_resize_ms": best["pil_resize"],
        "total_ms": total,
        "img_per_s_one_core": 1000 / total,
    }
