"""Indexed randomness: random draws keyed by *what* they are for (seed, epoch, sample or batch index) instead of by
how many draws came before.

The model draws its frequency masks (or degradations) with torch's RNG on its device. Running each micro-batch's
forward under a seed derived from the run seed and the micro-batch's *global* index makes those draws independent of
the process that runs the micro-batch and of restarts: micro-batch ``g`` sees the same masks whether it runs on
process 1 of 2, or as the second accumulation step of a single process, or after a resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "global_micro_batch_index", "seeded_device_rng"]


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence hashing)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def global_micro_batch_index(
    optimizer_step: int, accumulation_index: int, accumulation_steps: int, process_index: int, num_processes: int
) -> int:
    """The position of a micro-batch in the run's global sequence of batches.

    Process ``p`` of ``P`` reads batches ``p, p + P, p + 2P, ...`` of each epoch; its ``m``-th micro-batch
    (``m = step * accumulation_steps + accumulation_index``) is therefore global batch ``m * P + p``.
    """
    if not 0 <= accumulation_index < accumulation_steps:
        raise ValueError(f"accumulation_index must be in [0, {accumulation_steps}), got {accumulation_index}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    micro = optimizer_step * accumulation_steps + accumulation_index
    return micro * num_processes + process_index


@contextlib.contextmanager
def seeded_device_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Within the block, torch's RNG on ``device`` (and the CPU RNG) starts from ``seed``; the previous states are
    restored afterwards, so nothing else in the program is affected."""
    device = torch.device(device)
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else 0
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        yield
