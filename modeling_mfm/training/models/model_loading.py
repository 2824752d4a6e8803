"""Building the model to fine-tune or evaluate from what a user has: an MFM checkpoint, a native encoder, or a preset.

Three sources are accepted (``model_name_or_path`` is a local folder or a Hub id):

* an MFM checkpoint (``config.json`` with ``model_type: mfm``), e.g. written by ``MFMForPreTraining.save_pretrained``
  or by a previous fine-tuning: loaded with ``MFMForImageClassification.from_pretrained``; the pre-training decoder
  is dropped and a new head is created when the label set differs;
* a native transformers encoder (``model_type`` beit / vit / resnet / convnext / convnextv2), e.g. written by
  ``MFMPreTrainedModel.export_backbone``: an `MFMConfig` is built around its config (image size and normalisation
  from its ``preprocessor_config.json`` when present) and its weights are loaded into ``model.mfm.backbone``;
* a preset name (``preset="mfm-vit-tiny"`` plus overrides): a randomly initialised model (training from scratch).

The head and the features are the model's own (`MFMModel`): the same through this loader, the Auto classes,
pipelines and ``Trainer``. For BEiT encoders the classifier reads ``fc_norm(mean of patch tokens)`` with the
pre-trained final LayerNorm dropped, as the official fine-tuning does; transformers' ``ViTModel`` always applies its
final LayerNorm, so for ``vit`` encoders it stays (mean pooling + ``fc_norm`` on top of it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from ...configuration_mfm import PRESETS, SUPPORTED_BACKBONES, MFMConfig
from ...modeling_mfm import MFMForImageClassification, MFMModel
from .model_factory import build_config

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


def _apply_backbone_options(config: MFMConfig, drop_path_rate: float | None) -> None:
    backbone = config.backbone_config
    if drop_path_rate is not None:
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if hasattr(backbone, "drop_path_rate"):
            backbone.drop_path_rate = drop_path_rate
        elif drop_path_rate > 0:
            logger.warning("the %s encoder has no stochastic depth; drop_path_rate ignored", backbone.model_type)


def build_mfm_config(
    model_name_or_path: str | None = None,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[MFMConfig, str]:
    """The `MFMConfig` of a source and its kind: ``"mfm"``, ``"native"`` or ``"preset"``. A preset and its
    overrides go through pre-training's builder (`model_factory.build_config`); checkpoints and native encoders are
    read here, with the Hub options, and keep their architecture."""
    if (model_name_or_path is None) == (preset is None):
        raise ValueError("give exactly one of model_name_or_path (a checkpoint) and preset (random initialisation)")
    if preset is not None:
        if preset not in PRESETS:  # "" too, which build_config would take for no source
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        overrides = dict(config_overrides or {})
        backbone_overrides = overrides.pop("backbone_overrides", None)
        return build_config(preset=preset, overrides=overrides, backbone_overrides=backbone_overrides), "preset"
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
        crop = (getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
        side = crop.get("height") or size.get("height") or size.get("shortest_edge")
        if side and config.model_type not in ("beit", "vit"):
            kwargs["image_size"] = int(side)
    return MFMConfig(**kwargs), "native"


def _load_native_encoder(encoder: MFMModel, model_name_or_path: str, config: MFMConfig, hub: dict[str, Any]) -> None:
    """The weights of a native encoder (e.g. written by ``export_backbone``) into ``encoder``: its backbone, and for
    a pooling encoder the native mean-pooling LayerNorm (BEiT's ``pooler.layernorm``) as ``fc_norm``. A final
    LayerNorm the MFM pooling leaves out is not loaded."""
    extra = {"add_pooling_layer": False} if config.backbone_type == "vit" else {}
    native = AutoModel.from_pretrained(model_name_or_path, config=config.backbone_config, **extra, **hub).state_dict()
    wanted = encoder.backbone.state_dict()
    missing = [name for name in wanted if name not in native]
    if missing:
        raise ValueError(f"the encoder in {model_name_or_path!r} does not fit its config: missing {missing[:5]}")
    encoder.backbone.load_state_dict({name: native[name] for name in wanted})
    if encoder.fc_norm is not None and "pooler.layernorm.weight" in native:
        encoder.fc_norm.load_state_dict({"weight": native["pooler.layernorm.weight"],
                                         "bias": native["pooler.layernorm.bias"]})


def load_classifier(
    model_name_or_path: str | None = None,
    preset: str | None = None,
    num_labels: int = 1000,
    id2label: dict[int, str] | None = None,
    config_overrides: dict[str, Any] | None = None,
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
    _apply_backbone_options(config, drop_path_rate)
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
        _load_native_encoder(model.mfm, model_name_or_path, config, hub)
    return model


def load_encoder(
    model_name_or_path: str,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> MFMModel:
    """The encoder (`MFMModel`, what ``AutoModel`` builds: its ``pooler_output`` is the classifier's input) of an MFM
    checkpoint or native encoder, for frozen-feature evaluation."""
    if model_name_or_path in PRESETS and not os.path.isdir(model_name_or_path):
        raise ValueError(f"{model_name_or_path!r} is a preset without weights; give a checkpoint folder or Hub id")
    config, kind = build_mfm_config(model_name_or_path, None, None, cache_dir, revision, token)
    hub = _hub_kwargs(cache_dir, revision, token)
    if kind == "mfm":
        return MFMModel.from_pretrained(model_name_or_path, config=config, **hub)
    model = MFMModel(config)
    _load_native_encoder(model, model_name_or_path, config, hub)
    return model
