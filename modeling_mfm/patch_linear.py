"""The two patch convolutions of an MFM ViT as matrix products: the patch embedding (kernel = stride) and the
decoder's 1x1 convolution followed by PixelShuffle. Each becomes one GEMM over the patches, with the convolution's
parameters unchanged (same names and shapes: checkpoints and the official conversion are untouched).

Why: in the compiled ViT-B/16 step on an H100 (bf16, batch 128, about 42 ms), these two cuDNN convolutions took
about 2.1 ms per step, forward and backward, NCHW -> NHWC conversions included, for work that is two
(25,088 x 768 x 768) GEMMs: about 0.04 ms each at the GEMM rate of the same step. The function is
the same; only the order in which the products are summed may differ, as between any two kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchEmbeddingProjection",
    "project_and_shuffle",
    "use_convolution_patch_projection",
    "use_gemm_patch_projection",
]


class PatchEmbeddingProjection(nn.Conv2d):
    """A ``Conv2d`` whose kernel equals its stride (no padding, dilation or groups), computed as one GEMM over the
    flattened patches; its output is the convolution's (B, D, H / p, W / p), as a channel-last view. Like the
    convolution, it ignores the rows and columns that do not fill a whole patch."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PatchEmbeddingProjection:
        """The same layer, with ``conv``'s parameters (shared, not copied)."""
        if not is_patch_convolution(conv):
            raise ValueError(f"{conv} is not a patch convolution (kernel = stride, no padding, dilation or groups)")
        projection = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None,
                         device="meta")
        projection.weight = conv.weight
        projection.bias = conv.bias
        return projection

    def to_conv(self) -> nn.Conv2d:
        """The plain convolution, sharing this layer's parameters (the formulation the official code runs)."""
        convolution = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                bias=self.bias is not None, device="meta")
        convolution.weight, convolution.bias = self.weight, self.bias
        return convolution

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


def is_patch_convolution(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


def _patch_embeddings(backbone: nn.Module) -> nn.Module | None:
    return getattr(getattr(backbone, "embeddings", None), "patch_embeddings", None)


def use_gemm_patch_projection(backbone: nn.Module) -> bool:
    """Swaps a transformers ViT / BEiT backbone's patch-embedding convolution for a `PatchEmbeddingProjection`
    sharing its parameters. Returns whether there was one to swap."""
    patch_embeddings = _patch_embeddings(backbone)
    projection = getattr(patch_embeddings, "projection", None)
    if isinstance(projection, PatchEmbeddingProjection) or not is_patch_convolution(projection):
        return False
    patch_embeddings.projection = PatchEmbeddingProjection.from_conv(projection)
    return True


def use_convolution_patch_projection(backbone: nn.Module) -> bool:
    """The inverse of `use_gemm_patch_projection`: the plain convolution again (the official formulation, for
    baselines and A/B measurements). Returns whether there was one to swap."""
    patch_embeddings = _patch_embeddings(backbone)
    projection = getattr(patch_embeddings, "projection", None)
    if not isinstance(projection, PatchEmbeddingProjection):
        return False
    patch_embeddings.projection = projection.to_conv()
    return True


def project_and_shuffle(features: torch.Tensor, projection: nn.Conv2d, stride: int) -> torch.Tensor:
    """Channel-last features (B, h, w, D) -> image (B, C, h * stride, w * stride): ``projection`` (a 1x1 convolution
    to stride² * C channels) then ``PixelShuffle(stride)``, as one GEMM and one copy."""
    batch, rows, columns, _ = features.shape
    projected = F.linear(features, projection.weight.flatten(1), projection.bias)
    channels = projected.shape[-1] // stride**2
    # PixelShuffle reads input channel c * stride² + i * stride + j into pixel (h * stride + i, w * stride + j)
    pixels = projected.view(batch, rows, columns, channels, stride, stride).permute(0, 3, 1, 4, 2, 5)
    return pixels.reshape(batch, channels, rows * stride, columns * stride)
