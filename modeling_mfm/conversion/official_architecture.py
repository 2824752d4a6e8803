"""Architecture of an official MFM checkpoint, inferred from its tensor shapes.

The official release ships weights without a machine-readable model description (the yacs config is there in the
training checkpoints, not always in cleaned ones), so sizes are read from the tensors themselves:

* ViT (BEiT-style, ``patch_embed.proj``): embed dim and patch size from the patch projection, image size from the
  position embedding (``1 + (S / p)²`` tokens), depth from the block indices, MLP ratio from ``fc1``, q/v biases and
  layer scale (``gamma_1``/``gamma_2``) from their presence. Heads cannot be read from shapes: ``num_heads`` argument,
  else the stored config's ``MODEL.VIT.NUM_HEADS``, else ``embed_dim // 64`` (64-dim heads, as ViT-S/B/L).
* ResNet (timm, ``conv1``/``layerK.N``): stem width, stage depths, stage widths and block type.
* Decoder: the 1x1 conv + PixelShuffle (``decoder.0``), or the transformer decoder (``decoder.embed``,
  ``decoder.pos_embed``, ``decoder.blocks.N``, ``decoder.norm``, ``decoder.pred.0``).
* Task: pre-training checkpoints prefix the encoder with ``encoder.``; fine-tuned ones have no prefix and a
  classification head (``head`` + ``fc_norm`` for ViT, ``fc`` for ResNet).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DecoderSpec",
    "OfficialArchitecture",
    "ResNetSpec",
    "ViTSpec",
    "infer_architecture",
]

logger = logging.getLogger(__name__)

TASKS = ("pretraining", "classification")


@dataclass(frozen=True)
class ViTSpec:
    """The official BEiT-style ViT encoder. ``prefix`` is "encoder." (pre-training) or "" (fine-tuned)."""

    prefix: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    in_chans: int
    mlp_hidden: int
    qkv_bias: bool
    layer_scale: bool
    final_norm: bool
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ResNetSpec:
    """The timm ResNet encoder: stem conv 7x7/2 + max-pool, four stages of basic or bottleneck blocks."""

    prefix: str
    in_chans: int
    stem_width: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]  # output channels of each stage
    block: str  # "bottleneck" or "basic"


@dataclass(frozen=True)
class DecoderSpec:
    """``kind="conv"``: 1x1 conv to stride²·C + PixelShuffle. ``kind="transformer"``: the official ViT decoder."""

    kind: str
    stride: int
    hidden_size: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_hidden: int = 0
    qkv_bias: bool = True
    layer_scale: bool = False


@dataclass(frozen=True)
class OfficialArchitecture:
    task: str  # "pretraining" or "classification"
    encoder: ViTSpec | ResNetSpec
    decoder: DecoderSpec | None = None
    num_classes: int = 0

    @property
    def is_vit(self) -> bool:
        return isinstance(self.encoder, ViTSpec)

    def describe(self) -> str:
        enc = self.encoder
        if isinstance(enc, ViTSpec):
            text = (
                f"ViT (BEiT-style) dim {enc.embed_dim}, depth {enc.depth}, heads {enc.num_heads}, "
                f"patch {enc.patch_size}, image {enc.image_size}, MLP {enc.mlp_hidden}, layer scale {enc.layer_scale}"
            )
        else:
            text = f"ResNet ({enc.block}) depths {list(enc.depths)}, widths {list(enc.widths)}, stem {enc.stem_width}"
        if self.decoder is not None and self.decoder.kind == "transformer":
            dec = self.decoder
            text += f"; transformer decoder dim {dec.hidden_size}, depth {dec.depth}, heads {dec.num_heads}"
        elif self.decoder is not None:
            text += f"; 1x1-conv decoder, stride {self.decoder.stride}"
        if self.task == "classification":
            text += f"; classifier with {self.num_classes} classes"
        return f"{self.task}: {text}"


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"missing key {key!r}: the checkpoint does not have the official layout")
    shape = tuple(state_dict[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {shape}, expected a {ndim}-d tensor")
    return shape


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct N in keys matching ``pattern`` (a regex with one group), checked to be 0..n-1."""
    regex = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})
    if found != list(range(len(found))):
        raise ValueError(f"block indices {found} of {pattern!r} are not contiguous from 0: missing blocks")
    return found


