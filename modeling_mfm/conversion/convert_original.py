"""Converts official MFM checkpoints (github.com/Jiahao000/MFM, ``.pth``) to ``save_pretrained`` folders.

    python run_scripts/convert_original.py --checkpoint mfm_pretrain_vit_base.pth --output-dir mfm-vit-base

Steps: read the file safely (``checkpoint_loading``), infer the architecture from tensor shapes
(``official_architecture``), build the matching ``MFMConfig`` (corruption settings from the stored yacs config, else
from flags), rename and split the weights into ``MFMForPreTraining`` / ``MFMForImageClassification``, then run the
converted model and an independent re-computation of the official forward (``official_reference``) on a fixed input
and mask, and write nothing unless they agree (relative error <= 1e-5 in float32). The encoder is also exported as a
native transformers checkpoint (``<output-dir>/backbone``), and ``--push-to-hub`` publishes the folder with its model
card (``release``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..configuration_mfm import OFFICIAL_IMAGE_SIZE, MFMConfig, beit_backbone, resnet_backbone
from ..modeling_mfm import MFMForImageClassification, MFMForPreTraining, MFMPreTrainedModel
from . import official_reference as reference
from .checkpoint_loading import OfficialCheckpoint, load_official_checkpoint
from .imagenet import imagenet_labels
from .official_architecture import OfficialArchitecture, ResNetSpec, ViTSpec, infer_architecture

__all__ = [
    "ConversionResult",
    "ParityError",
    "build_config",
    "check_parity",
    "convert_checkpoint",
    "convert_state_dict",
]

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5  # max relative error (float32) between the converted model and the official forward

# Stored yacs config entry -> MFMConfig field, for the corruption and loss settings (pre-training checkpoints).
_CONFIG_FIELDS = {
    "DATA.FILTER_TYPE": "corruption",
    "DATA.MASK_RADIUS1": "mask_radius",
    "DATA.MASK_RADIUS2": "mask_outer_radius",
    "DATA.SAMPLE_RATIO": "low_pass_probability",
    "DATA.SR_FACTOR": "sr_factor",
    "MODEL.RECOVER_TARGET_TYPE": "loss_on",
    "MODEL.FREQ_LOSS.LOSS_GAMMA": "loss_gamma",
    "MODEL.FREQ_LOSS.MATRIX_GAMMA": "matrix_gamma",
    "MODEL.FREQ_LOSS.PATCH_FACTOR": "patch_factor",
    "MODEL.FREQ_LOSS.AVE_SPECTRUM": "ave_spectrum",
    "MODEL.FREQ_LOSS.WITH_MATRIX": "with_matrix",
    "MODEL.FREQ_LOSS.LOG_MATRIX": "log_matrix",
    "MODEL.FREQ_LOSS.BATCH_MATRIX": "batch_matrix",
    "DATA.BLUR.KERNEL_SIZE": "blur_kernel_sizes",
    "DATA.BLUR.KERNEL_LIST": "blur_kernel_types",
    "DATA.BLUR.KERNEL_PROB": "blur_kernel_probs",
    "DATA.BLUR.SIGMA_X": "blur_sigma_x_range",
    "DATA.BLUR.SIGMA_Y": "blur_sigma_y_range",
    "DATA.BLUR.ROTATE_ANGLE": "blur_rotation_range",
    "DATA.BLUR.BETA_GAUSSIAN": "blur_beta_gaussian_range",
    "DATA.BLUR.BETA_PLATEAU": "blur_beta_plateau_range",
    "DATA.NOISE.TYPE": "noise_types",
    "DATA.NOISE.PROB": "noise_probs",
    "DATA.NOISE.GAUSSIAN_SIGMA": "noise_gaussian_sigma_range",
    "DATA.NOISE.GAUSSIAN_GRAY_NOISE_PROB": "noise_gaussian_gray_prob",
    "DATA.NOISE.POISSON_SCALE": "noise_poisson_scale_range",
    "DATA.NOISE.POISSON_GRAY_NOISE_PROB": "noise_poisson_gray_prob",
}
_LOSS_ON = {"masked": "masked", "normal": "all"}


class ParityError(ValueError):
    """The converted model does not reproduce the official forward pass: nothing is written."""


@dataclass
class ConversionResult:
    model: MFMPreTrainedModel
    architecture: OfficialArchitecture
    unused_keys: list[str]
    parity: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- configuration
def _outer_radius(value: Any, image_size: int) -> float | None:
    """The official "no outer bound" is a radius beyond every frequency (999); MFMConfig spells it None."""
    if value is None:
        return None
    half = image_size // 2
    return None if float(value) ** 2 > 2 * half * half else float(value)


def _stored_settings(checkpoint: OfficialCheckpoint, image_size: int) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for dotted, name in _CONFIG_FIELDS.items():
        value = checkpoint.config_value(dotted)
        if value is None:
            continue
        if name == "loss_on":
            if value not in _LOSS_ON:
                raise ValueError(f"stored MODEL.RECOVER_TARGET_TYPE must be 'masked' or 'normal', got {value!r}")
            value = _LOSS_ON[value]
        elif name == "mask_outer_radius":
            value = _outer_radius(value, image_size)
        elif isinstance(value, list):
            value = list(value)
        settings[name] = value
    if settings.get("corruption", "mfm") != "mfm" and settings.get("loss_on") == "masked":
        raise ValueError("stored config combines a restoration pretext with RECOVER_TARGET_TYPE=masked")
    return settings


def build_config(
    arch: OfficialArchitecture,
    checkpoint: OfficialCheckpoint | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MFMConfig:
    """The MFMConfig of a converted checkpoint.

    Sizes come from ``arch``. Corruption and loss settings come from the checkpoint's stored yacs config when it has
    one; ``overrides`` (the command-line flags: corruption, mask_radius, mask_outer_radius, low_pass_probability,
    loss_on, sr_factor, image_size) fill what it lacks, and may not contradict it. Without either, the official
    defaults apply (radius 16, no outer bound, low-pass probability 0.5 for ViTs and 0.3 for ResNets).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    checkpoint = checkpoint or OfficialCheckpoint({})
    enc = arch.encoder
    if isinstance(enc, ViTSpec):
        if "image_size" in overrides and overrides["image_size"] != enc.image_size:
            raise ValueError(
                f"--image-size {overrides['image_size']} contradicts the position embedding ({enc.image_size})"
            )
        image_size = enc.image_size
        init_values = checkpoint.config_value("MODEL.VIT.INIT_VALUES")
        backbone = beit_backbone(
            enc.embed_dim,
            enc.depth,
            enc.num_heads,
            image_size=image_size,
            patch_size=enc.patch_size,
            intermediate_size=enc.mlp_hidden,
            num_channels=enc.in_chans,
            layer_scale_init_value=(float(init_values or 0.1) if enc.layer_scale else 0.0),
            use_mean_pooling=arch.task == "classification",
        )
    else:
        stored_size = checkpoint.config_value("DATA.IMG_SIZE") or (checkpoint.args or {}).get("img_size")
        image_size = int(overrides.get("image_size") or stored_size or OFFICIAL_IMAGE_SIZE)
        backbone = resnet_backbone(
            list(enc.depths),
            hidden_sizes=list(enc.widths),
            embedding_size=enc.stem_width,
            layer_type=enc.block,
            num_channels=enc.in_chans,
        )
    kwargs: dict[str, Any] = {
        "backbone_config": backbone,
        "image_size": image_size,
        "num_channels": enc.in_chans,
        "low_pass_probability": 0.5 if arch.is_vit else 0.3,
    }
    if arch.task == "pretraining":
        stored = _stored_settings(checkpoint, image_size)
        flags = {k: v for k, v in overrides.items() if k != "image_size"}
        if "mask_outer_radius" in flags:
            flags["mask_outer_radius"] = _outer_radius(flags["mask_outer_radius"], image_size)
        for name, value in flags.items():
            if name in stored and stored[name] != value:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} contradicts the checkpoint's stored config "
                    f"({stored[name]!r})"
                )
        kwargs.update(flags)
        kwargs.update(stored)
        if kwargs.get("corruption", "mfm") != "mfm":
            kwargs.setdefault("loss_on", "all")
        dec = arch.decoder
        if dec is not None and dec.kind == "transformer":
            kwargs.update(
                decoder_depth=dec.depth, decoder_hidden_size=dec.hidden_size, decoder_num_attention_heads=dec.num_heads
            )
    else:
        ignored = sorted(k for k in overrides if k != "image_size")
        if ignored:
            logger.warning("pre-training settings %s do not apply to a classifier and are ignored", ignored)
        kwargs["num_labels"] = arch.num_classes
        if arch.num_classes == 1000:
            kwargs["id2label"] = dict(enumerate(imagenet_labels()))
            kwargs["label2id"] = {label: i for i, label in kwargs["id2label"].items()}
    return MFMConfig(**kwargs)




