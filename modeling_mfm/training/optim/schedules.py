"""The learning-rate schedule of every training loop: linear warmup, then cosine or linear decay, per optimizer step.

The learning rate is a pure function of the optimizer step, so a checkpoint needs to store only the step (in our
own ``trainer_state.json``) and no scheduler object is ever pickled or restored: `LearningRateSchedule.apply` sets
each parameter group's lr for the step about to run, before the run starts (or resumes) and after every optimizer
step.

The shape follows the official recipes: during warmup the lr rises linearly from ``warmup_lr`` to the peak;
afterwards the decay is measured from step 0, as timm's ``CosineLRScheduler`` with ``warmup_t`` and without
``warmup_prefix`` (MFM pre-training and fine-tuning) and as mmsegmentation's poly schedule with power 1 (BEiT's
ADE20K recipe):

* cosine: ``min_lr + (peak - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` (at the end of a warmup over 1/15 of
  training the lr is 0.989 of the peak, as in the official runs);
* linear: ``min_lr + (peak - min_lr) * (1 - step / total_steps)``.

Layer-wise lr decay multiplies a group's lr by the group's ``lr_scale`` (`layer_decay`); groups without one train at
the scheduled lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["DECAYS", "LearningRateSchedule"]

DECAYS = ("cosine", "linear")


@dataclass(frozen=True)
class LearningRateSchedule:
    """Warmup from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps``, then ``decay`` to ``min_lr`` at
    ``total_steps`` (and ``min_lr`` after it)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    decay: Literal["cosine", "linear"] = "cosine"

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {self.peak_lr}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not (0 <= self.warmup_lr <= self.peak_lr and 0 <= self.min_lr <= self.peak_lr):
            raise ValueError(
                f"warmup_lr ({self.warmup_lr}) and min_lr ({self.min_lr}) must be in [0, peak lr = {self.peak_lr}]"
            )
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), before any group's ``lr_scale``."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = step / self.total_steps
        remaining = (1.0 + math.cos(math.pi * progress)) / 2 if self.decay == "cosine" else 1.0 - progress
        return self.min_lr + (self.peak_lr - self.min_lr) * remaining

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets every parameter group's lr for optimizer step ``step`` (``lr_at(step) * group["lr_scale"]``, scale 1
        when absent) and returns ``lr_at(step)``."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
