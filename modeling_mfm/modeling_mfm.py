"""MFM models: an encoder from transformers (BEiT / ViT / ResNet / ConvNeXt), the MFM decoder and the frequency loss.

Masked Frequency Modeling (Xie et al., "Masked Frequency Modeling for Self-Supervised Visual Pre-Training",
ICLR 2023, arXiv 2206.07706). The modeling files import only each other (relative imports, flat folder), so that
``save_pretrained`` can ship them as Hub remote code.

forward of MFMForPreTraining reads as named steps: un-normalise -> corrupt -> normalise -> encode -> decode -> loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BeitConfig, PreTrainedModel, ViTImageProcessor
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.beit.modeling_beit import BeitLayer
from transformers.utils import ModelOutput

from .configuration_mfm import PRESETS, MFMConfig
from .corruptions import degrade
from .frequency import FrequencyLoss, filter_frequencies, low_pass_mask, masked_frequency_loss, sample_frequency_masks
from .image_attention import image_attention_implementation
from .patch_linear import project_and_shuffle, use_gemm_patch_projection
from .qkv_projection import use_fused_qkv_projection

__all__ = [
    "MFMForImageClassification",
    "MFMForPreTraining",
    "MFMForPreTrainingOutput",
    "MFMModel",
    "MFMModelOutput",
    "MFMPreTrainedModel",
    "build_image_processor",
]


@dataclass
class MFMModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: (B, 1 + N, D) tokens (CLS first) for BEiT/ViT encoders; (B, C, h, w) feature map for CNNs.
        pooler_output: (B, D) image embedding: LayerNorm(mean of patch tokens) for BEiT/ViT (the official fine-tuning
            head), global average pooling for CNNs. None when the model was built without a pooling layer.
        hidden_states: per-layer outputs when requested.
        attentions: per-layer attention maps when requested (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


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


def build_image_processor(config: MFMConfig) -> ViTImageProcessor:
    """The image processor matching a config: bicubic resize to image_size, scale to [0, 1], normalise."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        resample=3,  # PIL bicubic, as the official pipeline
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


class _UnitLayerScale(float):
    """Stands for BEiT's layer scale when it is off (``layer_scale_init_value`` 0). transformers then keeps the
    float 1.0 and still multiplies every block's two branch outputs by it: a full-size kernel forward and backward,
    which the H100 profile puts at about 4 % of an eager ViT-B step. Multiplying by this 1.0 returns the tensor
    itself. torch.compile (2.14 and later) sees a plain 1.0, whose multiply it fuses away, with no graph break;
    earlier versions break the graph at each multiply (two per block), so there the plain 1.0 stays
    (`_FLOAT_SUBCLASSES_TRACEABLE`)."""

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return other

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return "1.0 (no layer scale)"


# torch.compile traces arithmetic on float subclasses from torch 2.14 on; torch 2.11 breaks the graph there (seen on
# an H100: the compiled ViT-B/16 step ran with 24 eager islands per step).
_FLOAT_SUBCLASSES_TRACEABLE = torch.__version__ >= "2.14"


