"""MFMConfig: the one serialisable description of an MFM model (backbone, corruption, loss and decoder)."""

from __future__ import annotations

import math
import os
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

VIT_FAMILY = ("beit", "vit")
CNN_FAMILY = ("resnet", "convnext", "convnextv2")
SUPPORTED_BACKBONES = VIT_FAMILY + CNN_FAMILY
CORRUPTIONS = ("mfm", "sr", "deblur", "denoise")
BLUR_KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
    "sinc",
)
NOISE_TYPES = ("gaussian", "poisson")


def beit_backbone(hidden_size: int, layers: int, heads: int, image_size: int = 224, patch_size: int = 16, **kw) -> dict:
    """BEiT settings that reproduce the official MFM ViT: q/v biases, no k bias, absolute position
    embeddings with a CLS token, LayerNorm eps 1e-6, no layer scale, no relative position bias."""
    return {
        "model_type": "beit",
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden_size,
        "image_size": image_size,
        "patch_size": patch_size,
        "use_absolute_position_embeddings": True,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": False,
        "layer_scale_init_value": 0.0,
        "use_mask_token": False,
        "use_mean_pooling": False,
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        **kw,
    }


def resnet_backbone(depths: list[int], **kw) -> dict:
    """transformers ResNet equal to timm's (stride in the 3x3 conv)."""
    return {
        "model_type": "resnet",
        "layer_type": "bottleneck",
        "depths": depths,
        "hidden_sizes": [256, 512, 1024, 2048],
        "embedding_size": 64,
        "downsample_in_bottleneck": False,
        **kw,
    }


def convnext_backbone(depths: list[int], hidden_sizes: list[int], **kw) -> dict:
    return {"model_type": "convnext", "depths": depths, "hidden_sizes": hidden_sizes, "drop_path_rate": 0.0, **kw}


# Named configurations. Values are kwargs of MFMConfig; the backbone is given as a dict with its model_type.
PRESETS: dict[str, dict[str, Any]] = {
    "mfm-vit-small": {"backbone_config": beit_backbone(384, 12, 6)},
    "mfm-vit-base": {"backbone_config": beit_backbone(768, 12, 12)},
    "mfm-vit-large": {"backbone_config": beit_backbone(1024, 24, 16)},
    "mfm-resnet50": {"backbone_config": resnet_backbone([3, 4, 6, 3]), "low_pass_probability": 0.3},
    "mfm-convnext-tiny": {"backbone_config": convnext_backbone([3, 3, 9, 3], [96, 192, 384, 768])},
    "mfm-convnext-base": {"backbone_config": convnext_backbone([3, 3, 27, 3], [128, 256, 512, 1024])},
    # Small enough for a laptop CPU: the embedded demo and tests.
    "mfm-vit-tiny": {"backbone_config": beit_backbone(192, 12, 3)},
}
# The paper's restoration pretexts, on the same encoders and decoder (loss over all frequencies), with the settings
# of the released configs that produced the published numbers. (The field defaults are the official code's general
# defaults: the Real-ESRGAN mix of blur kernels and of Gaussian/Poisson noise.)
RELEASED_PRETEXT_SETTINGS: dict[str, dict[str, Any]] = {
    "sr": {"sr_factor": 8},
    "deblur": {
        "blur_kernel_types": ["iso"],
        "blur_kernel_probs": [1.0],
        "blur_sigma_x_range": [5.0, 5.0],
        "blur_sigma_y_range": [5.0, 5.0],
    },
    "denoise": {
        "noise_types": ["gaussian"],
        "noise_probs": [1.0],
        "noise_gaussian_sigma_range": [75.0, 75.0],
        "noise_gaussian_gray_prob": 0.0,
    },
}
for _base in ("mfm-vit-small", "mfm-vit-base", "mfm-resnet50"):
    for _pretext, _settings in RELEASED_PRETEXT_SETTINGS.items():
        PRESETS[f"{_base}-{_pretext}"] = {**PRESETS[_base], "corruption": _pretext, "loss_on": "all", **_settings}


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_range_pair(name: str, pair: Any, low: float = -math.inf, high: float = math.inf) -> None:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"{name} must be a [min, max] pair, got {pair!r}")
    if not (low <= pair[0] <= pair[1] <= high):
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {list(pair)}")


