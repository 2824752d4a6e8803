"""Resource figures for logs, benchmarks and model cards: peak memory, a short description of the hardware, and the
mixed precision that actually runs."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import sys

import torch

from ...cli import ScriptError

__all__ = [
    "MixedPrecisionError",
    "describe_hardware",
    "peak_memory_bytes",
    "peak_reserved_bytes",
    "precision_in_effect",
    "reset_peak_memory",
]


class MixedPrecisionError(ScriptError):
    """The requested mixed precision cannot run on this device (exit code 2)."""


def precision_in_effect(accelerator) -> str:
    """The mixed precision the run really uses (what logs and model cards record). Accelerate silently trains in
    float32 when autocast cannot run the requested precision (fp16 on the CPU): that raises `MixedPrecisionError`
    here instead."""
    requested = accelerator.mixed_precision
    engine_managed = accelerator.distributed_type.value in ("DEEPSPEED", "MEGATRON_LM")
    if requested == "no" or accelerator.native_amp or engine_managed:
        return requested
    device = accelerator.device.type
    raise MixedPrecisionError(
        f"--mixed_precision {requested} cannot run on the {device}: torch autocast has no {requested} there and "
        "Accelerate would silently train in float32; use --mixed_precision bf16 or no"
    )


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process on ``device``: the allocator's peak on CUDA / XPU, the peak resident set size
    (RSS, the whole process) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return int(torch.xpu.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_reserved_bytes(device: torch.device | str) -> int | None:
    """Peak memory the allocator held from the accelerator (CUDA / XPU), cache and CUDA-graph pools included; None
    elsewhere. Why beside `peak_memory_bytes`: replayed CUDA graphs (torch.compile's reduce-overhead mode) keep
    their activations in a private pool that their replays never allocate from again, so after a reset the
    allocated peak misses them, while the reserved peak keeps them."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return int(torch.xpu.max_memory_reserved(device))
    return None


def reset_peak_memory(device: torch.device | str) -> None:
    """Restarts the peak counter where the platform allows it: CUDA / XPU, and the CPU's RSS peak on Linux, so that
    each setting of a benchmark sweep reports its own peak. For the CPU, the memory that glibc keeps after frees is
    first given back (``malloc_trim``), then writing 5 to ``/proc/self/clear_refs`` sets the peak to the current
    RSS. Elsewhere the RSS peak is the process's so far."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: freed memory may stay resident
            pass
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
        except OSError:  # not Linux, or not allowed: the peak stays the process's so far
            pass


def describe_hardware(device: torch.device | str, num_processes: int = 1) -> str:
    """E.g. "2 x NVIDIA H100 80GB HBM3" or "CPU (x86_64, 2 cores)"."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"CPU ({platform.machine() or 'unknown'}, {cores} cores)"
    else:
        name = device.type.upper()
    return f"{num_processes} x {name}" if num_processes > 1 else name
