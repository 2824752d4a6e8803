"""The learning-rate schedule of MFM pre-training: linear warmup, then cosine decay to a minimum, per optimizer step.

It follows the official recipe (timm's ``CosineLRScheduler`` with ``warmup_t`` and without ``warmup_prefix``):
during warmup the lr rises linearly from ``warmup_lr`` to the peak; afterwards it is
``min_lr + (peak - min_lr) * (1 + cos(pi * step / total_steps)) / 2``, the cosine being measured from step 0 (so at
the end of a warmup over 1/15 of training the lr is 0.989 of the peak, as in the official runs). The schedule is a
``torch.optim.lr_scheduler.LambdaLR``: Accelerate saves and restores it with the rest of the training state.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineSchedule", "build_warmup_cosine_scheduler", "warmup_cosine_lr"]


def warmup_cosine_lr(
    step: int, peak_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))


class WarmupCosineSchedule:
    """The multiplicative factor of `LambdaLR` (lr / peak lr); a class rather than a closure so that it pickles and
    its settings appear in the scheduler's ``state_dict``."""

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float) -> None:
        if peak_lr <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {peak_lr}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not (0 <= warmup_lr <= peak_lr and 0 <= min_lr <= peak_lr):
            raise ValueError(
                f"warmup_lr ({warmup_lr}) and min_lr ({min_lr}) must be in [0, peak lr = {peak_lr}]"
            )
        self.peak_lr = peak_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr

    def __call__(self, step: int) -> float:
        lr = warmup_cosine_lr(step, self.peak_lr, self.total_steps, self.warmup_steps, self.warmup_lr, self.min_lr)
        return lr / self.peak_lr


def build_warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
) -> LambdaLR:
    """A `LambdaLR` over ``optimizer`` whose groups start at the peak lr. Call ``step()`` once per optimizer step."""
    peak_lrs = {group["lr"] for group in optimizer.param_groups}
    if len(peak_lrs) != 1:
        raise ValueError(f"all parameter groups must share one peak lr, got {sorted(peak_lrs)}")
    schedule = WarmupCosineSchedule(peak_lrs.pop(), total_steps, warmup_steps, warmup_lr, min_lr)
    return LambdaLR(optimizer, lr_lambda=schedule)
