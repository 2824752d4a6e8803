"""An independent re-computation of the official MFM forward pass, straight from an official state dict.

This is the parity oracle of the checkpoint converter: plain ``torch.nn.functional`` calls on the official tensors,
written from the published architecture (BEiT-style ViT blocks with a fused qkv projection and q/v biases, timm's
ResNet, the 1x1-conv + PixelShuffle decoder and the optional transformer decoder, the focal-frequency-style loss),
sharing no code with the package's models and not importing transformers. If the converted model and this module
agree on a fixed input, the key mapping is right.

Every function takes the official names (``encoder.blocks.0.attn.qkv.weight``...) and an architecture from
``official_architecture.infer_architecture``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .official_architecture import DecoderSpec, OfficialArchitecture, ResNetSpec, ViTSpec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "classification_forward",
    "frequency_loss",
    "frequency_mask",
    "frequency_transform",
    "loss_options",
    "normalize",
    "pretraining_forward",
    "resnet_features",
    "vit_tokens",
]

StateDict = Mapping[str, torch.Tensor]

# The official pipeline normalises with timm's ImageNet constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN_EPS = 1e-5  # torch BatchNorm2d default, used by timm's ResNet


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalised, channel by channel."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def frequency_mask(size: int, inner: float, outer: float, low_pass: list[bool]) -> torch.Tensor:
    """Keep-masks (B, size, size), fftshifted: a low-pass mask zeroes ``inner² <= d² < outer²`` around the centre
    ``size // 2``; a high-pass mask is its complement."""
    coords = torch.arange(size) - size // 2
    d2 = coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2
    band = (d2 >= inner**2) & (d2 < outer**2)
    low = (~band).long()
    return torch.stack([low if is_low else 1 - low for is_low in low_pass])


def frequency_transform(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Removes frequencies from [0, 1] images: FFT, centre, multiply by the keep-mask, back, real part, clamp."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1)) * keep[:, None]
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.clamp(0.0, 1.0)


def frequency_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    loss_gamma: float = 1.0,
    matrix_gamma: float = 1.0,
    ave_spectrum: bool = False,
    with_matrix: bool = False,
    log_matrix: bool = False,
    batch_matrix: bool = False,
) -> torch.Tensor:
    """Focal-frequency-style loss on whole images (patch factor 1), reduced on the removed frequencies
    (``keep`` given, MFM "masked") or over all frequencies (``keep=None``, "normal")."""
    pred_f = torch.fft.fftshift(torch.fft.fft2(prediction.float(), norm="ortho"), dim=(-2, -1))
    target_f = torch.fft.fftshift(torch.fft.fft2(target.float(), norm="ortho"), dim=(-2, -1))
    if ave_spectrum:
        pred_f, target_f = pred_f.mean(0, keepdim=True), target_f.mean(0, keepdim=True)
    squared = (pred_f - target_f).abs() ** 2  # (B, C, H, W)
    distance = torch.sqrt(squared + 1e-12) ** loss_gamma
    if with_matrix:
        weight = torch.sqrt(squared) ** matrix_gamma
        if log_matrix:
            weight = torch.log1p(weight)
        scale = weight.max() if batch_matrix else weight.flatten(-2).max(-1).values[..., None, None]
        weight = torch.nan_to_num(weight / scale, nan=0.0).clamp(0.0, 1.0)
        distance = distance * weight
    if keep is None:
        return distance.mean()
    removed = (1 - keep.float())[:, None]  # (B, 1, H, W)
    return (distance * removed).sum() / removed.sum() / prediction.shape[1]


def loss_options(config: Any) -> dict[str, float | bool]:
    """The loss settings of an MFM config (read by attribute name), as `frequency_loss` keywords."""
    names = ("loss_gamma", "matrix_gamma", "ave_spectrum", "with_matrix", "log_matrix", "batch_matrix")
    return {name: getattr(config, name) for name in names}