def _skip_unit_layer_scales(module: nn.Module) -> None:
    """Replaces the 1.0 layer scales of the BEiT blocks under ``module`` (no parameters change), where
    torch.compile can trace the replacement."""
    if not _FLOAT_SUBCLASSES_TRACEABLE:
        return
    for layer in module.modules():
        if isinstance(layer, BeitLayer):
            for name in ("lambda_1", "lambda_2"):
                scale = getattr(layer, name)
                if not isinstance(scale, torch.Tensor) and scale == 1.0:
                    setattr(layer, name, _UnitLayerScale(1.0))


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
    _no_split_modules = ["BeitLayer", "ViTLayer"]
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone is a PreTrainedModel: transformers dispatches its own _init_weights to it. transformers'
        # `initialization` functions skip tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MFMTransformerDecoder):
            init.trunc_normal_(module.position_embeddings, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, MFMForPreTraining):
            # non-persistent buffers are not in checkpoints: fill them from the config
            shape = module.image_mean.shape
            init.copy_(module.image_mean, torch.tensor(self.config.image_mean).view(shape))
            init.copy_(module.image_std, torch.tensor(self.config.image_std).view(shape))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights and config (with an `auto_map` for every Auto class, and the remote code), plus the matching
        `preprocessor_config.json`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_mfm.MFMConfig",
            "AutoModel": "modeling_mfm.MFMModel",
            "AutoModelForPreTraining": "modeling_mfm.MFMForPreTraining",
            "AutoModelForImageClassification": "modeling_mfm.MFMForImageClassification",
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            build_image_processor(self.config).save_pretrained(save_directory)
        return result

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MFMPreTrainedModel:
        """A randomly initialised model from a named configuration (see `MFMConfig.available_presets()`)."""
        return cls(MFMConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
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
        """Writes the encoder as a native transformers checkpoint (BeitModel, ViTModel, ResNetModel, ConvNextModel...)
        that loads with `AutoModel.from_pretrained` and no custom code, plus the image processor."""
        encoder = self.base_model
        state_dict = dict(encoder.backbone.state_dict())
        if encoder.fc_norm is not None and getattr(self.config.backbone_config, "use_mean_pooling", False):
            # a native BeitModel with use_mean_pooling pools exactly as our fc_norm does
            state_dict["pooler.layernorm.weight"] = encoder.fc_norm.weight
            state_dict["pooler.layernorm.bias"] = encoder.fc_norm.bias
        encoder.backbone.save_pretrained(save_directory, state_dict=state_dict)
        build_image_processor(self.config).save_pretrained(save_directory)


class MFMModel(MFMPreTrainedModel):
    """The encoder: a transformers backbone built from `config.backbone_config`, plus the MFM pooling."""

    def __init__(self, config: MFMConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        backbone_kwargs = {"add_pooling_layer": False} if config.is_vit else {}
        if config.is_vit:  # SDPA without a materialised mask (see image_attention: keeps flash under compile)
            backbone_config = config.backbone_config
            backbone_config._attn_implementation = image_attention_implementation(backbone_config._attn_implementation)
        self.backbone = AutoModel.from_config(config.backbone_config, **backbone_kwargs)
        _skip_unit_layer_scales(self.backbone)
        use_gemm_patch_projection(self.backbone)  # the patch convolution as one GEMM (see patch_linear)
        use_fused_qkv_projection(self.backbone)  # queries, keys and values from one GEMM (see qkv_projection)
        self.fc_norm = None
        if add_pooling_layer and config.is_vit:
            eps = getattr(config.backbone_config, "layer_norm_eps", 1e-6)
            self.fc_norm = nn.LayerNorm(config.encoder_hidden_size, eps=eps)
        self.add_pooling_layer = add_pooling_layer
        # transformers' activation_checkpointing_enable() flips this; BEiT/ViT layers checkpoint themselves, CNN stages
        # (which transformers does not checkpoint) are checkpointed here.
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
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_pixel_values(pixel_values, self.config)
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


def _check_pixel_values(pixel_values: torch.Tensor, config: MFMConfig) -> None:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {config.num_channels}, height, width), got {tuple(pixel_values.shape)}"
        )
    height, width = pixel_values.shape[-2:]
    if height % config.encoder_stride or width % config.encoder_stride:
        raise ValueError(
            f"pixel_values height and width must be divisible by the encoder stride ({config.encoder_stride}), "
            f"got {height}x{width}"
        )


