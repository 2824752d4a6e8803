"""Resource figures for logs, benchmarks and model cards: peak memory and a short description of the hardware."""

from __future__ import annotations

import os
import platform
import resource
import sys

import torch

__all__ = ["describe_hardware", "peak_memory_bytes", "reset_peak_memory"]


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


def reset_peak_memory(device: torch.device | str) -> None:
    """Restarts the peak counter where the platform allows it (CUDA / XPU; the RSS peak cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.reset_peak_memory_stats(device)


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
