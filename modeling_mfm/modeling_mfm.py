"""MFM models: an encoder from transformers (BEiT / ViT / ResNet / ConvNeXt), the MFM decoder and the frequency loss.

Masked Frequency Modeling (Xie et al., "Masked Frequency Modeling for Self-Supervised Visual Pre-Training",
ICLR 2023, arXiv 2206.07706). This file, the config, ``frequency.py`` and ``corruptions.py`` are what
``save_pretrained`` ships as Hub remote code: they import only each other and transformers' public API (top-level
names, ``transformers.modeling_outputs``, ``transformers.utils.ModelOutput``, ``transformers.initialization``), so
that published checkpoints keep loading across transformers releases. The speed-ups the training scripts use live
in ``modeling_mfm.fast_paths`` and are applied to a built model, never here.

forward of MFMForPreTraining reads as named steps: un-normalise -> corrupt -> normalise -> encode -> decode -> loss.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_mfm import PRESETS, MFMConfig
from .corruptions import degrade
from .frequency import FrequencyLoss, filter_frequencies, low_pass_mask, masked_frequency_loss, sample_frequency_masks

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CROP_PCT",
    "MFMForImageClassification",
    "MFMForPreTraining",
    "MFMForPreTrainingOutput",
    "MFMModel",
    "MFMModelOutput",
    "MFMPreTrainedModel",
    "build_image_processor",
]

# The recipe's evaluation crop: resize the shorter side to size / 0.875 (256 for 224), then centre-crop size.
DEFAULT_CROP_PCT = 0.875
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class MFMModelOutput(BaseModelOutputWithPooling):
    """
    Args:
        last_hidden_state: (B, 1 + N, D) tokens (CLS first) for BEiT/ViT encoders; (B, C, h, w) feature map for CNNs.
        pooler_output: (B, D) image embedding: LayerNorm(mean of patch tokens) for BEiT/ViT (the official fine-tuning
            head), global average pooling for CNNs (then LayerNorm for ConvNeXt). None without a pooling layer.
        hidden_states: per-layer outputs when requested.
        attentions: per-layer attention maps when requested (eager attention only).
    """


@dataclass
class MFMForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss: scalar frequency loss (on the removed frequencies for MFM, on all for restoration pretexts).
        reconstruction: (B, C, H, W) decoder output, in normalised pixel space (compare with `pixel_values`).
        corrupted_pixel_values: (B, C, H, W) what the encoder saw, in normalised pixel space.
        frequency_mask: (B, H, W) keep-mask in fftshifted layout (1 = kept, 0 = removed); None for SR/deblur/denoise.
        hidden_states, attentions: encoder per-layer outputs when requested.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    corrupted_pixel_values: torch.FloatTensor | None = None
    frequency_mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def build_image_processor(config: MFMConfig, crop_pct: float = DEFAULT_CROP_PCT) -> Any:
    """The recipe's evaluation transform as a stock transformers processor (no remote code needed to load it):
    RGB conversion (grey, palette, CMYK; transparency composited over white), bicubic resize of the shorter side to
    ``floor(image_size / crop_pct)``, centre crop to ``image_size``, scaling to [0, 1] and the config's mean/std.
    (Imported here, not with the model: loading a model needs no image-processing code.)"""
    from transformers import BitImageProcessor

    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return BitImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": math.floor(config.image_size / crop_pct)},
        resample=3,  # bicubic, as the official pipeline
        do_center_crop=True,
        crop_size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def _backbone_config(config: MFMConfig, add_pooling_layer: bool) -> Any:
    """The backbone's config. For BEiT the MFM head decides whether transformers' final LayerNorm runs: a pooling
    model drops it (``use_mean_pooling``, the official fine-tuning), the pre-training model keeps it (the decoder
    reads normalised tokens). A private copy carries that choice, so the caller's config is never changed."""
    backbone = config.backbone_config
    if config.backbone_type == "beit" and bool(getattr(backbone, "use_mean_pooling", False)) != add_pooling_layer:
        backbone = copy.deepcopy(backbone)
        backbone.use_mean_pooling = add_pooling_layer
    return backbone


class MFMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by every MFM model."""

    config_class = MFMConfig
    config: MFMConfig
    base_model_prefix = "mfm"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True
    # the blocks of every supported backbone, and the transformer decoder's
    _no_split_modules = [
        "BeitLayer", "ViTEmbeddings", "ViTLayer", "ResNetConvLayer", "ResNetShortCut", "ConvNextLayer",
        "ConvNextV2Layer", "MFMDecoderLayer",
    ]
    # A classifier or encoder built from a pre-training folder drops the decoder, and (BEiT) the pre-trained final
    # LayerNorm, as the official fine-tuning does; its pooling LayerNorm starts as the identity.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"backbone\.layernorm\."]
    _keys_to_ignore_on_load_missing = [r"fc_norm\."]

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone is a PreTrainedModel: transformers dispatches its own _init_weights to it. The MFM layers use
        # the official truncated normal; norms, batch norms and the rest follow transformers' defaults.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MFMTransformerDecoder):
            init.trunc_normal_(module.position_embeddings, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, MFMDecoderLayer):
            if module.lambda_1 is not None:
                init.constant_(module.lambda_1, module.layer_scale_init_value)
                init.constant_(module.lambda_2, module.layer_scale_init_value)
        elif isinstance(module, MFMForPreTraining):
            # non-persistent buffers are not in checkpoints: fill them from the config
            shape = module.image_mean.shape
            init.copy_(module.image_mean, torch.tensor(self.config.image_mean).view(shape))
            init.copy_(module.image_std, torch.tensor(self.config.image_std).view(shape))
        else:
            super()._init_weights(module)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Saves weights and config (with an `auto_map` for every Auto class, and the remote code), plus the
        evaluation image processor (`build_image_processor`) unless the folder already has one, which is kept."""
        self.config.auto_map = {
            "AutoConfig": "configuration_mfm.MFMConfig",
            "AutoModel": "modeling_mfm.MFMModel",
            "AutoModelForPreTraining": "modeling_mfm.MFMForPreTraining",
            "AutoModelForImageClassification": "modeling_mfm.MFMForImageClassification",
        }
        has_processor = os.path.isfile(os.path.join(save_directory, PROCESSOR_FILE))
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not has_processor:
            build_image_processor(self.config).save_pretrained(save_directory)
        return result

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MFMPreTrainedModel:
        """A randomly initialised model from a named configuration (see `MFMConfig.available_presets()`)."""
        return cls(MFMConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Loads saved weights; a preset name (e.g. "mfm-vit-base") that is not a local folder is refused with a hint,
        since presets carry no weights."""
        name = str(pretrained_model_name_or_path)
        if name in PRESETS and not os.path.isdir(name):
            raise ValueError(
                f"{name!r} is a preset (a configuration without weights): use {cls.__name__}.from_preset({name!r}) "
                "for a randomly initialised model, or a Hub id / folder with weights"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def export_backbone(self, save_directory: str | os.PathLike) -> None:
        """Writes the encoder as a native transformers checkpoint (BeitModel, ViTModel, ResNetModel, ConvNextModel,
        ConvNextV2Model) that loads with `AutoModel.from_pretrained` and no custom code, plus the image processor.

        Its `last_hidden_state` and `pooler_output` are `MFMModel`'s (what `AutoModel` gives on this model's folder):
        BEiT is written with ``use_mean_pooling`` (no final LayerNorm; the pooler is MFM's LayerNorm of the mean
        patch token). Two native classes cannot express everything: ResNetModel returns the pooled vector as
        (B, C, 1, 1) instead of (B, C), and ViTModel's pooler (tanh of a dense layer on the CLS token) is not MFM's
        pooling, so a ViT export carries no pooler weights (transformers initialises them, with a warning)."""
        encoder = self.base_model
        backbone_type = self.config.backbone_type
        native_config = copy.deepcopy(encoder.backbone.config)
        state = dict(encoder.backbone.state_dict())
        allowed_missing: tuple[str, ...] = ()
        if backbone_type == "beit":
            native_config.use_mean_pooling = True
            state = {name: value for name, value in state.items() if not name.startswith("layernorm.")}
            fc_norm = encoder.fc_norm
            hidden = self.config.encoder_hidden_size
            state["pooler.layernorm.weight"] = fc_norm.weight if fc_norm is not None else torch.ones(hidden)
            state["pooler.layernorm.bias"] = fc_norm.bias if fc_norm is not None else torch.zeros(hidden)
        elif backbone_type == "vit":
            allowed_missing = ("pooler.",)
            logger.warning(
                "export_backbone: a native ViTModel's pooler_output (tanh(dense(CLS))) is not MFM's pooled embedding; "
                "the export carries no pooler weights. MFM's embedding is LayerNorm(last_hidden_state[:, 1:].mean(1))."
            )
        native = AutoModel.from_config(native_config)
        missing, unexpected = native.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith(allowed_missing)]
        if missing or unexpected:
            raise RuntimeError(f"export_backbone: the native {type(native).__name__} does not fit the encoder: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        exported = {name: value for name, value in native.state_dict().items() if not name.startswith(allowed_missing)}
        native.save_pretrained(save_directory, state_dict=exported)
        if not os.path.isfile(os.path.join(save_directory, PROCESSOR_FILE)):
            build_image_processor(self.config).save_pretrained(save_directory)


def _check_pixel_values(pixel_values: Any, config: MFMConfig, dtype: torch.dtype, name: str = "pixel_values") -> None:
    """Metadata checks only (shape, dtype): no tensor value is read, so the training step stays free of host syncs."""
    if not isinstance(pixel_values, torch.Tensor):
        hint = " (torch.from_numpy, or the image processor with return_tensors='pt')"
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}"
                         + (hint if isinstance(pixel_values, np.ndarray) else ""))
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"{name} must be (batch, {config.num_channels}, height, width), "
                         f"got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"{name} must be floating point, normalised as the image processor does; got "
                         f"{pixel_values.dtype} (raw images go through the image processor first)")
    # autocast runs float32 / half inputs in its own precision, but leaves float64 alone
    autocast = torch.is_autocast_enabled(pixel_values.device.type) and pixel_values.dtype != torch.float64
    if pixel_values.dtype != dtype and not autocast:
        raise ValueError(f"{name} is {pixel_values.dtype} but the model is {dtype}: cast the input with .to({dtype}) "
                         "(or run float32 / half inputs under torch.autocast)")
    height, width = pixel_values.shape[-2:]
    if height % config.encoder_stride or width % config.encoder_stride:
        raise ValueError(f"{name} height and width must be divisible by the encoder stride ({config.encoder_stride}), "
                         f"got {height}x{width}")


class MFMModel(MFMPreTrainedModel):
    """The encoder: a transformers backbone built from `config.backbone_config`, plus the MFM pooling.

    With the pooling layer (the default, and what `AutoModel` builds) the features are those of the official
    fine-tuning head: for BEiT the backbone's final LayerNorm is left out and ``pooler_output`` is
    ``fc_norm(mean of the patch tokens)``; a ViT backbone keeps its final LayerNorm (transformers' ViTModel has no
    switch for it) and pools the same way; CNNs pool globally (ConvNeXt then applies its final LayerNorm). Without
    it (``add_pooling_layer=False``, the pre-training encoder) the backbone runs as pre-trained, final norm included.
    """

    def __init__(self, config: MFMConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        backbone_kwargs = {"add_pooling_layer": False} if config.is_vit else {}
        self.backbone = AutoModel.from_config(_backbone_config(config, add_pooling_layer), **backbone_kwargs)
        self.fc_norm = None
        if add_pooling_layer and config.is_vit:
            eps = getattr(config.backbone_config, "layer_norm_eps", 1e-6)
            self.fc_norm = nn.LayerNorm(config.encoder_hidden_size, eps=eps)
        self.add_pooling_layer = add_pooling_layer
        # transformers' gradient/activation checkpointing switch flips this; BEiT/ViT layers checkpoint themselves,
        # CNN stages (which transformers does not checkpoint) are checkpointed here.
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> MFMModelOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): images normalised as the image processor does,
            in the model's dtype (or any float dtype under `torch.autocast`); H and W divisible by the encoder stride.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_pixel_values(pixel_values, self.config, self.dtype)
        kwargs = {"output_hidden_states": output_hidden_states}
        if self.config.is_vit:
            kwargs["output_attentions"] = output_attentions
            size_differs = tuple(pixel_values.shape[-2:]) != (self.config.image_size, self.config.image_size)
            kwargs["interpolate_pos_encoding"] = bool(interpolate_pos_encoding) or size_differs
        if self.gradient_checkpointing and self.training and not self.config.is_vit:
            outputs = self._checkpointed_cnn_forward(pixel_values, bool(output_hidden_states))
        else:
            outputs = self.backbone(pixel_values, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        pooled = None
        if self.add_pooling_layer:
            if self.config.is_vit:
                pooled = self.fc_norm(hidden[:, 1:].mean(dim=1))
            elif hasattr(self.backbone, "layernorm"):  # ConvNeXt: LayerNorm of the global average
                pooled = self.backbone.layernorm(hidden.mean(dim=(-2, -1)))
            else:
                pooled = hidden.mean(dim=(-2, -1))
        result = MFMModelOutput(
            last_hidden_state=hidden,
            pooler_output=pooled,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
        return result if return_dict else result.to_tuple()

    def _checkpointed_cnn_forward(self, pixel_values: torch.Tensor, output_hidden_states: bool) -> MFMModelOutput:
        """ResNet / ConvNeXt forward with each stage recomputed in backward. (BatchNorm running statistics see the
        recomputation too; MFM pre-training uses batch statistics, so only the running averages are affected.)"""
        stem = getattr(self.backbone, "embedder", None) or self.backbone.embeddings
        hidden = stem(pixel_values)
        hidden_states = (hidden,) if output_hidden_states else None
        for stage in self.backbone.encoder.stages:
            hidden = self._gradient_checkpointing_func(stage.__call__, hidden)
            if output_hidden_states:
                hidden_states += (hidden,)
        return MFMModelOutput(last_hidden_state=hidden, hidden_states=hidden_states)


def _patch_tokens_to_map(tokens: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> channel-last (B, H/stride, W/stride, D) map of the patch tokens (CLS dropped)."""
    return tokens[:, 1:].reshape(tokens.shape[0], height // stride, width // stride, tokens.shape[-1])


def _project_and_shuffle(projection: nn.Module, features: torch.Tensor, stride: int) -> torch.Tensor:
    """Channel-last features (B, h, w, D) -> image (B, C, h * stride, w * stride): the 1x1 convolution ``projection``
    (called as a module, so hooks and adapters on it apply), then PixelShuffle(stride), written out on the
    channel-last result (PixelShuffle reads channel c * stride² + i * stride + j into pixel
    (h * stride + i, w * stride + j)), so that a channel-last projection costs one copy."""
    projected = projection(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, h, w, stride² * C)
    batch, rows, columns, _ = projected.shape
    pixels = projected.reshape(batch, rows, columns, -1, stride, stride).permute(0, 3, 1, 4, 2, 5)
    return pixels.reshape(batch, pixels.shape[1], rows * stride, columns * stride)


class MFMDecoder(nn.Module):
    """The official light decoder: a 1x1 convolution to stride²·C channels and PixelShuffle(stride)."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__()
        self.stride = config.encoder_stride
        self.projection = nn.Conv2d(config.encoder_hidden_size, self.stride**2 * config.num_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Channel-last features (B, h, w, D) -> reconstruction (B, C, h * stride, w * stride)."""
        return _project_and_shuffle(self.projection, features, self.stride)


class MFMDecoderAttention(nn.Module):
    """Multi-head self-attention of the official (BEiT-style) decoder block: query and value biases, no key bias,
    computed with `torch.nn.functional.scaled_dot_product_attention`."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value, scale=self.scaling)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, -1))


class MFMDecoderMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class MFMDecoderLayer(nn.Module):
    """A pre-norm transformer block of the official decoder (timm's ``Block``): attention and MLP branches, each
    optionally scaled by a learned layer scale. Parameter names are those of transformers' BEiT layer, which the
    decoder used before, so saved checkpoints and the official conversion load unchanged."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float,
                 layer_scale_init_value: float = 0.0) -> None:
        super().__init__()
        self.attention = MFMDecoderAttention(hidden_size, num_heads)
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=eps)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MFMDecoderMLP(hidden_size, intermediate_size)
        self.layer_scale_init_value = layer_scale_init_value
        self.lambda_1 = self.lambda_2 = None
        if layer_scale_init_value > 0:
            self.lambda_1 = nn.Parameter(torch.full((hidden_size,), float(layer_scale_init_value)))
            self.lambda_2 = nn.Parameter(torch.full((hidden_size,), float(layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = self.attention(self.layernorm_before(hidden_states))
        if self.lambda_1 is not None:
            attended = self.lambda_1 * attended
        hidden_states = hidden_states + attended
        transformed = self.mlp(self.layernorm_after(hidden_states))
        if self.lambda_2 is not None:
            transformed = self.lambda_2 * transformed
        return hidden_states + transformed


class MFMTransformerDecoder(nn.Module):
    """The official optional transformer decoder (ViT encoders): linear embed of all encoder tokens, learned position
    embeddings, transformer blocks, LayerNorm, then the same 1x1 conv + PixelShuffle head on the patch tokens."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__()
        backbone = config.backbone_config
        num_patches = (config.image_size // config.encoder_stride) ** 2
        mlp_ratio = backbone.intermediate_size / backbone.hidden_size
        eps = getattr(backbone, "layer_norm_eps", 1e-6)
        layer_scale = float(getattr(backbone, "layer_scale_init_value", 0.0) or 0.0)
        width = config.decoder_hidden_size
        self.stride = config.encoder_stride
        self.embed = nn.Linear(config.encoder_hidden_size, width)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.layers = nn.ModuleList([
            MFMDecoderLayer(width, config.decoder_num_attention_heads, int(round(width * mlp_ratio)), eps, layer_scale)
            for _ in range(config.decoder_depth)
        ])
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.projection = nn.Conv2d(width, self.stride**2 * config.num_channels, kernel_size=1)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if tokens.shape[1] != self.position_embeddings.shape[1]:
            raise ValueError(
                "the transformer decoder has fixed position embeddings for "
                f"{self.position_embeddings.shape[1] - 1} patches, got {tokens.shape[1] - 1}"
            )
        hidden = self.embed(tokens) + self.position_embeddings
        for layer in self.layers:
            hidden = layer(hidden)
        hidden = self.layernorm(hidden)
        features = _patch_tokens_to_map(hidden, height, width, self.stride)
        return _project_and_shuffle(self.projection, features, self.stride)


class MFMForPreTraining(MFMPreTrainedModel):
    """MFM pre-training: corrupt the image (frequency masking or a restoration degradation), encode, decode the full
    image, and score the reconstruction in the frequency domain."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__(config)
        self.mfm = MFMModel(config, add_pooling_layer=False)
        self.decoder = MFMTransformerDecoder(config) if config.decoder_depth > 0 else MFMDecoder(config)
        self.frequency_loss = FrequencyLoss(
            loss_gamma=config.loss_gamma,
            matrix_gamma=config.matrix_gamma,
            patch_factor=config.patch_factor,
            ave_spectrum=config.ave_spectrum,
            with_matrix=config.with_matrix,
            log_matrix=config.log_matrix,
            batch_matrix=config.batch_matrix,
        )
        shape = (1, config.num_channels, 1, 1)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(shape), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(shape), persistent=False)
        self.post_init()

    # -- named steps ------------------------------------------------------------------------------------------------
    def sample_frequency_mask(self, batch_size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Per-image keep-masks (B, H, W): low-pass with probability `config.low_pass_probability`, else high-pass.
        Drawn with torch RNG on `device` (no host sync)."""
        keep = low_pass_mask(height, width, self.config.mask_radius, self.config.mask_outer_radius, device=device)
        low_pass = torch.rand(batch_size, device=device) < self.config.low_pass_probability
        return sample_frequency_masks(batch_size, low_pass, keep)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.image_mean) / self.image_std

    def unnormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values * self.image_std + self.image_mean

    def corrupt(
        self, pixel_values: torch.Tensor, frequency_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised input -> (normalised corrupted input, keep-mask or None)."""
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            images = self.unnormalize(pixel_values.float())
            if self.config.corruption == "mfm":
                batch, _, height, width = pixel_values.shape
                if frequency_mask is None:
                    frequency_mask = self.sample_frequency_mask(batch, height, width, pixel_values.device)
                else:
                    frequency_mask = _check_frequency_mask(frequency_mask, batch, height, width)
                corrupted = filter_frequencies(images, frequency_mask)
            else:
                frequency_mask = None
                corrupted = degrade(images, self.config)
            return self.normalize(corrupted).to(pixel_values.dtype), frequency_mask

    def decode(self, encoder_hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if isinstance(self.decoder, MFMTransformerDecoder):
            return self.decoder(encoder_hidden, height, width)
        if self.config.is_vit:
            return self.decoder(_patch_tokens_to_map(encoder_hidden, height, width, self.config.encoder_stride))
        features = encoder_hidden.permute(0, 2, 3, 1)  # channel-last (a view when the map is channels_last)
        if hasattr(self.mfm.backbone, "layernorm"):
            # ConvNeXt keeps its final LayerNorm for the pooled vector; apply it per position, as the ViT's final
            # norm precedes the decoder
            features = self.mfm.backbone.layernorm(features)
        return self.decoder(features)

    def compute_loss(
        self, reconstruction: torch.Tensor, target: torch.Tensor, frequency_mask: torch.Tensor | None
    ) -> torch.Tensor:
        per_frequency = self.frequency_loss(reconstruction, target)  # (B, P, C, H, W), float32
        if self.config.loss_on == "masked":
            return masked_frequency_loss(per_frequency, frequency_mask)
        return per_frequency.mean()

    def forward(
        self,
        pixel_values: torch.Tensor,
        frequency_mask: torch.Tensor | None = None,
        degraded_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> MFMForPreTrainingOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): images normalised with config.image_mean/std.
        frequency_mask (`torch.Tensor` of shape `(B, H, W)`, `(B, 1, H, W)` or `(H, W)`, *optional*): keep-mask in
            fftshifted layout (1 = kept, 0 = removed) for corruption "mfm"; drawn per image when None. A mask that
            removes nothing gives a loss of 0.
        degraded_pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): a ready degraded input
            (normalised) for the restoration pretexts; drawn with `corruptions.degrade` when None.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_pixel_values(pixel_values, self.config, self.dtype)
        height, width = pixel_values.shape[-2:]
        if degraded_pixel_values is not None:
            if self.config.corruption == "mfm":
                raise ValueError("degraded_pixel_values is for the sr/deblur/denoise pretexts; use frequency_mask")
            _check_pixel_values(degraded_pixel_values, self.config, self.dtype, "degraded_pixel_values")
            if degraded_pixel_values.shape != pixel_values.shape:
                raise ValueError(
                    f"degraded_pixel_values {tuple(degraded_pixel_values.shape)} must match pixel_values "
                    f"{tuple(pixel_values.shape)}"
                )
            corrupted, frequency_mask = degraded_pixel_values, None
        else:
            if frequency_mask is not None and self.config.corruption != "mfm":
                raise ValueError(f"frequency_mask is for corruption 'mfm'; this model's is {self.config.corruption!r}")
            corrupted, frequency_mask = self.corrupt(pixel_values, frequency_mask)

        encoded = self.mfm(
            corrupted,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        reconstruction = self.decode(encoded.last_hidden_state, height, width)
        loss = self.compute_loss(reconstruction, pixel_values, frequency_mask)

        output = MFMForPreTrainingOutput(
            loss=loss,
            reconstruction=reconstruction,
            corrupted_pixel_values=corrupted,
            frequency_mask=frequency_mask,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()


def _check_frequency_mask(mask: Any, batch: int, height: int, width: int) -> torch.Tensor:
    """A given keep-mask as float (B, H, W). Reads its values (binary?) in eager mode: a host sync, which only
    happens for a mask passed in (the training step draws its masks)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"frequency_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2 and tuple(mask.shape) == (height, width):
        mask = mask.expand(batch, height, width)
    if tuple(mask.shape) != (batch, height, width):
        raise ValueError(
            f"frequency_mask must be (B, H, W) = ({batch}, {height}, {width}), (B, 1, H, W) or (H, W), "
            f"got {tuple(mask.shape)}"
        )
    if mask.is_complex():
        raise ValueError("frequency_mask must hold only 0 (removed) and 1 (kept), got complex values")
    # reading the values is eager-only: a compiled or exported graph cannot branch on them
    if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("frequency_mask must hold only 0 (removed) and 1 (kept)")
    return mask.float()


class MFMForImageClassification(MFMPreTrainedModel):
    """An MFM encoder with a linear head on the pooled embedding (`MFMModel`'s pooling: LayerNorm of the mean patch
    token for ViTs, with BEiT's final LayerNorm left out; global average pooling for CNNs), as the official
    fine-tuning recipe."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mfm = MFMModel(config, add_pooling_layer=True)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = (
            nn.Linear(config.encoder_hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices for single-label classification
            (cross-entropy), floats for regression, or (B, num_labels) multi-hot targets for multi-label
            classification: transformers' image-classification loss, by `config.problem_type`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.mfm(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits.float(), self.config)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()
