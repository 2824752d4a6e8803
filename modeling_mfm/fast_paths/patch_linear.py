"""The two patch convolutions of an MFM ViT as matrix products: the patch embedding (kernel = stride) and the
decoder's 1x1 convolution before PixelShuffle. Each becomes one GEMM over the patches, with the convolution's
parameters unchanged (shared, same names and shapes: checkpoints and the official conversion are untouched).

Why: as cuDNN convolutions, NCHW -> NHWC conversions included, they take many times as long as the two GEMMs they
amount to (the profile: docs/performance.md). The function is the same; only the order in which the products are
summed may differ, as between any two kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import MissingInternal, vit_encoders

__all__ = [
    "PatchEmbeddingProjection",
    "PointwiseProjection",
    "is_patch_convolution",
    "is_plain",
    "use_gemm_decoder_projection",
    "use_gemm_patch_embeddings",
]


def is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` computes exactly what ``cls.forward`` does: its class is ``cls`` (no subclass, no adapter such as
    PEFT's LoRA layers), it has no hooks, and no forward was set on the instance (as Accelerate's offloading does)."""
    return (
        type(module) is cls
        and getattr(module.forward, "__func__", None) is cls.forward
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
    )


def is_patch_convolution(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


class _SharedConv2d(nn.Conv2d):
    """A Conv2d built on the meta device that adopts another convolution's parameters (no copy)."""

    @classmethod
    def sharing(cls, conv: nn.Conv2d) -> _SharedConv2d:
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None,
                    device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def to_conv(self) -> nn.Conv2d:
        """The plain convolution, sharing this layer's parameters (the formulation the official code runs)."""
        convolution = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                bias=self.bias is not None, device="meta")
        convolution.weight, convolution.bias = self.weight, self.bias
        return convolution


class PatchEmbeddingProjection(_SharedConv2d):
    """A ``Conv2d`` whose kernel equals its stride (no padding, dilation or groups), computed as one GEMM over the
    flattened patches; its output is the convolution's (B, D, H / p, W / p), as a channel-last view. Like the
    convolution, it ignores the rows and columns that do not fill a whole patch."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PatchEmbeddingProjection:
        """The same layer, with ``conv``'s parameters (shared, not copied)."""
        if not is_patch_convolution(conv):
            raise ValueError(f"{conv} is not a patch convolution (kernel = stride, no padding, dilation or groups)")
        return cls.sharing(conv)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        if channels != self.in_channels:
            raise ValueError(f"the patch embedding expects {self.in_channels} channels, got {channels}")
        patch_height, patch_width = self.kernel_size
        rows, columns = height // patch_height, width // patch_width
        patches = pixel_values[:, :, : rows * patch_height, : columns * patch_width]
        patches = patches.reshape(batch, channels, rows, patch_height, columns, patch_width)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, -1)  # (c, i, j): the weight's order
        tokens = F.linear(patches, self.weight.flatten(1), self.bias)
        return tokens.view(batch, rows, columns, -1).permute(0, 3, 1, 2)


class PointwiseProjection(_SharedConv2d):
    """A 1x1 ``Conv2d`` computed as one GEMM over the positions, reading its (B, C, h, w) input through a
    channel-last view (the MFM decoders hand it channel-last features) and returning a channel-last view."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseProjection:
        if not (is_patch_convolution(conv) and tuple(conv.kernel_size) == (1, 1)):
            raise ValueError(f"{conv} is not a 1x1 convolution")
        return cls.sharing(conv)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = F.linear(features.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return projected.permute(0, 3, 1, 2)


def _swap(parent: nn.Module, name: str, replacement: nn.Module) -> Callable[[], None]:
    """Puts ``replacement`` in place of ``parent.<name>``; the returned undo puts the original back (unless the
    attribute was replaced again meanwhile, e.g. by an adapter, which then stays)."""
    original = getattr(parent, name)
    setattr(parent, name, replacement)

    def undo() -> None:
        if getattr(parent, name) is replacement:
            setattr(parent, name, original)

    return undo


def use_gemm_patch_embeddings(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """The patch-embedding convolution of every BEiT/ViT encoder under ``model`` as a `PatchEmbeddingProjection`
    sharing its parameters; a hooked, adapted or subclassed convolution keeps its own forward. Returns how many,
    and the undo."""
    undos = []
    for encoder in vit_encoders(model):
        patch_embeddings = getattr(encoder.embeddings, "patch_embeddings", None)
        projection = getattr(patch_embeddings, "projection", None)
        if not isinstance(projection, nn.Conv2d):
            raise MissingInternal(f"{type(encoder).__name__} has no embeddings.patch_embeddings.projection convolution")
        if is_plain(projection, nn.Conv2d) and is_patch_convolution(projection):
            undos.append(_swap(patch_embeddings, "projection", PatchEmbeddingProjection.from_conv(projection)))
    return len(undos), lambda: [undo() for undo in undos]


def use_gemm_decoder_projection(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """The MFM decoder's 1x1 convolution (``model.decoder.projection``, before PixelShuffle) as a
    `PointwiseProjection` sharing its parameters, unless it is hooked, adapted or subclassed. Returns 0 or 1, and
    the undo."""
    decoder = getattr(model, "decoder", None)
    projection = getattr(decoder, "projection", None)
    if not (is_plain(projection, nn.Conv2d) and is_patch_convolution(projection) and projection.kernel_size == (1, 1)):
        return 0, lambda: None
    return 1, _swap(decoder, "projection", PointwiseProjection.from_conv(projection))