def _patch_tokens_to_map(tokens: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """(B, 1 + N, D) tokens -> channel-last (B, H/stride, W/stride, D) map of the patch tokens (CLS dropped)."""
    return tokens[:, 1:].reshape(tokens.shape[0], height // stride, width // stride, tokens.shape[-1])


class MFMDecoder(nn.Module):
    """The official light decoder: a 1x1 convolution to stride²·C channels and PixelShuffle(stride), computed as one
    GEMM on channel-last features (`patch_linear.project_and_shuffle`)."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__()
        self.stride = config.encoder_stride
        self.projection = nn.Conv2d(config.encoder_hidden_size, self.stride**2 * config.num_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Channel-last features (B, h, w, D) -> reconstruction (B, C, h * stride, w * stride)."""
        return project_and_shuffle(features, self.projection, self.stride)


class MFMTransformerDecoder(nn.Module):
    """The official optional transformer decoder (ViT encoders): linear embed of all encoder tokens, learned position
    embeddings, BEiT blocks, LayerNorm, then the same 1x1 conv + PixelShuffle head on the patch tokens."""

    def __init__(self, config: MFMConfig) -> None:
        super().__init__()
        backbone = config.backbone_config
        num_patches = (config.image_size // config.encoder_stride) ** 2
        mlp_ratio = backbone.intermediate_size / backbone.hidden_size
        eps = getattr(backbone, "layer_norm_eps", 1e-6)
        self.layer_config = BeitConfig(
            hidden_size=config.decoder_hidden_size,
            num_hidden_layers=config.decoder_depth,
            num_attention_heads=config.decoder_num_attention_heads,
            intermediate_size=int(round(config.decoder_hidden_size * mlp_ratio)),
            layer_scale_init_value=getattr(backbone, "layer_scale_init_value", 0.0),
            use_relative_position_bias=False,
            layer_norm_eps=eps,
            patch_size=config.encoder_stride,
            image_size=config.image_size,
        )
        self.layer_config._attn_implementation = image_attention_implementation(
            getattr(backbone, "_attn_implementation", None)
        )
        self.stride = config.encoder_stride
        self.embed = nn.Linear(config.encoder_hidden_size, config.decoder_hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.decoder_hidden_size))
        self.layers = nn.ModuleList([BeitLayer(self.layer_config) for _ in range(config.decoder_depth)])
        _skip_unit_layer_scales(self.layers)
        use_fused_qkv_projection(self.layers)
        self.layernorm = nn.LayerNorm(config.decoder_hidden_size, eps=eps)
        self.projection = nn.Conv2d(config.decoder_hidden_size, self.stride**2 * config.num_channels, kernel_size=1)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if tokens.shape[1] != self.position_embeddings.shape[1]:
            raise ValueError(
                "the transformer decoder has fixed position embeddings for "
                f"{self.position_embeddings.shape[1] - 1} patches, got {tokens.shape[1] - 1}"
            )
        hidden = self.embed(tokens) + self.position_embeddings
        for layer in self.layers:
            hidden = layer(hidden, resolution=(height, width))
        hidden = self.layernorm(hidden)
        features = _patch_tokens_to_map(hidden, height, width, self.stride)
        return project_and_shuffle(features, self.projection, self.stride)


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
        frequency_mask (`torch.Tensor` of shape `(B, H, W)` or `(B, 1, H, W)`, *optional*): keep-mask in fftshifted
            layout (1 = kept, 0 = removed) for corruption "mfm"; drawn per image when None.
        degraded_pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`, *optional*): a ready degraded input
            (normalised) for the restoration pretexts; drawn with `corruptions.degrade` when None.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_pixel_values(pixel_values, self.config)
        height, width = pixel_values.shape[-2:]
        if degraded_pixel_values is not None:
            if self.config.corruption == "mfm":
                raise ValueError("degraded_pixel_values is for the sr/deblur/denoise pretexts; use frequency_mask")
            if degraded_pixel_values.shape != pixel_values.shape:
                raise ValueError(
                    f"degraded_pixel_values {tuple(degraded_pixel_values.shape)} must match pixel_values "
                    f"{tuple(pixel_values.shape)}"
                )
            corrupted, frequency_mask = degraded_pixel_values, None
        else:
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


def _check_frequency_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask.expand(batch, height, width)
    if tuple(mask.shape) != (batch, height, width):
        raise ValueError(
            f"frequency_mask must be (B, H, W) = ({batch}, {height}, {width}) or (B, 1, H, W), got {tuple(mask.shape)}"
        )
    return mask.float()


class MFMForImageClassification(MFMPreTrainedModel):
    """An MFM encoder with a linear head on the pooled embedding (mean-pooled tokens + LayerNorm for ViTs, global
    average pooling for CNNs), as the official fine-tuning recipe."""

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
            (cross-entropy with `config.label_smoothing`), floats for regression, or (B, num_labels) multi-hot
            targets for multi-label classification.
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
        loss = self.classification_loss(logits, labels) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss by `config.problem_type`, inferred from the labels as transformers does when unset."""
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
            return F.mse_loss(logits.float(), labels.float())
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(
                logits.float().view(-1, self.num_labels), labels.view(-1), label_smoothing=self.config.label_smoothing
            )
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
