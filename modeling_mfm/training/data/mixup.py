"""Mixup / CutMix with label smoothing, batched on the device: the official fine-tuning recipe's soft targets.

Per batch (timm's "batch" mode, which the official recipe uses): with probability ``prob`` the batch is mixed with
its reverse (``images.flip(0)``); CutMix is chosen with probability ``switch_prob`` (when both alphas are > 0), else
Mixup. ``lam ~ Beta(alpha, alpha)``; CutMix pastes a box of area fraction ``1 - lam`` and then sets ``lam`` to the
pasted area actually kept inside the image. Targets are smoothed one-hot vectors (``1 - smoothing + smoothing / C``
on the label, ``smoothing / C`` elsewhere) mixed with the same ``lam``: every target row sums to 1.

Why not ``torchvision.transforms.v2.MixUp`` / ``CutMix``: they build hard one-hot targets from integer labels and
have no label smoothing, so the recipe's ``label_smoothing=0.1`` could not be applied to the mixed targets.

The random decisions (apply?, which one?, lam, box centre) are a handful of scalars per batch, drawn on the host
with numpy (an explicit ``numpy.random.Generator``, or numpy's global state, which ``accelerate.utils.set_seed``
seeds); the images and targets are mixed where they live, on the device. `MixupCutmix.mix` takes the decisions
explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MixDecision", "MixupCutmix", "smooth_one_hot", "soft_target_cross_entropy"]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices -> (B, C) float targets: ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C``
    elsewhere (rows sum to 1)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c * log_softmax(logits)_c`` (in float32)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@dataclass
class MixDecision:
    """One batch's random choices. ``box`` = (top, bottom, left, right) of the pasted region for CutMix."""

    lam: float = 1.0
    cutmix: bool = False
    box: tuple[int, int, int, int] | None = None


class MixupCutmix:
    """Callable ``(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes))``.

    Args:
        num_classes: number of classes C.
        mixup_alpha: Beta parameter of Mixup (0.8 in the recipe; 0 disables Mixup).
        cutmix_alpha: Beta parameter of CutMix (1.0 in the recipe; 0 disables CutMix).
        switch_prob: probability of CutMix rather than Mixup when both are enabled (0.5).
        prob: probability of mixing a batch at all (1.0).
        label_smoothing: smoothing of the one-hot targets (0.1).
        rng: ``numpy.random.Generator`` for the decisions (default: numpy's global random state).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        label_smoothing: float = 0.1,
        rng: np.random.Generator | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        for name, value in (("switch_prob", switch_prob), ("prob", prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = switch_prob
        self.prob = prob
        self.label_smoothing = label_smoothing
        self.rng = rng

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _uniform(self) -> float:
        return float(self.rng.random() if self.rng is not None else np.random.random())

    def _beta(self, alpha: float) -> float:
        return float(self.rng.beta(alpha, alpha) if self.rng is not None else np.random.beta(alpha, alpha))

    def _integer(self, high: int) -> int:
        return int(self.rng.integers(0, high) if self.rng is not None else np.random.randint(0, high))

    def sample(self, height: int, width: int) -> MixDecision:
        """Draws one batch's decision for images of ``height x width``."""
        if not self.enabled or self._uniform() >= self.prob:
            return MixDecision()
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self._uniform() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        if not use_cutmix:
            return MixDecision(lam=self._beta(self.mixup_alpha))
        lam = self._beta(self.cutmix_alpha)
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = self._integer(height), self._integer(width)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return MixDecision(lam=kept, cutmix=True, box=(top, bottom, left, right))

    def mix(
        self, images: torch.Tensor, labels: torch.Tensor, decision: MixDecision
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Applies a decision: image ``i`` is combined with image ``B - 1 - i``; targets mixed with ``lam``."""
        if images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"images must be (B, C, H, W) and labels (B,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if not 0.0 <= decision.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {decision.lam}")
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if decision.lam == 1.0:
            return images, targets
        flipped = images.flip(0)
        if decision.cutmix:
            if decision.box is None:
                raise ValueError("a CutMix decision needs its box")
            top, bottom, left, right = decision.box
            images = images.clone()
            images[:, :, top:bottom, left:right] = flipped[:, :, top:bottom, left:right]
        else:
            images = images * decision.lam + flipped * (1.0 - decision.lam)
        targets = targets * decision.lam + targets.flip(0) * (1.0 - decision.lam)
        return images, targets

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(images, labels, self.sample(images.shape[-2], images.shape[-1]))