# ------------------------------------------------------------------------------------------------------------- ViT
def _layer_norm(x: torch.Tensor, sd: StateDict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _vit_block(
    x: torch.Tensor, sd: StateDict, p: str, heads: int, qkv_bias: bool, layer_scale: bool, eps: float
) -> torch.Tensor:
    batch, tokens, dim = x.shape
    h = _layer_norm(x, sd, f"{p}norm1", eps)
    weight = sd[f"{p}attn.qkv.weight"]  # rows: [q; k; v]
    bias = None
    if qkv_bias:
        q_bias, v_bias = sd[f"{p}attn.q_bias"], sd[f"{p}attn.v_bias"]
        bias = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # the key has no bias
    qkv = F.linear(h, weight, bias).view(batch, tokens, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
    attended = F.linear(attended, sd[f"{p}attn.proj.weight"], sd[f"{p}attn.proj.bias"])
    if layer_scale:
        attended = sd[f"{p}gamma_1"] * attended
    x = x + attended
    h = _layer_norm(x, sd, f"{p}norm2", eps)
    h = F.gelu(F.linear(h, sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"]))  # exact (erf) GELU
    h = F.linear(h, sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"])
    if layer_scale:
        h = sd[f"{p}gamma_2"] * h
    return x + h


def vit_tokens(sd: StateDict, spec: ViTSpec, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, C, S, S) -> tokens (B, 1 + N, D), CLS first, after the final norm when there is one."""
    p = spec.prefix
    proj_weight, proj_bias = sd[f"{p}patch_embed.proj.weight"], sd[f"{p}patch_embed.proj.bias"]
    patches = F.conv2d(pixel_values, proj_weight, proj_bias, stride=spec.patch_size)
    patches = patches.flatten(2).transpose(1, 2)  # (B, N, D), row-major patch order
    cls = sd[f"{p}cls_token"].expand(patches.shape[0], -1, -1)
    x = torch.cat([cls, patches], dim=1) + sd[f"{p}pos_embed"]
    for i in range(spec.depth):
        x = _vit_block(x, sd, f"{p}blocks.{i}.", spec.num_heads, spec.qkv_bias, spec.layer_scale, spec.layer_norm_eps)
    if spec.final_norm:
        x = _layer_norm(x, sd, f"{p}norm", spec.layer_norm_eps)
    return x


def _patch_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, D) -> (B, D, √N, √N), CLS dropped."""
    patches = tokens[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    return patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)


# ---------------------------------------------------------------------------------------------------------- ResNet
def _batch_norm(x: torch.Tensor, sd: StateDict, name: str, training: bool) -> torch.Tensor:
    if training:  # batch statistics; running buffers left untouched
        return F.batch_norm(x, None, None, sd[f"{name}.weight"], sd[f"{name}.bias"], True, 0.0, _BN_EPS)
    mean, var = sd[f"{name}.running_mean"], sd[f"{name}.running_var"]
    return F.batch_norm(x, mean, var, sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, _BN_EPS)


def _resnet_block(x: torch.Tensor, sd: StateDict, p: str, stride: int, block: str, training: bool) -> torch.Tensor:
    convs = 3 if block == "bottleneck" else 2
    h = x
    for j in range(1, convs + 1):
        weight = sd[f"{p}conv{j}.weight"]
        # the spatial (3x3) conv carries the stride: conv2 in a bottleneck, conv1 in a basic block
        conv_stride = stride if (j == 2 and block == "bottleneck") or (j == 1 and block == "basic") else 1
        h = F.conv2d(h, weight, stride=conv_stride, padding=weight.shape[-1] // 2)
        h = _batch_norm(h, sd, f"{p}bn{j}", training)
        if j < convs:
            h = F.relu(h)
    if f"{p}downsample.0.weight" in sd:
        shortcut = F.conv2d(x, sd[f"{p}downsample.0.weight"], stride=stride)
        shortcut = _batch_norm(shortcut, sd, f"{p}downsample.1", training)
    else:
        shortcut = x
    return F.relu(h + shortcut)


def resnet_features(
    sd: StateDict, spec: ResNetSpec, pixel_values: torch.Tensor, training: bool = False
) -> torch.Tensor:
    """Normalised images -> the last stage's feature map (B, C, S/32, S/32). ``training`` uses batch statistics."""
    p = spec.prefix
    x = F.conv2d(pixel_values, sd[f"{p}conv1.weight"], stride=2, padding=3)
    x = F.relu(_batch_norm(x, sd, f"{p}bn1", training))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, depth in enumerate(spec.depths, start=1):
        for index in range(depth):
            stride = 2 if stage > 1 and index == 0 else 1
            x = _resnet_block(x, sd, f"{p}layer{stage}.{index}.", stride, spec.block, training)
    return x


# --------------------------------------------------------------------------------------------------------- decoders
def _transformer_decoder(sd: StateDict, spec: DecoderSpec, tokens: torch.Tensor, eps: float) -> torch.Tensor:
    x = F.linear(tokens, sd["decoder.embed.weight"], sd["decoder.embed.bias"]) + sd["decoder.pos_embed"]
    for i in range(spec.depth):
        x = _vit_block(x, sd, f"decoder.blocks.{i}.", spec.num_heads, spec.qkv_bias, spec.layer_scale, eps)
    x = _layer_norm(x, sd, "decoder.norm", eps)
    x = F.conv2d(_patch_map(x), sd["decoder.pred.0.weight"], sd["decoder.pred.0.bias"])
    return F.pixel_shuffle(x, spec.stride)


def _encode(sd: StateDict, arch: OfficialArchitecture, pixel_values: torch.Tensor, training: bool) -> torch.Tensor:
    if isinstance(arch.encoder, ViTSpec):
        return vit_tokens(sd, arch.encoder, pixel_values)
    return resnet_features(sd, arch.encoder, pixel_values, training)


def pretraining_forward(
    sd: StateDict,
    arch: OfficialArchitecture,
    images: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    degraded: torch.Tensor | None = None,
    loss_on_removed: bool = True,
    loss_options: Mapping[str, float | bool] | None = None,
    training: bool = False,
) -> dict[str, torch.Tensor]:
    """The official pre-training forward on [0, 1] images (B, C, S, S).

    Give ``keep`` (B, S, S) for frequency masking, or ``degraded`` ([0, 1] images) for the restoration pretexts.
    ``loss_on_removed``: the MFM "masked" reduction (needs ``keep``), else the mean over all frequencies.
    Returns ``encoder_input`` (normalised corrupted images), ``features`` (ViT: (B, 1 + N, D) tokens; ResNet: the
    feature map), ``recon`` (B, C, S, S) and ``loss``.
    """
    if arch.decoder is None:
        raise ValueError("pretraining_forward needs a pre-training architecture (with a decoder)")
    if (keep is None) == (degraded is None):
        raise ValueError("give exactly one of keep (frequency masking) or degraded (restoration pretexts)")
    corrupted = frequency_transform(images, keep) if keep is not None else degraded
    encoder_input = normalize(corrupted)
    features = _encode(sd, arch, encoder_input, training)
    if arch.decoder.kind == "transformer":
        recon = _transformer_decoder(sd, arch.decoder, features, arch.encoder.layer_norm_eps)
    else:
        feature_map = _patch_map(features) if arch.is_vit else features
        projected = F.conv2d(feature_map, sd["decoder.0.weight"], sd["decoder.0.bias"])
        recon = F.pixel_shuffle(projected, arch.decoder.stride)
    if loss_on_removed and keep is None:
        raise ValueError("the loss on removed frequencies needs a keep-mask")
    loss = frequency_loss(recon, normalize(images), keep if loss_on_removed else None, **dict(loss_options or {}))
    return {"encoder_input": encoder_input, "features": features, "recon": recon, "loss": loss}


def classification_forward(
    sd: StateDict, arch: OfficialArchitecture, pixel_values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The official fine-tuned classifier on normalised images (eval mode): ``pooled`` (B, D) and ``logits``.

    ViT: LayerNorm(fc_norm) of the mean patch token, then ``head``. ResNet: global average pool, then ``fc``.
    """
    if isinstance(arch.encoder, ViTSpec):
        tokens = vit_tokens(sd, arch.encoder, pixel_values)
        pooled = _layer_norm(tokens[:, 1:].mean(1), sd, "fc_norm", arch.encoder.layer_norm_eps)
        logits = F.linear(pooled, sd["head.weight"], sd["head.bias"])
    else:
        pooled = resnet_features(sd, arch.encoder, pixel_values).mean(dim=(-2, -1))
        logits = F.linear(pooled, sd["fc.weight"], sd["fc.bias"])
    return {"pooled": pooled, "logits": logits}
