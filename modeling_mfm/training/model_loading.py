"""Building the model to fine-tune or evaluate from what a user has: an MFM checkpoint, a native encoder, or a preset.

Three sources are accepted (``model_name_or_path`` is a local folder or a Hub id):

* an MFM checkpoint (``config.json`` with ``model_type: mfm``), e.g. written by ``MFMForPreTraining.save_pretrained``
  or by a previous fine-tuning: loaded with ``MFMForImageClassification.from_pretrained``; the pre-training decoder
  is dropped and a new head is created when the label set differs;
* a native transformers encoder (``model_type`` beit / vit / resnet / convnext / convnextv2), e.g. written by
  ``MFMPreTrainedModel.export_backbone``: an `MFMConfig` is built around its config (image size and normalisation
  from its ``preprocessor_config.json`` when present) and its weights are loaded into ``model.mfm.backbone``;
* a preset name (``preset="mfm-vit-tiny"`` plus overrides): a randomly initialised model (training from scratch).

Fine-tuning head (``mean_pooling=True``, the official recipe): for BEiT encoders ``backbone_config.use_mean_pooling``
is set, which makes transformers' ``BeitModel.layernorm`` an identity; the classifier then reads
``fc_norm(mean of patch tokens)`` as the official ``USE_MEAN_POOLING: True`` model does, and the pre-trained final
LayerNorm is dropped. transformers' ``ViTModel`` always applies its final LayerNorm, so for ``vit`` encoders it stays
(mean pooling + ``fc_norm`` on top of it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from ..configuration_mfm import PRESETS, SUPPORTED_BACKBONES, MFMConfig
from ..modeling_mfm import MFMForImageClassification, MFMModel

logger = logging.getLogger(__name__)

__all__ = ["build_mfm_config", "load_classifier", "load_encoder"]


def _hub_kwargs(cache_dir: str | None, revision: str | None, token: str | bool | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    return kwargs


def _apply_backbone_options(config: MFMConfig, mean_pooling: bool, drop_path_rate: float | None) -> None:
    backbone = config.backbone_config
    if drop_path_rate is not None:
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if hasattr(backbone, "drop_path_rate"):
            backbone.drop_path_rate = drop_path_rate
        elif drop_path_rate > 0:
            logger.warning("the %s encoder has no stochastic depth; drop_path_rate ignored", backbone.model_type)
    if backbone.model_type == "beit":
        backbone.use_mean_pooling = bool(mean_pooling)


def build_mfm_config(
    model_name_or_path: str | None = None,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[MFMConfig, str]:
    """The `MFMConfig` of a source and its kind: ``"mfm"``, ``"native"`` or ``"preset"``."""
    if (model_name_or_path is None) == (preset is None):
        raise ValueError("give exactly one of model_name_or_path (a checkpoint) and preset (random initialisation)")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        return MFMConfig.from_preset(preset, **(config_overrides or {})), "preset"
    if config_overrides:
        raise ValueError("config_overrides apply to presets only; a checkpoint keeps its architecture")
    hub = _hub_kwargs(cache_dir, revision, token)
    config = AutoConfig.from_pretrained(model_name_or_path, **hub)
    if config.model_type == "mfm":
        return MFMConfig.from_pretrained(model_name_or_path, **hub), "mfm"
    if config.model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"{model_name_or_path!r} holds a {config.model_type!r} model; expected an MFM checkpoint or a "
            f"native encoder of type {', '.join(SUPPORTED_BACKBONES)}"
        )
    kwargs: dict[str, Any] = {"backbone_config": config}
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path, **hub)
    except (OSError, ValueError):
        processor = None
    if processor is not None:
        kwargs["image_mean"] = list(processor.image_mean)
        kwargs["image_std"] = list(processor.image_std)
        size = getattr(processor, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge")
        if side and config.model_type not in ("beit", "vit"):
            kwargs["image_size"] = int(side)
    return MFMConfig(**kwargs), "native"


def _load_native_backbone(target: Any, model_name_or_path: str, config: MFMConfig, hub: dict[str, Any]) -> None:
    extra = {"add_pooling_layer": False} if config.is_vit else {}
    native = AutoModel.from_pretrained(model_name_or_path, config=config.backbone_config, **extra, **hub)
    missing, unexpected = target.load_state_dict(native.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the encoder in {model_name_or_path!r} does not fit its config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )


def load_classifier(
    model_name_or_path: str | None = None,
    preset: str | None = None,
    num_labels: int = 1000,
    id2label: dict[int, str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    mean_pooling: bool = True,
    drop_path_rate: float | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> MFMForImageClassification:
    """An `MFMForImageClassification` with ``num_labels`` classes from a checkpoint, native encoder or preset
    (see the module docstring)."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    config, kind = build_mfm_config(model_name_or_path, preset, config_overrides, cache_dir, revision, token)
    _apply_backbone_options(config, mean_pooling, drop_path_rate)
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries, num_labels is {num_labels}")
    config.num_labels = num_labels
    config.id2label = {int(k): v for k, v in id2label.items()}
    config.label2id = {v: int(k) for k, v in id2label.items()}
    hub = _hub_kwargs(cache_dir, revision, token)
    if kind == "mfm":
        return MFMForImageClassification.from_pretrained(
            model_name_or_path, config=config, ignore_mismatched_sizes=True, **hub
        )
    model = MFMForImageClassification(config)
    if kind == "native":
        _load_native_backbone(model.mfm.backbone, model_name_or_path, config, hub)
    return model


def load_encoder(
    model_name_or_path: str,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> MFMModel:
    """The encoder (`MFMModel` without the fine-tuning pooling layer; backbone as pre-trained, final norm kept) of
    an MFM checkpoint or native encoder, for frozen-feature evaluation."""
    if model_name_or_path in PRESETS and not os.path.isdir(model_name_or_path):
        raise ValueError(f"{model_name_or_path!r} is a preset without weights; give a checkpoint folder or Hub id")
    config, kind = build_mfm_config(model_name_or_path, None, None, cache_dir, revision, token)
    hub = _hub_kwargs(cache_dir, revision, token)
    if kind == "mfm":
        return MFMModel.from_pretrained(model_name_or_path, config=config, add_pooling_layer=False, **hub)
    model = MFMModel(config, add_pooling_layer=False)
    _load_native_backbone(model.backbone, model_name_or_path, config, hub)
    return model
