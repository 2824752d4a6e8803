"""An MFM encoder as the backbone of transformers' `UperNetForSemanticSegmentation` (the paper's ADE20K protocol,
which follows BEiT's: UperNet on a ViT with a 4-level feature pyramid, or on a CNN's 4 stages).

`upernet_from_mfm` builds a native transformers model, so the result saves, loads and runs without this package:

* BEiT / ViT encoders become a ``BeitBackbone`` with ``add_fpn=True``: the patch tokens of 4 blocks (by default
  1/3, 1/2, 2/3 and all of the depth: blocks 4, 6, 8, 12 of a ViT-B, as BEiT uses) are reshaped to maps and
  resampled to strides 4, 8, 16 and 32 (deconvolutions, identity, max-pool). A ``vit`` encoder is converted
  exactly: transformers' ViT and BEiT share their weight names, and the ViT's key bias can be dropped because adding
  a constant vector to every key shifts all of a query's attention logits by the same amount, which softmax ignores.
* ConvNeXt / ResNet encoders become ``ConvNextBackbone`` / ``ResNetBackbone`` with their 4 stages as outputs
  (ConvNeXt adds a fresh LayerNorm per output stage, as its segmentation models do).

The encoder weights come from the checkpoint's ``mfm.backbone.*`` (an MFM pre-training or fine-tuning checkpoint, or
a native encoder written by ``export_backbone``). When the segmentation crop differs from the pre-training size, the
ViT position embeddings are resized (bicubic on the patch grid, the CLS embedding kept).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    BeitConfig,
    ConvNextConfig,
    ConvNextV2Config,
    ResNetConfig,
    SegformerImageProcessor,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from ...configuration_mfm import MFMConfig
from ...modeling_mfm import MFMPreTrainedModel
from ..models.model_loading import load_encoder

__all__ = ["default_out_indices", "resize_position_embeddings", "segmentation_image_processor", "upernet_from_mfm"]

_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def segmentation_image_processor(
    crop_size: int, image_mean: list[float], image_std: list[float], reduce_labels: bool = True
) -> SegformerImageProcessor:
    """The image processor saved next to a trained UperNet (the one transformers' UperNet checkpoints use): bilinear
    resize to the crop size, scale to [0, 1], the encoder's normalisation, and ADE20K's label reduction."""
    return SegformerImageProcessor(
        do_resize=True,
        size={"height": crop_size, "width": crop_size},
        resample=2,  # PIL bilinear, as the evaluation resize
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_reduce_labels=reduce_labels,
    )


def default_out_indices(num_layers: int) -> list[int]:
    """The 4 blocks (1-based) whose outputs feed the pyramid: 1/3, 1/2, 2/3 and all of the depth."""
    if num_layers < 4:
        raise ValueError(f"a ViT backbone for UperNet needs >= 4 blocks for the default out_indices, got {num_layers}")
    return [max(1, round(num_layers * f)) for f in (1 / 3, 1 / 2, 2 / 3)] + [num_layers]


def resize_position_embeddings(embeddings: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + new_grid**2, D): the patch part resized bicubically, the CLS embedding kept."""
    cls, patches = embeddings[:, :1], embeddings[:, 1:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"position embeddings for {patches.shape[1]} patches are not a square grid")
    if old_grid == new_grid:
        return embeddings
    grid = patches.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(embeddings.dtype)
    return torch.cat([cls, patches], dim=1)


def _vit_backbone_config(
    config: MFMConfig, image_size: int, out_indices: list[int], drop_path_rate: float
) -> BeitConfig:
    source = config.backbone_config
    if source.model_type == "vit" and not getattr(source, "qkv_bias", True):
        raise ValueError("a ViT without q/v biases cannot be expressed as BEiT (which always has them)")
    return BeitConfig(
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        intermediate_size=source.intermediate_size,
        hidden_act=source.hidden_act,
        layer_norm_eps=source.layer_norm_eps,
        image_size=image_size,
        patch_size=source.patch_size,
        num_channels=source.num_channels,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        use_mask_token=False,
        layer_scale_init_value=getattr(source, "layer_scale_init_value", 0.0) if source.model_type == "beit" else 0.0,
        drop_path_rate=drop_path_rate,
        out_indices=out_indices,
        add_fpn=True,
        reshape_hidden_states=True,
    )


def _cnn_backbone_config(config: MFMConfig, drop_path_rate: float) -> Any:
    source = config.backbone_config.to_dict()
    for key in ("out_features", "out_indices", "stage_names", "_out_features", "_out_indices", "model_type",
                "transformers_version", "architectures"):
        source.pop(key, None)
    kind = config.backbone_config.model_type
    if kind == "resnet":
        return ResNetConfig(**source, out_features=_STAGES)
    source["drop_path_rate"] = drop_path_rate
    return (ConvNextConfig if kind == "convnext" else ConvNextV2Config)(**source, out_features=_STAGES)


def upernet_from_mfm(
    model_name_or_path: str | None = None,
    *,
    model: MFMPreTrainedModel | None = None,
    num_labels: int = 150,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
    out_indices: list[int] | None = None,
    hidden_size: int = 512,
    use_auxiliary_head: bool = True,
    auxiliary_loss_weight: float = 0.4,
    loss_ignore_index: int = 255,
    drop_path_rate: float = 0.1,
) -> UperNetForSemanticSegmentation:
    """A `UperNetForSemanticSegmentation` whose backbone carries the encoder of an MFM checkpoint.

    Args:
        model_name_or_path: MFM checkpoint or native encoder (folder or Hub id); or pass ``model``.
        model: an MFM model already in memory (its ``mfm.backbone`` / ``backbone`` weights are used).
        num_labels, id2label: the segmentation classes (ADE20K: 150).
        image_size: training crop size (ADE20K: 512); defaults to the encoder's. ViT position embeddings are resized.
        out_indices: ViT blocks (1-based) feeding the pyramid; default `default_out_indices`.
        hidden_size: UperNet channels (512 as BEiT / transformers' UperNet checkpoints).
        use_auxiliary_head, auxiliary_loss_weight: the FCN auxiliary head on the third level (weight 0.4).
        loss_ignore_index: label value ignored by the loss (255, as ADE20K with reduced labels).
        drop_path_rate: stochastic depth of ViT / ConvNeXt encoders (BEiT's ADE20K recipe: 0.1).
    """
    if (model_name_or_path is None) == (model is None):
        raise ValueError("give exactly one of model_name_or_path and model")
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if model is not None:
        encoder = model.mfm if hasattr(model, "mfm") else model
    else:
        encoder = load_encoder(model_name_or_path)
    config: MFMConfig = encoder.config
    state = {k: v.detach().clone() for k, v in encoder.backbone.state_dict().items()}
    image_size = image_size or config.image_size

    if config.is_vit:
        if image_size % config.encoder_stride:
            raise ValueError(f"image_size ({image_size}) must be divisible by the patch size ({config.encoder_stride})")
        num_layers = config.backbone_config.num_hidden_layers
        out_indices = list(out_indices) if out_indices is not None else default_out_indices(num_layers)
        if len(out_indices) != 4 or not all(1 <= i <= num_layers for i in out_indices):
            raise ValueError(f"out_indices must be 4 block numbers in [1, {num_layers}], got {out_indices}")
        backbone_config = _vit_backbone_config(config, image_size, out_indices, drop_path_rate)
        # the backbone reads block outputs, not the final norm; the ViT key bias is dropped (see the module docstring)
        state = {k: v for k, v in state.items()
                 if not (k.endswith("attention.k_proj.bias") or k.startswith("layernorm."))}
        key = "embeddings.position_embeddings"
        state[key] = resize_position_embeddings(state[key], image_size // config.encoder_stride)
    else:
        if out_indices is not None:
            raise ValueError("out_indices applies to ViT encoders; CNN encoders use their 4 stages")
        backbone_config = _cnn_backbone_config(config, drop_path_rate)
        state = {k: v for k, v in state.items() if not k.startswith(("layernorm.", "pooler."))}

    upernet_config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=hidden_size,
        use_auxiliary_head=use_auxiliary_head,
        auxiliary_loss_weight=auxiliary_loss_weight,
        loss_ignore_index=loss_ignore_index,
        num_labels=num_labels,
        id2label=id2label or {i: f"class_{i}" for i in range(num_labels)},
    )
    segmenter = UperNetForSemanticSegmentation(upernet_config)
    target = segmenter.backbone.beit if config.is_vit else segmenter.backbone
    missing, unexpected = target.load_state_dict(state, strict=False)
    allowed_missing = ("hidden_states_norms.",) if not config.is_vit else ()
    missing = [k for k in missing if not k.startswith(allowed_missing)]
    if missing or unexpected:
        raise ValueError(f"encoder weights do not fit the segmentation backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return segmenter