def _check_probabilities(name: str, probs: Any, expected_len: int) -> None:
    if not isinstance(probs, (list, tuple)) or len(probs) != expected_len:
        raise ValueError(f"{name} must be a list of {expected_len} probabilities, got {probs!r}")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-4:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {list(probs)}")


class MFMConfig(PreTrainedConfig):
    r"""Configuration of an MFM model: a backbone encoder, how its input is corrupted, and how the
    reconstruction is scored. The defaults reproduce the official ViT-B/16 MFM pre-training config.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The encoder: a transformers config of type beit, vit, resnet, convnext or convnextv2 (a dict needs its
            `model_type`). Defaults to the official ViT-B/16 as a BEiT config.
        image_size (`int`, *optional*):
            Input resolution. Defaults to the backbone's `image_size` if it has one, else 224.
        num_channels (`int`, defaults to 3): Input channels.
        image_mean, image_std (`list[float]`, defaults to ImageNet's):
            Normalisation of `pixel_values` (what the image processor applies); the model undoes it before
            filtering frequencies.
        corruption (`str`, defaults to `"mfm"`):
            The pretext: `"mfm"` (frequency masking), `"sr"`, `"deblur"` or `"denoise"`.
        mask_radius (`float`, defaults to 16): Inner radius r1 of the frequency mask (fftshifted spectrum).
        mask_outer_radius (`float`, *optional*): Outer radius r2 (None = no outer bound; official 999).
        low_pass_probability (`float`, defaults to 0.5): Probability of a low-pass filter per image
            (0.3 in the official ResNet-50 config).
        loss_on (`str`, defaults to `"masked"`): `"masked"`: mean loss over the removed frequencies only
            (official MFM); `"all"`: plain mean over all frequencies (official restoration pretexts).
        loss_gamma, matrix_gamma, patch_factor, ave_spectrum, with_matrix, log_matrix, batch_matrix:
            Options of the frequency loss (`FrequencyLoss`), official defaults.
        decoder_depth (`int`, defaults to 0): 0 = the official 1x1 conv + PixelShuffle head; > 0 = the official
            optional transformer decoder with this many blocks (ViT-family encoders only).
        decoder_hidden_size (`int`, defaults to 512), decoder_num_attention_heads (`int`, defaults to 16):
            Width and heads of the transformer decoder.
        sr_factor (`int`, defaults to 8): Down-sampling factor of the "sr" pretext (bicubic down and up).
        blur_kernel_sizes, blur_kernel_types, blur_kernel_probs, blur_sigma_x_range, blur_sigma_y_range,
        blur_rotation_range, blur_beta_gaussian_range, blur_beta_plateau_range:
            The "deblur" kernel family (Real-ESRGAN's), official defaults.
        noise_types, noise_probs, noise_gaussian_sigma_range (in 1/255 units), noise_gaussian_gray_prob,
        noise_poisson_scale_range, noise_poisson_gray_prob: The "denoise" pretext, official defaults.
        label_smoothing (`float`, defaults to 0.0): Label smoothing of `MFMForImageClassification`'s loss.
        classifier_dropout (`float`, defaults to 0.0): Dropout before the classification head.
    """

    model_type = "mfm"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="beit",
            init_kwargs={k: v for k, v in beit_backbone(768, 12, 12).items() if k != "model_type"},
        )
    }

    backbone_config: dict | PreTrainedConfig | None = None
    image_size: int | None = None
    num_channels: int = 3
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    corruption: str = "mfm"
    # frequency masking
    mask_radius: float = 16
    mask_outer_radius: float | None = None
    low_pass_probability: float = 0.5
    # frequency loss
    loss_on: str = "masked"
    loss_gamma: float = 1.0
    matrix_gamma: float = 1.0
    patch_factor: int = 1
    ave_spectrum: bool = False
    with_matrix: bool = False
    log_matrix: bool = False
    batch_matrix: bool = False
    # decoder
    decoder_depth: int = 0
    decoder_hidden_size: int = 512
    decoder_num_attention_heads: int = 16
    # restoration pretexts
    sr_factor: int = 8
    blur_kernel_sizes: list[int] | None = None
    blur_kernel_types: list[str] | None = None
    blur_kernel_probs: list[float] | None = None
    blur_sigma_x_range: list[float] | None = None
    blur_sigma_y_range: list[float] | None = None
    blur_rotation_range: list[float] | None = None
    blur_beta_gaussian_range: list[float] | None = None
    blur_beta_plateau_range: list[float] | None = None
    noise_types: list[str] | None = None
    noise_probs: list[float] | None = None
    noise_gaussian_sigma_range: list[float] | None = None
    noise_gaussian_gray_prob: float = 0.4
    noise_poisson_scale_range: list[float] | None = None
    noise_poisson_gray_prob: float = 0.4
    # classification
    label_smoothing: float = 0.0
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            raise ValueError("backbone_config given as a dict needs a 'model_type' (one of " f"{SUPPORTED_BACKBONES})")
        if isinstance(self.backbone_config, dict):
            model_type = self.backbone_config["model_type"]
            if model_type not in SUPPORTED_BACKBONES:
                raise ValueError(f"backbone_config.model_type must be one of {SUPPORTED_BACKBONES}, got {model_type!r}")
        defaults = {
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "blur_kernel_sizes": [7, 9, 11, 13, 15, 17, 19, 21],
            "blur_kernel_types": list(BLUR_KERNEL_TYPES),
            "blur_kernel_probs": [0.405, 0.225, 0.108, 0.027, 0.108, 0.027, 0.1],
            "blur_sigma_x_range": [0.2, 3.0],
            "blur_sigma_y_range": [0.2, 3.0],
            "blur_rotation_range": [-math.pi, math.pi],
            "blur_beta_gaussian_range": [0.5, 4.0],
            "blur_beta_plateau_range": [1.0, 2.0],
            "noise_types": list(NOISE_TYPES),
            "noise_probs": [0.5, 0.5],
            "noise_gaussian_sigma_range": [1.0, 30.0],
            "noise_poisson_scale_range": [0.05, 3.0],
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__(**kwargs)
        backbone = self.backbone_config
        if self.image_size is None:
            self.image_size = int(getattr(backbone, "image_size", 224)) if self.is_vit else 224
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        backbone = self.backbone_config
        if backbone.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"backbone_config.model_type must be one of {SUPPORTED_BACKBONES}, got {backbone.model_type!r}"
            )
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        # position embeddings tie a ViT to its size; CNN configs carry an unused image_size
        backbone_size = getattr(backbone, "image_size", None) if self.is_vit else None
        if backbone_size is not None and backbone_size != self.image_size:
            raise ValueError(
                f"image_size ({self.image_size}) differs from backbone_config.image_size ({backbone_size}); "
                "set both to the same value"
            )
        if self.num_channels != getattr(backbone, "num_channels", self.num_channels):
            raise ValueError(
                f"num_channels ({self.num_channels}) differs from backbone_config.num_channels ({backbone.num_channels})"
            )
        if self.image_size % self.encoder_stride:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by the encoder stride ({self.encoder_stride}) "
                f"of the {backbone.model_type} backbone"
            )
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                raise ValueError(f"{name} needs {self.num_channels} values (num_channels), got {values}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        if self.mask_radius <= 0:
            raise ValueError(f"mask_radius must be > 0, got {self.mask_radius}")
        if self.mask_outer_radius is not None and self.mask_outer_radius <= self.mask_radius:
            raise ValueError(
                f"mask_outer_radius must be > mask_radius ({self.mask_radius}) or None, got {self.mask_outer_radius}"
            )
        _in_range("low_pass_probability", self.low_pass_probability, 0.0, 1.0)
        if self.loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {self.loss_on!r}")
        if self.loss_on == "masked" and self.corruption != "mfm":
            raise ValueError(f"loss_on='masked' needs corruption='mfm' (a frequency mask); got {self.corruption!r}")
        if self.loss_gamma <= 0 or self.matrix_gamma <= 0:
            raise ValueError(f"loss_gamma and matrix_gamma must be > 0, got {self.loss_gamma}, {self.matrix_gamma}")
        if not isinstance(self.patch_factor, int) or self.patch_factor < 1 or self.image_size % self.patch_factor:
            raise ValueError(f"patch_factor must be a positive integer dividing image_size, got {self.patch_factor}")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {self.decoder_depth}")
        if self.decoder_depth > 0:
            if backbone.model_type not in VIT_FAMILY:
                raise ValueError("decoder_depth > 0 (transformer decoder) needs a beit or vit backbone")
            if self.decoder_hidden_size % self.decoder_num_attention_heads:
                raise ValueError(
                    f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                    f"decoder_num_attention_heads ({self.decoder_num_attention_heads})"
                )
        if self.sr_factor < 1 or self.image_size % self.sr_factor:
            raise ValueError(f"sr_factor must be a positive integer dividing image_size, got {self.sr_factor}")
        if any(k < 1 or k % 2 == 0 for k in self.blur_kernel_sizes):
            raise ValueError(f"blur_kernel_sizes must be odd positive integers, got {self.blur_kernel_sizes}")
        unknown = set(self.blur_kernel_types) - set(BLUR_KERNEL_TYPES)
        if unknown:
            raise ValueError(f"blur_kernel_types has unknown kernels {sorted(unknown)}; known: {BLUR_KERNEL_TYPES}")
        _check_probabilities("blur_kernel_probs", self.blur_kernel_probs, len(self.blur_kernel_types))
        _check_range_pair("blur_sigma_x_range", self.blur_sigma_x_range, 1e-6)
        _check_range_pair("blur_sigma_y_range", self.blur_sigma_y_range, 1e-6)
        _check_range_pair("blur_rotation_range", self.blur_rotation_range)
        _check_range_pair("blur_beta_gaussian_range", self.blur_beta_gaussian_range, 1e-6)
        _check_range_pair("blur_beta_plateau_range", self.blur_beta_plateau_range, 1e-6)
        unknown = set(self.noise_types) - set(NOISE_TYPES)
        if unknown:
            raise ValueError(f"noise_types has unknown types {sorted(unknown)}; known: {NOISE_TYPES}")
        _check_probabilities("noise_probs", self.noise_probs, len(self.noise_types))
        _check_range_pair("noise_gaussian_sigma_range", self.noise_gaussian_sigma_range, 0.0)
        _check_range_pair("noise_poisson_scale_range", self.noise_poisson_scale_range, 1e-6)
        _in_range("noise_gaussian_gray_prob", self.noise_gaussian_gray_prob, 0.0, 1.0)
        _in_range("noise_poisson_gray_prob", self.noise_poisson_gray_prob, 0.0, 1.0)
        _in_range("label_smoothing", self.label_smoothing, 0.0, 1.0)
        _in_range("classifier_dropout", self.classifier_dropout, 0.0, 1.0)

    # ------------------------------------------------------------------ derived values
    @property
    def backbone_type(self) -> str:
        return self.backbone_config.model_type

    @property
    def is_vit(self) -> bool:
        """True for token-based encoders (BEiT / ViT) with a CLS token."""
        return self.backbone_config.model_type in VIT_FAMILY

    @property
    def encoder_stride(self) -> int:
        """Pixels per feature-map cell: the patch size for ViTs, 32 for ResNet / ConvNeXt."""
        if self.is_vit:
            return int(self.backbone_config.patch_size)
        return 32

    @property
    def encoder_hidden_size(self) -> int:
        if self.is_vit:
            return int(self.backbone_config.hidden_size)
        return int(self.backbone_config.hidden_sizes[-1])

    # ------------------------------------------------------------------ presets
    @classmethod
    def available_presets(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MFMConfig:
        """A named configuration (``MFMConfig.from_preset("mfm-vit-base")``), optionally with fields overridden.

        ``image_size`` is applied to the backbone too, so ``from_preset("mfm-vit-small", image_size=96)`` works.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
        backbone_overrides = overrides.pop("backbone_overrides", {}) or {}
        kwargs.update(overrides)
        backbone = dict(kwargs["backbone_config"])
        backbone.update(backbone_overrides)
        if "image_size" in overrides and backbone["model_type"] in VIT_FAMILY:
            backbone["image_size"] = overrides["image_size"]
        kwargs["backbone_config"] = backbone
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MFMConfig:
        """Loads a saved config, or a preset when given a preset name that is not a local folder."""
        name = str(pretrained_model_name_or_path)
        if name in PRESETS and not os.path.isdir(name):
            return cls.from_preset(name, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


__all__ = ["PRESETS", "MFMConfig"]
