"""MFMConfig: the one serialisable description of an MFM model (backbone, corruption, loss and decoder).

Shipped as Hub remote code with every checkpoint, so it uses transformers' public API only and the classic
``__init__`` form of a custom config, which every transformers 5 release loads (the dataclass form of later releases
is not in transformers 5.0).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
import os
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

logger = logging.getLogger(__name__)

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

# Guards against an untrusted config.json that would allocate for minutes (or forever): the model's parameter count
# is estimated from the sizes before anything is built. The largest published MFM model (ViT-B) has 86 M parameters
# and ViT-g about 1 B; 10 B leaves room for any real encoder.
MAX_PARAMETERS = 10**10
MAX_IMAGE_SIZE = 16384

# Fields that older releases kept in the model config and that now belong to the training scripts: accepted when an
# old config.json is read, then dropped.
RETIRED_FIELDS = ("label_smoothing",)

# The official setting: radius 16 at 224 px. Other sizes keep its ratio (`official_mask_radius`).
OFFICIAL_IMAGE_SIZE = 224
OFFICIAL_MASK_RADIUS = 16


def official_mask_radius(image_size: int) -> float:
    """The mask radius with the official radius-to-size ratio (16 at 224 px) at ``image_size``: the low-pass view
    keeps the same share of the spectrum at any size."""
    return OFFICIAL_MASK_RADIUS * image_size / OFFICIAL_IMAGE_SIZE


def beit_backbone(
    hidden_size: int, layers: int, heads: int, image_size: int = OFFICIAL_IMAGE_SIZE, patch_size: int = 16, **kw
) -> dict:
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
        PRESETS[f"{_base}-{_pretext}"] = {**PRESETS[_base], "corruption": _pretext, **_settings}


def merge_overrides(
    kwargs: dict[str, Any], overrides: dict[str, Any], backbone_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """MFMConfig keyword arguments (``backbone_config`` as a dict) with fields and backbone fields overridden: the one
    override rule of presets, config files and saved configs. ``image_size`` reaches a ViT backbone too, whose
    position embeddings are tied to it."""
    merged = {**kwargs, **overrides}
    backbone = dict(merged["backbone_config"])
    backbone.update(backbone_overrides or {})
    if "image_size" in overrides and backbone.get("model_type") in VIT_FAMILY:
        backbone["image_size"] = overrides["image_size"]
    merged["backbone_config"] = backbone
    return merged


# ---------------------------------------------------------------------------------------------------- field checks
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(name: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or value > high or (low_open and value == low):
        if high == math.inf:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value}")
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def _numbers(name: str, values: Any, length: int | None = None) -> None:
    if not isinstance(values, (list, tuple)) or (length is not None and len(values) != length):
        expected = f"a list of {length} numbers" if length is not None else "a list of numbers"
        raise ValueError(f"{name} must be {expected}, got {values!r}")
    for value in values:
        _number(name, value)


def _range_pair(name: str, pair: Any, low: float = -math.inf) -> None:
    _numbers(name, pair, 2)
    if not (low <= pair[0] <= pair[1]):
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {list(pair)}")


def _probabilities(name: str, probs: Any, expected_len: int) -> None:
    _numbers(name, probs, expected_len)
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-4:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {list(probs)}")


def _choices(name: str, values: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a non-empty list of names from {allowed}, got {values!r}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown entries {unknown}; known: {allowed}")


def low_pass_removes_something(image_size: int, radius: float, outer_radius: float | None) -> bool:
    """Whether the low-pass filter removes at least one frequency of an image_size x image_size spectrum: is there a
    point (x, y) of the grid, centred at image_size // 2, with radius² <= d² < outer_radius²?"""
    centre = image_size // 2
    largest_dy = max(centre, image_size - 1 - centre)
    outer2 = math.inf if outer_radius is None else outer_radius**2
    for dx in range(-centre, image_size - centre):
        need = radius**2 - dx * dx  # dy² must reach this
        dy = 0 if need <= 0 else math.isqrt(math.ceil(need))
        while dy * dy < need:
            dy += 1
        if dy <= largest_dy and dx * dx + dy * dy < outer2:
            return True
    return False


