"""AdamW for MFM pre-training, as the official recipe: weight decay on weight matrices only, and linear lr scaling;
and ``--max_grad_norm``, the gradient clipping flag every training script shares (0 = no clipping)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "FUSED_ADAMW_DEVICES", "NO_DECAY_NAMES", "build_optimizer", "clip_to_max_grad_norm", "describe_clipping",
    "parameter_groups", "scale_learning_rate", "uses_weight_decay",
]

# Parameters that are never decayed whatever their shape: the learned position embeddings, the CLS token (and, for
# BEiT variants that have them, the mask token and relative position bias tables).
NO_DECAY_NAMES = frozenset(
    {"cls_token", "position_embeddings", "mask_token", "relative_position_bias_table"}
)


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """False for biases, every 1-D parameter (norm scales and shifts) and the names in `NO_DECAY_NAMES`."""
    if parameter.ndim <= 1 or name.endswith("bias"):
        return False
    return name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, ``decay`` (``weight_decay``) and ``no_decay`` (0.0), over the trainable parameters; each
    group also lists its parameter ``names`` (ignored by the optimizer, useful for logs and tests)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if uses_weight_decay(name, parameter) else no_decay).append((name, parameter))
    groups = []
    for group_name, members, group_decay in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if members:
            groups.append(
                {
                    "params": [p for _, p in members],
                    "weight_decay": group_decay,
                    "group_name": group_name,
                    "names": [n for n, _ in members],
                }
            )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def scale_learning_rate(base_lr: float, total_batch_size: int, reference_batch_size: int = 512) -> float:
    """The linear scaling rule of the official recipe: ``base_lr * total_batch_size / 512``, where
    ``total_batch_size = per-device batch * processes * accumulation steps``."""
    if base_lr < 0:
        raise ValueError(f"base learning rate must be >= 0, got {base_lr}")
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be positive, got {total_batch_size}")
    return base_lr * total_batch_size / reference_batch_size


# devices with a fused AdamW kernel (torch >= 2.4 for the CPU)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: Iterable[float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`. ``fused=None`` picks the fused kernel when the parameters are on CUDA or the
    CPU: one pass over all parameters per step instead of one per tensor, faster on both."""
    groups = parameter_groups(model, weight_decay)
    if fused is None:
        fused = all(p.device.type in FUSED_ADAMW_DEVICES for group in groups for p in group["params"])
    betas = tuple(betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def clip_to_max_grad_norm(
    accelerator: Any, parameters: Iterable[torch.Tensor], max_grad_norm: float
) -> torch.Tensor | None:
    """``--max_grad_norm`` in fine-tuning and segmentation: the gradients' total norm clipped to it through Accelerate
    (which unscales fp16 gradients first); 0 means no clipping and computes nothing. (Pre-training always computes
    the norm, which it logs.)"""
    if max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {max_grad_norm}")
    if max_grad_norm == 0:
        return None
    return accelerator.clip_grad_norm_(parameters, max_grad_norm)


def describe_clipping(max_grad_norm: float) -> str:
    """A model card's words for ``--max_grad_norm``."""
    return f"max norm {max_grad_norm:g}" if max_grad_norm > 0 else "none"
