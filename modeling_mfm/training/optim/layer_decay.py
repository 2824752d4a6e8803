"""Layer-wise learning-rate decay for fine-tuning (BEiT / MAE / the official MFM recipe).

Parameters are given a *layer id*: 0 for the input embeddings (patch embedding, CLS token, position embeddings),
``i + 1`` for transformer block ``i``, and ``L + 1`` for everything after the last block (the final norm, the
pooling LayerNorm ``fc_norm`` and the classifier). A parameter with layer id ``j`` trains with
``lr * layer_decay ** (L + 1 - j)``: the head at the full rate, block ``i`` at ``decay ** (L - i)``, the patch
embedding at ``decay ** (L + 1)``. Lower layers, which hold the most general pre-trained features, therefore move
least. CNN encoders (ResNet, ConvNeXt) are treated the same way with *stages* in place of blocks (stem = 0, stage
``k`` = ``k + 1``); with ``layer_decay=1`` (the ResNet recipe) every group has scale 1.

Weight decay follows `optim.uses_weight_decay`: none on biases, 1-D parameters (norms, layer scales), the position
embeddings and the CLS token.

The groups carry ``lr_scale``, which `schedules.LearningRateSchedule` multiplies into the scheduled lr at every step
(``lr`` starts at ``base_lr * lr_scale``), so the per-layer ratios hold throughout warmup and decay.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .optimizer import uses_weight_decay

__all__ = ["layer_decay_adamw", "layer_decay_parameter_groups", "layer_id_for_parameter", "num_decay_layers"]

# names relative to the backbone: transformer blocks, then CNN stages
_BLOCK_RE = re.compile(r"(?:layers|encoder\.layer|encoder\.layers)\.(\d+)\.")
_STAGE_RE = re.compile(r"encoder\.stages\.(\d+)\.")


def num_decay_layers(config) -> int:
    """L: the number of transformer blocks (BEiT / ViT) or stages (ResNet / ConvNeXt) of an `MFMConfig`."""
    backbone = config.backbone_config
    if config.is_vit:
        return int(backbone.num_hidden_layers)
    return len(backbone.depths)


def layer_id_for_parameter(name: str, num_layers: int) -> int:
    """Layer id (0 .. num_layers + 1) of a parameter from its name.

    Only names inside the encoder (containing ``backbone.``) get ids below ``num_layers + 1``; heads, ``fc_norm``
    and anything else after the encoder get ``num_layers + 1``. Transformer names: ``backbone.embeddings.*`` -> 0,
    ``backbone.layers.N.*`` (BEiT / ViT in transformers 5) or ``backbone.encoder.layer.N.*`` (older ViT) -> N + 1.
    CNN names: ``backbone.embedder.*`` / ``backbone.embeddings.*`` (stem) -> 0, ``backbone.encoder.stages.K.*`` ->
    K + 1. ``backbone.beit.*`` (the ``BeitBackbone`` of a UperNet segmenter) is read like ``backbone.*``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    head = num_layers + 1
    position = name.find("backbone.")
    if position < 0:
        return head
    inner = name[position + len("backbone."):]
    inner = inner.removeprefix("beit.")  # transformers' BeitBackbone (UperNet segmentation) wraps a BeitModel
    if inner.startswith(("embeddings.", "embedder.")):
        return 0
    match = _BLOCK_RE.match(inner) or _STAGE_RE.match(inner)
    if match:
        index = int(match.group(1))
        if index >= num_layers:
            raise ValueError(f"parameter {name!r} is in layer {index}, but the encoder has {num_layers} layers")
        return index + 1
    return head


def layer_decay_parameter_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    lr: float | None = None,
    num_layers: int | None = None,
) -> list[dict]:
    """AdamW parameter groups with layer-wise lr scales and weight decay only where it belongs.

    Args:
        model: an `MFMForImageClassification` (or any module whose encoder parameters are under ``backbone.``).
        weight_decay: decay of the weight matrices (0.05 in the official recipe).
        layer_decay: the per-layer factor in (0, 1] (0.8 for ViT-B in the official recipe; 1.0 = no decay).
        lr: peak learning rate; when given each group gets ``"lr": lr * lr_scale``.
        num_layers: L; read from ``model.config`` (an `MFMConfig`) when omitted.

    Returns:
        groups (layer id ascending, decayed before not decayed) with keys ``params``, ``names``,
        ``weight_decay``, ``lr_scale``, ``layer_id``, ``group_name`` (and ``lr``).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if num_layers is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "backbone_config"):
            raise ValueError("num_layers is needed for a model without an MFMConfig")
        num_layers = num_decay_layers(config)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = layer_id_for_parameter(name, num_layers)
        decay = uses_weight_decay(name, parameter)
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer)
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer,
                "group_name": f"layer_{layer}_{'decay' if decay else 'no_decay'}",
            }
            if lr is not None:
                groups[key]["lr"] = lr * scale
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def layer_decay_adamw(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, num_layers: int | None = None,
    **adamw_options: Any,
) -> torch.optim.AdamW:
    """AdamW over `layer_decay_parameter_groups` at peak ``lr`` (``adamw_options``: betas, eps, fused...)."""
    groups = layer_decay_parameter_groups(model, weight_decay, layer_decay, lr=lr, num_layers=num_layers)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=lr, **adamw_options)