def _config_value(config: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _heads(
    dim: int, explicit: int | None, stored: Any, stored_dim: Any, default_width: int, flag: str
) -> int:
    if explicit is not None:
        heads = explicit
    elif isinstance(stored, int) and stored_dim == dim:
        heads = stored
    else:
        heads = max(1, dim // default_width)
        logger.warning("no head count stored for width %d: assuming %d heads (pass %s to override)", dim, heads, flag)
    if heads <= 0 or dim % heads:
        raise ValueError(f"{flag} must be a positive divisor of the width {dim}, got {heads}")
    return heads


def _infer_vit(
    state_dict: Mapping[str, torch.Tensor], prefix: str, num_heads: int | None, config: Mapping[str, Any] | None
) -> ViTSpec:
    p = prefix
    relative = (f"{p}rel_pos_bias.relative_position_bias_table", f"{p}blocks.0.attn.relative_position_bias_table")
    for unsupported in relative:
        if unsupported in state_dict:
            raise ValueError(
                f"{unsupported!r}: relative position bias (MODEL.VIT.USE_RPB / USE_SHARED_RPB) is not used by the "
                "released MFM models and is not supported by this converter"
            )
    embed_dim, in_chans, ph, pw = _shape(state_dict, f"{p}patch_embed.proj.weight", 4)
    if ph != pw:
        raise ValueError(f"non-square patches {ph}x{pw} are not supported")
    pos = _shape(state_dict, f"{p}pos_embed", 3)
    if pos[-1] != embed_dim:
        raise ValueError(f"{p}pos_embed width {pos[-1]} differs from the patch embedding width {embed_dim}")
    grid = math.isqrt(pos[1] - 1)
    if grid * grid != pos[1] - 1:
        raise ValueError(
            f"{p}pos_embed has {pos[1]} tokens: expected 1 (CLS) + a square grid of patches, found no square"
        )
    _shape(state_dict, f"{p}cls_token", 3)
    blocks = _indices(state_dict, rf"^{re.escape(p)}blocks\.(\d+)\.")
    if not blocks:
        raise ValueError(f"no transformer blocks ({p}blocks.N.*) in the checkpoint")
    mlp_hidden = _shape(state_dict, f"{p}blocks.0.mlp.fc1.weight", 2)[0]
    heads = _heads(
        embed_dim,
        num_heads,
        _config_value(config, "MODEL.VIT.NUM_HEADS"),
        _config_value(config, "MODEL.VIT.EMBED_DIM"),
        64,
        "--num-heads",
    )
    return ViTSpec(
        prefix=p,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=heads,
        patch_size=ph,
        image_size=grid * ph,
        in_chans=in_chans,
        mlp_hidden=mlp_hidden,
        qkv_bias=f"{p}blocks.0.attn.q_bias" in state_dict,
        layer_scale=f"{p}blocks.0.gamma_1" in state_dict,
        final_norm=f"{p}norm.weight" in state_dict,
    )


def _infer_resnet(state_dict: Mapping[str, torch.Tensor], prefix: str) -> ResNetSpec:
    p = prefix
    stem_width, in_chans, kh, kw = _shape(state_dict, f"{p}conv1.weight", 4)
    if (kh, kw) != (7, 7):
        raise ValueError(f"{p}conv1 is {kh}x{kw}: only the plain 7x7 ResNet stem is supported (no deep stems)")
    block = "bottleneck" if f"{p}layer1.0.conv3.weight" in state_dict else "basic"
    depths, widths = [], []
    for stage in range(1, 5):
        blocks = _indices(state_dict, rf"^{re.escape(p)}layer{stage}\.(\d+)\.")
        if not blocks:
            raise ValueError(f"missing key {p}layer{stage}.0.conv1.weight: a ResNet needs four stages")
        last_conv = "conv3" if block == "bottleneck" else "conv2"
        out_channels = _shape(state_dict, f"{p}layer{stage}.0.{last_conv}.weight", 4)[0]
        if block == "bottleneck":
            width = _shape(state_dict, f"{p}layer{stage}.0.conv1.weight", 4)[0]
            if width * 4 != out_channels:
                raise ValueError(
                    f"{p}layer{stage} bottleneck width {width} is not out_channels/4 ({out_channels}/4): grouped or "
                    "wide ResNets are not supported"
                )
        depths.append(len(blocks))
        widths.append(out_channels)
    if f"{p}layer5.0.conv1.weight" in state_dict:
        raise ValueError("ResNets with more than four stages are not supported")
    return ResNetSpec(p, in_chans, stem_width, tuple(depths), tuple(widths), block)


def _infer_decoder(
    state_dict: Mapping[str, torch.Tensor],
    encoder: ViTSpec | ResNetSpec,
    config: Mapping[str, Any] | None,
    decoder_num_heads: int | None,
) -> DecoderSpec:
    in_chans = encoder.in_chans
    if "decoder.0.weight" in state_dict:
        out_channels, width, kh, kw = _shape(state_dict, "decoder.0.weight", 4)
        stride = math.isqrt(out_channels // in_chans)
        if (kh, kw) != (1, 1) or stride * stride * in_chans != out_channels:
            raise ValueError(
                f"decoder.0.weight has shape {(out_channels, width, kh, kw)}: expected a 1x1 conv to "
                f"stride²·{in_chans} channels"
            )
        return DecoderSpec(kind="conv", stride=stride)
    if "decoder.embed.weight" in state_dict:
        if not isinstance(encoder, ViTSpec):
            raise ValueError("a transformer decoder (decoder.embed) needs a ViT encoder")
        hidden, _ = _shape(state_dict, "decoder.embed.weight", 2)
        blocks = _indices(state_dict, r"^decoder\.blocks\.(\d+)\.")
        if not blocks:
            raise ValueError("missing key 'decoder.blocks.0.attn.qkv.weight': a transformer decoder needs blocks")
        out_channels = _shape(state_dict, "decoder.pred.0.weight", 4)[0]
        stride = math.isqrt(out_channels // in_chans)
        heads = _heads(
            hidden,
            decoder_num_heads,
            _config_value(config, "MODEL.VIT.DECODER.NUM_HEADS"),
            _config_value(config, "MODEL.VIT.DECODER.EMBED_DIM"),
            32,  # the official default decoder: 512 wide, 16 heads
            "--decoder-num-heads",
        )
        return DecoderSpec(
            kind="transformer",
            stride=stride,
            hidden_size=hidden,
            depth=len(blocks),
            num_heads=heads,
            mlp_hidden=_shape(state_dict, "decoder.blocks.0.mlp.fc1.weight", 2)[0],
            qkv_bias="decoder.blocks.0.attn.q_bias" in state_dict,
            layer_scale="decoder.blocks.0.gamma_1" in state_dict,
        )
    raise ValueError(
        "a pre-training checkpoint needs a decoder: missing key 'decoder.0.weight' (1x1-conv decoder) or "
        "'decoder.embed.weight' (transformer decoder)"
    )


def infer_architecture(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    task: str | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> OfficialArchitecture:
    """Reads the architecture of an official checkpoint from its tensor shapes.

    Args:
        state_dict: official parameter names -> tensors.
        config: the stored yacs config as plain dicts (used only for head counts), or None.
        task: "pretraining" or "classification" to check the detection; None to detect.
        num_heads, decoder_num_heads: head counts, overriding the stored config and the defaults.

    Raises:
        ValueError: unknown layout, a key needed for inference is missing, or ``task`` does not fit the checkpoint.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    pretraining = any(k.startswith("encoder.") for k in state_dict)
    detected = "pretraining" if pretraining else "classification"
    if task is not None and task != detected:
        if detected == "pretraining":
            raise ValueError(
                "this is a pre-training checkpoint (encoder.* and decoder.* keys): it converts to MFMForPreTraining "
                "(--task pretraining); MFMForImageClassification.from_pretrained(<converted folder>) then adds a new "
                "head for fine-tuning"
            )
        raise ValueError(
            "this is a fine-tuned checkpoint (no encoder.* prefix): it converts to MFMForImageClassification "
            "(--task classification)"
        )
    prefix = "encoder." if pretraining else ""
    if f"{prefix}patch_embed.proj.weight" in state_dict:
        encoder: ViTSpec | ResNetSpec = _infer_vit(state_dict, prefix, num_heads, config)
    elif f"{prefix}conv1.weight" in state_dict:
        encoder = _infer_resnet(state_dict, prefix)
    else:
        sample = sorted(state_dict)[:6]
        raise ValueError(
            "unrecognised architecture: expected an official ViT (patch_embed.proj.weight) or timm ResNet "
            f"(conv1.weight) encoder{' under encoder.' if prefix else ''}; first keys are {sample}"
        )

    if pretraining:
        decoder = _infer_decoder(state_dict, encoder, config, decoder_num_heads)
        return OfficialArchitecture("pretraining", encoder, decoder)

    if isinstance(encoder, ViTSpec):
        if "fc_norm.weight" not in state_dict:
            raise ValueError(
                "missing key 'fc_norm.weight': only mean-pooling ViT classifiers (MODEL.VIT.USE_MEAN_POOLING=True, "
                "the official fine-tuning recipe) are supported"
            )
        num_classes = _shape(state_dict, "head.weight", 2)[0]
    else:
        num_classes = _shape(state_dict, "fc.weight", 2)[0]
    return OfficialArchitecture("classification", encoder, None, num_classes)