def _transformers_keys() -> frozenset[str]:
    """Keyword arguments that transformers itself passes to (or reads from) every config, in this release."""
    base = set(inspect.signature(PreTrainedConfig.__init__).parameters) - {"self", "kwargs"}
    return frozenset(base | {
        "model_type", "transformers_version", "architectures", "auto_map", "name_or_path", "dtype", "torch_dtype",
        "attn_implementation", "experts_implementation", "output_attentions", "output_hidden_states", "return_dict",
        "num_labels", "id2label", "label2id", "problem_type", "tie_word_embeddings", "pruned_heads",
        "chunk_size_feed_forward", "is_encoder_decoder", "per_layer_config", "tokenizer_class",
    })


def estimated_parameters(config: MFMConfig) -> int:
    """A quick estimate of the parameter count from the sizes (within a small factor), computed before building."""
    backbone = config.backbone_config
    if config.is_vit:
        width, depth = backbone.hidden_size, backbone.num_hidden_layers
        tokens = (config.image_size // backbone.patch_size) ** 2 + 1
        count = depth * (4 * width * width + 2 * width * backbone.intermediate_size)
        count += tokens * width + config.num_channels * backbone.patch_size**2 * width
        if config.decoder_depth:
            decoder_width = config.decoder_hidden_size
            count += config.decoder_depth * 12 * decoder_width * decoder_width + tokens * decoder_width
    else:
        count = sum(18 * depth * width * width for depth, width in zip(backbone.depths, backbone.hidden_sizes))
    return count + config.encoder_hidden_size * config.encoder_stride**2 * config.num_channels


class MFMConfig(PreTrainedConfig):
    r"""Configuration of an MFM model: a backbone encoder, how its input is corrupted, and how the
    reconstruction is scored. The defaults reproduce the official ViT-B/16 MFM pre-training config.

    Every field is checked when the config is built (a `ValueError` names the field). Unknown keys are kept but
    warned about by name; a config whose sizes describe more than `MAX_PARAMETERS` parameters, or an image larger
    than `MAX_IMAGE_SIZE`, is refused before anything is allocated.

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
        loss_on (`str`, *optional*): `"masked"`: mean loss over the removed frequencies only (official MFM);
            `"all"`: plain mean over all frequencies (official restoration pretexts). Defaults to `"masked"` for
            corruption `"mfm"` and to `"all"` for the others.
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
        classifier_dropout (`float`, defaults to 0.0): Dropout before the classification head. It stays in the model
            config because it is a layer of `MFMForImageClassification` (as in transformers' own classifiers);
            label smoothing, a property of a training run, is an option of the fine-tuning script and of
            `TrainingArguments` (`label_smoothing_factor`).
        initializer_range (`float`, defaults to 0.02): Standard deviation of the truncated-normal initialisation.
    """

    model_type = "mfm"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: dict | PreTrainedConfig | None = None,
        image_size: int | None = None,
        num_channels: int = 3,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        corruption: str = "mfm",
        mask_radius: float = OFFICIAL_MASK_RADIUS,
        mask_outer_radius: float | None = None,
        low_pass_probability: float = 0.5,
        loss_on: str | None = None,
        loss_gamma: float = 1.0,
        matrix_gamma: float = 1.0,
        patch_factor: int = 1,
        ave_spectrum: bool = False,
        with_matrix: bool = False,
        log_matrix: bool = False,
        batch_matrix: bool = False,
        decoder_depth: int = 0,
        decoder_hidden_size: int = 512,
        decoder_num_attention_heads: int = 16,
        sr_factor: int = 8,
        blur_kernel_sizes: list[int] | None = None,
        blur_kernel_types: list[str] | None = None,
        blur_kernel_probs: list[float] | None = None,
        blur_sigma_x_range: list[float] | None = None,
        blur_sigma_y_range: list[float] | None = None,
        blur_rotation_range: list[float] | None = None,
        blur_beta_gaussian_range: list[float] | None = None,
        blur_beta_plateau_range: list[float] | None = None,
        noise_types: list[str] | None = None,
        noise_probs: list[float] | None = None,
        noise_gaussian_sigma_range: list[float] | None = None,
        noise_gaussian_gray_prob: float = 0.4,
        noise_poisson_scale_range: list[float] | None = None,
        noise_poisson_gray_prob: float = 0.4,
        classifier_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        for name in RETIRED_FIELDS:
            if kwargs.pop(name, None) is not None:
                logger.info("MFMConfig: %r is a training option now; the value in this config is ignored", name)
        unknown = sorted(k for k in kwargs if k not in _transformers_keys() and not k.startswith("_"))
        if unknown:
            logger.warning("MFMConfig: unknown field(s) %s (kept, but no MFM code reads them; a typo?)", unknown)
        self.backbone_config = _backbone_config(backbone_config)
        self.image_size = image_size
        self.num_channels = num_channels
        self.image_mean = list(IMAGENET_MEAN) if image_mean is None else image_mean
        self.image_std = list(IMAGENET_STD) if image_std is None else image_std
        self.corruption = corruption
        self.mask_radius = mask_radius
        self.mask_outer_radius = mask_outer_radius
        self.low_pass_probability = low_pass_probability
        self.loss_on = loss_on if loss_on is not None else ("masked" if corruption == "mfm" else "all")
        self.loss_gamma = loss_gamma
        self.matrix_gamma = matrix_gamma
        self.patch_factor = patch_factor
        self.ave_spectrum = ave_spectrum
        self.with_matrix = with_matrix
        self.log_matrix = log_matrix
        self.batch_matrix = batch_matrix
        self.decoder_depth = decoder_depth
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.sr_factor = sr_factor
        defaults = {
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
        given = {
            "blur_kernel_sizes": blur_kernel_sizes, "blur_kernel_types": blur_kernel_types,
            "blur_kernel_probs": blur_kernel_probs, "blur_sigma_x_range": blur_sigma_x_range,
            "blur_sigma_y_range": blur_sigma_y_range, "blur_rotation_range": blur_rotation_range,
            "blur_beta_gaussian_range": blur_beta_gaussian_range, "blur_beta_plateau_range": blur_beta_plateau_range,
            "noise_types": noise_types, "noise_probs": noise_probs,
            "noise_gaussian_sigma_range": noise_gaussian_sigma_range,
            "noise_poisson_scale_range": noise_poisson_scale_range,
        }
        for name, value in given.items():
            setattr(self, name, defaults[name] if value is None else value)
        self.noise_gaussian_gray_prob = noise_gaussian_gray_prob
        self.noise_poisson_gray_prob = noise_poisson_gray_prob
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if self.image_size is None:
            backbone_size = getattr(self.backbone_config, "image_size", None) if self.is_vit else None
            self.image_size = backbone_size if _is_int(backbone_size) else OFFICIAL_IMAGE_SIZE
        self._validate()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MFMConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _integer("num_channels", self.num_channels)
        _integer("image_size", self.image_size)
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be <= {MAX_IMAGE_SIZE}, got {self.image_size}")
        self._validate_backbone()
        for name in ("image_mean", "image_std"):
            _numbers(name, getattr(self, name), self.num_channels)
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        _number("mask_radius", self.mask_radius, 0.0, low_open=True)
        if self.mask_outer_radius is not None:
            _number("mask_outer_radius", self.mask_outer_radius)
            if self.mask_outer_radius <= self.mask_radius:
                raise ValueError(f"mask_outer_radius must be > mask_radius ({self.mask_radius}) or None, "
                                 f"got {self.mask_outer_radius}")
        _number("low_pass_probability", self.low_pass_probability, 0.0, 1.0)
        if self.loss_on not in ("masked", "all"):
            raise ValueError(f"loss_on must be 'masked' or 'all', got {self.loss_on!r}")
        if self.loss_on == "masked" and self.corruption != "mfm":
            raise ValueError(f"loss_on='masked' needs corruption='mfm' (a frequency mask); got {self.corruption!r}")
        _number("loss_gamma", self.loss_gamma, 0.0, low_open=True)
        _number("matrix_gamma", self.matrix_gamma, 0.0, low_open=True)
        _integer("patch_factor", self.patch_factor)
        if self.image_size % self.patch_factor:
            raise ValueError(f"patch_factor must divide image_size ({self.image_size}), got {self.patch_factor}")
        for name in ("ave_spectrum", "with_matrix", "log_matrix", "batch_matrix"):
            _boolean(name, getattr(self, name))
        _integer("decoder_depth", self.decoder_depth, minimum=0)
        _integer("decoder_hidden_size", self.decoder_hidden_size)
        _integer("decoder_num_attention_heads", self.decoder_num_attention_heads)
        if self.decoder_depth > 0:
            if not self.is_vit:
                raise ValueError("decoder_depth > 0 (transformer decoder) needs a beit or vit backbone")
            if self.decoder_hidden_size % self.decoder_num_attention_heads:
                raise ValueError(
                    f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                    f"decoder_num_attention_heads ({self.decoder_num_attention_heads})"
                )
        if self.corruption == "mfm" and self.low_pass_probability > 0 and not low_pass_removes_something(
            self.image_size, self.mask_radius, self.mask_outer_radius
        ):
            raise ValueError(
                f"mask_radius ({self.mask_radius}) and mask_outer_radius ({self.mask_outer_radius}) leave nothing for "
                f"a low-pass filter to remove at image_size {self.image_size} (the farthest frequency is "
                f"{math.hypot(self.image_size // 2, self.image_size // 2):.1f} from the centre)"
            )
        _integer("sr_factor", self.sr_factor)
        if self.image_size % self.sr_factor:
            raise ValueError(f"sr_factor must divide image_size ({self.image_size}), got {self.sr_factor}")
        if not isinstance(self.blur_kernel_sizes, (list, tuple)) or not self.blur_kernel_sizes:
            raise ValueError(f"blur_kernel_sizes must be a non-empty list of odd integers, "
                             f"got {self.blur_kernel_sizes!r}")
        for size in self.blur_kernel_sizes:
            _integer("blur_kernel_sizes", size)
            if size % 2 == 0:
                raise ValueError(f"blur_kernel_sizes must be odd positive integers, got {self.blur_kernel_sizes}")
        _choices("blur_kernel_types", self.blur_kernel_types, BLUR_KERNEL_TYPES)
        _probabilities("blur_kernel_probs", self.blur_kernel_probs, len(self.blur_kernel_types))
        _range_pair("blur_sigma_x_range", self.blur_sigma_x_range, 1e-6)
        _range_pair("blur_sigma_y_range", self.blur_sigma_y_range, 1e-6)
        _range_pair("blur_rotation_range", self.blur_rotation_range)
        _range_pair("blur_beta_gaussian_range", self.blur_beta_gaussian_range, 1e-6)
        _range_pair("blur_beta_plateau_range", self.blur_beta_plateau_range, 1e-6)
        _choices("noise_types", self.noise_types, NOISE_TYPES)
        _probabilities("noise_probs", self.noise_probs, len(self.noise_types))
        _range_pair("noise_gaussian_sigma_range", self.noise_gaussian_sigma_range, 0.0)
        _range_pair("noise_poisson_scale_range", self.noise_poisson_scale_range, 1e-6)
        _number("noise_gaussian_gray_prob", self.noise_gaussian_gray_prob, 0.0, 1.0)
        _number("noise_poisson_gray_prob", self.noise_poisson_gray_prob, 0.0, 1.0)
        _number("classifier_dropout", self.classifier_dropout, 0.0, 1.0)
        _number("initializer_range", self.initializer_range, 0.0, low_open=True)
        parameters = estimated_parameters(self)
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"this config describes a model of about {parameters:.2g} parameters, more than the "
                f"{MAX_PARAMETERS:.0e} this package builds (num_hidden_layers, hidden sizes, depths or image_size "
                "out of range?)"
            )

    def _validate_backbone(self) -> None:
        backbone = self.backbone_config
        kind = backbone.model_type
        if kind not in SUPPORTED_BACKBONES:
            raise ValueError(f"backbone_config.model_type must be one of {SUPPORTED_BACKBONES}, got {kind!r}")
        _integer("backbone_config.num_channels", getattr(backbone, "num_channels", self.num_channels))
        if self.num_channels != getattr(backbone, "num_channels", self.num_channels):
            raise ValueError(f"num_channels ({self.num_channels}) differs from backbone_config.num_channels "
                             f"({backbone.num_channels})")
        if kind in VIT_FAMILY:
            for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                         "image_size"):
                _integer(f"backbone_config.{name}", getattr(backbone, name))
            if backbone.hidden_size % backbone.num_attention_heads:
                raise ValueError(
                    f"backbone_config.hidden_size ({backbone.hidden_size}) must be divisible by "
                    f"backbone_config.num_attention_heads ({backbone.num_attention_heads})"
                )
            # position embeddings tie a ViT to its size; CNN configs carry an unused image_size
            if backbone.image_size != self.image_size:
                raise ValueError(
                    f"image_size ({self.image_size}) differs from backbone_config.image_size ({backbone.image_size}); "
                    "set both to the same value"
                )
        else:
            depths, widths = getattr(backbone, "depths", None), getattr(backbone, "hidden_sizes", None)
            for name, values in (("depths", depths), ("hidden_sizes", widths)):
                if not isinstance(values, (list, tuple)) or not values:
                    raise ValueError(f"backbone_config.{name} must be a non-empty list of integers, got {values!r}")
                for value in values:
                    _integer(f"backbone_config.{name}", value)
            if len(depths) != len(widths):
                raise ValueError(f"backbone_config.depths ({depths}) and hidden_sizes ({widths}) differ in length")
            if kind == "resnet":
                _integer("backbone_config.embedding_size", backbone.embedding_size)
        if self.image_size % self.encoder_stride:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by the encoder stride ({self.encoder_stride}) "
                f"of the {kind} backbone"
            )

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
        backbone_overrides = overrides.pop("backbone_overrides", {}) or {}
        return cls(**merge_overrides(copy.deepcopy(PRESETS[name]), overrides, backbone_overrides))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MFMConfig:
        """Loads a saved config, or a preset when given a preset name that is not a local folder."""
        name = str(pretrained_model_name_or_path)
        if name in PRESETS and not os.path.isdir(name):
            return cls.from_preset(name, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _backbone_config(backbone: dict | PreTrainedConfig | None) -> PreTrainedConfig:
    """The backbone as a transformers config object (a dict names its type with ``model_type``)."""
    if backbone is None:
        backbone = beit_backbone(768, 12, 12)
    if isinstance(backbone, PreTrainedConfig):
        return backbone
    if not isinstance(backbone, dict):
        raise ValueError(f"backbone_config must be a config or a dict, got {type(backbone).__name__}")
    if "model_type" not in backbone:
        raise ValueError(f"backbone_config given as a dict needs a 'model_type' (one of {SUPPORTED_BACKBONES})")
    kwargs = dict(backbone)
    model_type = kwargs.pop("model_type")
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(f"backbone_config.model_type must be one of {SUPPORTED_BACKBONES}, got {model_type!r}")
    return AutoConfig.for_model(model_type, **kwargs)


__all__ = [
    "MAX_IMAGE_SIZE",
    "MAX_PARAMETERS",
    "OFFICIAL_IMAGE_SIZE",
    "OFFICIAL_MASK_RADIUS",
    "PRESETS",
    "MFMConfig",
    "merge_overrides",
    "official_mask_radius",
]