# ----------------------------------------------------------------------------------------------------- weights
class _Renamer:
    """Builds our state dict from the official one, remembering which official keys were used or missing."""

    def __init__(self, official: Mapping[str, torch.Tensor]) -> None:
        self.official = official
        self.out: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}  # our key -> official key, for error messages
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.official:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.official[key]

    def put(self, ours: str, tensor: torch.Tensor | None, official: str) -> None:
        if tensor is not None:
            self.out[ours] = tensor
            self.source[ours] = official

    def copy(self, ours: str, official: str) -> None:
        self.put(ours, self.take(official), official)

    def copy_module(self, ours: str, official: str, names: Sequence[str] = ("weight", "bias")) -> None:
        for name in names:
            self.copy(f"{ours}.{name}", f"{official}.{name}")

    def vit_block(self, ours: str, official: str, qkv_bias: bool, layer_scale: bool) -> None:
        """One BEiT-style block: fused qkv rows [q; k; v] split into q/k/v projections; k has no bias."""
        self.copy_module(f"{ours}.layernorm_before", f"{official}.norm1")
        self.copy_module(f"{ours}.layernorm_after", f"{official}.norm2")
        qkv_key = f"{official}.attn.qkv.weight"
        qkv = self.take(qkv_key)
        if qkv is not None:
            if qkv.dim() != 2 or qkv.shape[0] % 3:
                raise ValueError(
                    f"{qkv_key!r} has shape {tuple(qkv.shape)}: expected (3 * dim, dim) fused q, k, v rows"
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                self.put(f"{ours}.attention.{name}.weight", part.clone(), qkv_key)
        if qkv_bias:
            self.copy(f"{ours}.attention.q_proj.bias", f"{official}.attn.q_bias")
            self.copy(f"{ours}.attention.v_proj.bias", f"{official}.attn.v_bias")
        elif qkv is not None:  # QKV_BIAS=False: our projections have biases, set them to zero
            zeros = torch.zeros(qkv.shape[0] // 3, dtype=qkv.dtype)
            self.put(f"{ours}.attention.q_proj.bias", zeros, qkv_key)
            self.put(f"{ours}.attention.v_proj.bias", zeros.clone(), qkv_key)
        self.copy_module(f"{ours}.attention.o_proj", f"{official}.attn.proj")
        self.copy_module(f"{ours}.mlp.fc1", f"{official}.mlp.fc1")
        self.copy_module(f"{ours}.mlp.fc2", f"{official}.mlp.fc2")
        if layer_scale:
            self.copy(f"{ours}.lambda_1", f"{official}.gamma_1")
            self.copy(f"{ours}.lambda_2", f"{official}.gamma_2")

    def vit_encoder(self, spec: ViTSpec, ours: str) -> None:
        p = spec.prefix
        self.copy(f"{ours}.embeddings.cls_token", f"{p}cls_token")
        self.copy(f"{ours}.embeddings.position_embeddings", f"{p}pos_embed")
        self.copy_module(f"{ours}.embeddings.patch_embeddings.projection", f"{p}patch_embed.proj")
        for i in range(spec.depth):
            self.vit_block(f"{ours}.layers.{i}", f"{p}blocks.{i}", spec.qkv_bias, spec.layer_scale)
        if spec.final_norm:
            self.copy_module(f"{ours}.layernorm", f"{p}norm")

    def batch_norm(self, ours: str, official: str) -> None:
        self.copy_module(ours, official, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    def resnet_encoder(self, spec: ResNetSpec, ours: str) -> None:
        p = spec.prefix
        self.copy(f"{ours}.embedder.embedder.convolution.weight", f"{p}conv1.weight")
        self.batch_norm(f"{ours}.embedder.embedder.normalization", f"{p}bn1")
        convs = 3 if spec.block == "bottleneck" else 2
        for stage, depth in enumerate(spec.depths):
            for index in range(depth):
                src, dst = f"{p}layer{stage + 1}.{index}", f"{ours}.encoder.stages.{stage}.layers.{index}"
                for j in range(convs):
                    self.copy(f"{dst}.layer.{j}.convolution.weight", f"{src}.conv{j + 1}.weight")
                    self.batch_norm(f"{dst}.layer.{j}.normalization", f"{src}.bn{j + 1}")
                if f"{src}.downsample.0.weight" in self.official:
                    self.copy(f"{dst}.shortcut.convolution.weight", f"{src}.downsample.0.weight")
                    self.batch_norm(f"{dst}.shortcut.normalization", f"{src}.downsample.1")


def convert_state_dict(
    official: Mapping[str, torch.Tensor], arch: OfficialArchitecture, expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official weights -> our parameter names, checked against ``expected`` (the target model's state dict).

    Returns ``(state_dict, unused_official_keys)``. Raises ValueError listing missing official keys, shape
    mismatches (official name, its shape, the expected shape) or parameters the checkpoint cannot fill.
    """
    r = _Renamer(official)
    enc = arch.encoder
    backbone = "mfm.backbone"
    if isinstance(enc, ViTSpec):
        r.vit_encoder(enc, backbone)
    else:
        r.resnet_encoder(enc, backbone)
    if arch.task == "pretraining":
        dec = arch.decoder
        if dec is not None and dec.kind == "transformer":
            r.copy_module("decoder.embed", "decoder.embed")
            r.copy("decoder.position_embeddings", "decoder.pos_embed")
            for i in range(dec.depth):
                r.vit_block(f"decoder.layers.{i}", f"decoder.blocks.{i}", dec.qkv_bias, dec.layer_scale)
            r.copy_module("decoder.layernorm", "decoder.norm")
            r.copy_module("decoder.projection", "decoder.pred.0")
        else:
            r.copy_module("decoder.projection", "decoder.0")
    elif isinstance(enc, ViTSpec):
        r.copy_module("mfm.fc_norm", "fc_norm")
        r.copy_module("classifier", "head")
    else:
        r.copy_module("classifier", "fc")

    if r.missing:
        raise ValueError(f"the checkpoint lacks {len(r.missing)} key(s) this architecture needs: {r.missing[:10]}")
    mismatched = [
        f"{r.source[k]} {tuple(v.shape)} -> {k} expects {tuple(expected[k].shape)}"
        for k, v in r.out.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise ValueError(f"shape mismatch for {len(mismatched)} key(s): {mismatched[:10]}")
    unfilled = sorted(set(expected) - set(r.out))
    if unfilled:
        raise ValueError(f"the checkpoint has nothing for {len(unfilled)} parameter(s) of the model: {unfilled[:10]}")
    unknown = sorted(set(r.out) - set(expected))
    if unknown:
        raise ValueError(f"converted names unknown to the model (converter and model disagree): {unknown[:10]}")
    converted = {k: v.to(expected[k].dtype).contiguous() for k, v in r.out.items()}
    return converted, sorted(set(official) - r.used)


# ------------------------------------------------------------------------------------------------------ parity
def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    if ours.shape != theirs.shape:
        return math.inf
    scale = theirs.detach().abs().max().clamp_min(1e-12)
    return float((ours.detach().float() - theirs.detach().float()).abs().max() / scale)


def _parity_inputs(config: MFMConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    images = torch.rand(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    return images, (images + 0.1 * noise).clamp(0.0, 1.0)


@torch.no_grad()
def check_parity(
    model: MFMPreTrainedModel,
    official: Mapping[str, torch.Tensor],
    arch: OfficialArchitecture,
    *,
    batch_size: int = 2,
    seed: int = 0,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Runs the converted model and the independent official forward on fixed random images (and fixed frequency
    masks: low-pass, high-pass, ... or a fixed degraded image for the restoration pretexts), in eval mode.

    Returns the relative errors ``max|ours - official| / max|official|`` per output; raises ParityError when one
    exceeds ``tolerance``.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance (--max-relative-error) must be >= 0, got {tolerance}")
    config = model.config
    model.eval()
    images, degraded = _parity_inputs(config, batch_size, seed)
    mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std).view(1, -1, 1, 1)
    if tuple(config.image_mean) != reference.IMAGENET_MEAN or tuple(config.image_std) != reference.IMAGENET_STD:
        raise ValueError("the official models normalise with the ImageNet mean/std; the config uses other values")
    pixel_values = (images - mean) / std
    errors: dict[str, float] = {}
    if arch.task == "pretraining":
        if config.patch_factor != 1:
            raise ValueError(f"patch_factor {config.patch_factor}: the parity check supports the official value 1")
        loss_options = reference.loss_options(config)
        if config.corruption == "mfm":
            outer = config.mask_outer_radius if config.mask_outer_radius is not None else math.inf
            low_pass = [i % 2 == 0 for i in range(batch_size)]  # low-pass, high-pass, low-pass, ...
            keep = reference.frequency_mask(config.image_size, config.mask_radius, outer, low_pass)
            theirs = reference.pretraining_forward(
                official, arch, images, keep=keep, loss_on_removed=config.loss_on == "masked", loss_options=loss_options
            )
            ours = model(pixel_values, frequency_mask=keep, return_dict=True)
        else:
            theirs = reference.pretraining_forward(
                official, arch, images, degraded=degraded, loss_on_removed=False, loss_options=loss_options
            )
            ours = model(pixel_values, degraded_pixel_values=(degraded - mean) / std, return_dict=True)
        features = model.mfm(ours.corrupted_pixel_values, return_dict=True).last_hidden_state
        errors["encoder_input"] = _relative_error(ours.corrupted_pixel_values, theirs["encoder_input"])
        errors["features"] = _relative_error(features, theirs["features"])
        errors["reconstruction"] = _relative_error(ours.reconstruction, theirs["recon"])
        errors["loss"] = _relative_error(ours.loss, theirs["loss"])
    else:
        theirs = reference.classification_forward(official, arch, pixel_values)
        errors["pooled"] = _relative_error(model.mfm(pixel_values, return_dict=True).pooler_output, theirs["pooled"])
        errors["logits"] = _relative_error(model(pixel_values, return_dict=True).logits, theirs["logits"])
    failed = {k: v for k, v in errors.items() if not v <= tolerance}
    if failed:
        raise ParityError(
            f"the converted model differs from the official forward (relative error > {tolerance}): "
            + ", ".join(f"{k} {v:.3g}" for k, v in failed.items())
            + ". Wrong head count (--num-heads)? Nothing was written."
        )
    return errors


# ------------------------------------------------------------------------------------------------- conversion
def convert_checkpoint(
    checkpoint: str | os.PathLike | OfficialCheckpoint,
    *,
    task: str | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> ConversionResult:
    """Reads, converts and parity-checks an official checkpoint; returns the model (nothing is written)."""
    if not isinstance(checkpoint, OfficialCheckpoint):
        checkpoint = load_official_checkpoint(checkpoint)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    arch = infer_architecture(
        state_dict, checkpoint.config, task=task, num_heads=num_heads, decoder_num_heads=decoder_num_heads
    )
    logger.info("architecture: %s", arch.describe())
    config = build_config(arch, checkpoint, overrides)
    model_class = MFMForPreTraining if arch.task == "pretraining" else MFMForImageClassification
    model = model_class(config)
    converted, unused = convert_state_dict(state_dict, arch, model.state_dict())
    model.load_state_dict(converted, strict=True)
    if unused:
        logger.warning("%d checkpoint key(s) not used: %s", len(unused), unused)
    parity = check_parity(model, state_dict, arch, tolerance=tolerance)
    return ConversionResult(model=model, architecture=arch, unused_keys=unused, parity=parity)


def write_converted(result: ConversionResult, output_dir: str | os.PathLike, export_backbone: bool = True) -> None:
    """``save_pretrained`` (weights, config with auto_map, remote code, preprocessor_config.json), plus the encoder
    as a native transformers checkpoint in ``<output_dir>/backbone``."""
    output_dir = os.fspath(output_dir)
    result.model.save_pretrained(output_dir)
    if export_backbone:
        result.model.export_backbone(os.path.join(output_dir, "backbone"))
