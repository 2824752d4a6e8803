"""The model to pre-train, from a preset name, a config JSON or a saved model, with MFMConfig fields overridden."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import typing
from collections.abc import Iterator
from typing import Any

import torch

from ...configuration_mfm import MFMConfig, merge_overrides
from ...fast_paths import apply_fast_paths
from ...modeling_mfm import MFMForPreTraining

__all__ = [
    "ARCHITECTURE_FIELDS",
    "build_config",
    "build_model",
    "config_fields",
    "cudnn_autotuning",
    "enable_activation_checkpointing",
    "override_config",
    "preferred_memory_format",
]

logger = logging.getLogger(__name__)

# Fields that change parameter shapes: they cannot be overridden when continuing from saved weights.
ARCHITECTURE_FIELDS = frozenset(
    {"image_size", "num_channels", "decoder_depth", "decoder_hidden_size", "decoder_num_attention_heads"}
)


def config_fields() -> dict[str, Any]:
    """MFMConfig's own fields (name -> type), read from its ``__init__`` signature; ``backbone_config`` excluded."""
    hints = typing.get_type_hints(MFMConfig.__init__)
    names = inspect.signature(MFMConfig.__init__).parameters
    return {name: hints[name] for name in names if name not in ("self", "kwargs", "backbone_config")}


def override_config(
    config: MFMConfig, overrides: dict[str, Any], backbone_overrides: dict[str, Any] | None = None
) -> MFMConfig:
    """A new, validated MFMConfig with ``overrides`` applied by the presets' rule (`merge_overrides`: ``image_size``
    reaches the ViT backbone too)."""
    unknown = sorted(set(overrides) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown MFMConfig fields {unknown}")
    values = config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map", "architectures"):
        values.pop(key, None)
    return MFMConfig(**merge_overrides(values, overrides, backbone_overrides))


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    model_name_or_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    backbone_overrides: dict[str, Any] | None = None,
) -> MFMConfig:
    """The configuration from exactly one of a preset name, an MFMConfig JSON file or a saved model, with MFMConfig
    fields (and backbone fields) overridden: the one builder of pre-training and of presets for fine-tuning
    (`model_loading.build_mfm_config`)."""
    overrides = dict(overrides or {})
    sources = [name for name, value in (("preset", preset), ("config_file", config_file),
                                        ("model_name_or_path", model_name_or_path)) if value]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of --preset, --config_file, --model_name_or_path (got {sources or 'none'})")
    if preset:
        return MFMConfig.from_preset(preset, **overrides, backbone_overrides=backbone_overrides or {})
    if config_file:
        if not os.path.isfile(config_file):
            raise ValueError(f"config_file {config_file!r} does not exist")
        return override_config(MFMConfig.from_json_file(config_file), overrides, backbone_overrides)
    changed = sorted((set(overrides) & ARCHITECTURE_FIELDS) | ({"backbone_overrides"} if backbone_overrides else set()))
    if changed:
        raise ValueError(
            f"{changed} change parameter shapes and cannot be overridden when continuing from {model_name_or_path!r}"
        )
    return override_config(MFMConfig.from_pretrained(model_name_or_path), overrides)


def build_model(
    config: MFMConfig,
    model_name_or_path: str | None = None,
    fast_paths: bool = True,
    bf16_residual_stream: bool = False,
) -> MFMForPreTraining:
    """Random initialisation from ``config``, or the weights of ``model_name_or_path`` under ``config``; with
    ``fast_paths`` (the scripts' default) the speed-ups of `modeling_mfm.fast_paths` are applied, and with
    ``bf16_residual_stream`` (``--bf16_residual_stream``, ViTs) the opt-in one too, so that one handle
    (`modeling_mfm.fast_paths.remove_fast_paths`) undoes them all."""
    if model_name_or_path:
        model = MFMForPreTraining.from_pretrained(model_name_or_path, config=config)
    else:
        model = MFMForPreTraining(config)
    if fast_paths or bf16_residual_stream:
        apply_fast_paths(model, mask_free_sdpa=fast_paths, patch_gemm=fast_paths, decoder_gemm=fast_paths,
                         fused_qkv=fast_paths, unit_layer_scale=fast_paths, bf16_residual_stream=bf16_residual_stream)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward: transformers' ``activation_checkpointing_enable`` where it exists,
    else its older name ``gradient_checkpointing_enable`` (deprecated in transformers 5.24)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def preferred_memory_format(config: MFMConfig, device: torch.device | str) -> torch.memory_format:
    """channels_last for CNN backbones on CUDA (cuDNN's fast convolution layout; a convolution whose weight is
    channels_last also runs its input and output in that layout), and for ResNets on CPUs too, where oneDNN's
    convolutions are faster in it (docs/performance.md). ConvNeXt on a CPU (slower with it), ViTs and other devices
    stay contiguous."""
    device_type = torch.device(device).type
    if config.is_vit:
        return torch.contiguous_format
    if device_type == "cuda" or (device_type == "cpu" and config.backbone_config.model_type == "resnet"):
        return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """Within the block, cuDNN times its convolution algorithms for each new input shape and keeps the fastest
    (``torch.backends.cudnn.benchmark``) when ``device`` is CUDA; the previous setting comes back afterwards.
    Pre-training feeds one shape for a whole run, so the timing is paid once; the official code (after SimMIM and
    MAE) turns it on. Elsewhere the block changes nothing."""
    previous = torch.backends.cudnn.benchmark
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
