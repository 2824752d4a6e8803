"""The patch embedding and the decoder head computed as GEMMs are the convolutions they replace: checked against
torch's own convolution and PixelShuffle in float64, in a model, and under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from modeling_mfm import MFMForPreTraining
from modeling_mfm.patch_linear import (
    PatchEmbeddingProjection,
    project_and_shuffle,
    use_convolution_patch_projection,
    use_gemm_patch_projection,
)


@pytest.mark.parametrize("kernel,size", [((8, 8), (32, 32)), ((4, 8), (37, 45))])
def test_patch_projection_is_the_patch_convolution_with_its_gradients(kernel, size):
    torch.manual_seed(0)
    convolution = nn.Conv2d(3, 16, kernel, stride=kernel).double()
    projection = PatchEmbeddingProjection.from_conv(convolution)
    assert projection.weight is convolution.weight and projection.bias is convolution.bias
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.conv2d(images, convolution.weight, convolution.bias, stride=kernel)  # leftover rows/columns ignored
    actual = projection(images)
    assert actual.shape == expected.shape == (2, 16, size[0] // kernel[0], size[1] // kernel[1])
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (convolution.weight, convolution.bias))
    actual_grads = torch.autograd.grad((actual * upstream).sum(), (projection.weight, projection.bias))
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_patch_projection_refuses_overlapping_convolutions_and_wrong_channels():
    with pytest.raises(ValueError, match="not a patch convolution"):
        PatchEmbeddingProjection.from_conv(nn.Conv2d(3, 8, 3, stride=2))
    with pytest.raises(ValueError, match="not a patch convolution"):
        PatchEmbeddingProjection.from_conv(nn.Conv2d(3, 8, 4, stride=4, padding=1))
    projection = PatchEmbeddingProjection.from_conv(nn.Conv2d(3, 8, 4, stride=4))
    with pytest.raises(ValueError, match="expects 3 channels, got 1"):
        projection(torch.randn(1, 1, 16, 16))


def test_project_and_shuffle_is_a_1x1_convolution_then_pixel_shuffle():
    torch.manual_seed(0)
    stride, channels = 4, 3
    convolution = nn.Conv2d(10, stride**2 * channels, kernel_size=1).double()
    feature_map = torch.randn(2, 10, 5, 7, dtype=torch.float64)
    expected = F.pixel_shuffle(convolution(feature_map), stride)
    actual = project_and_shuffle(feature_map.permute(0, 2, 3, 1), convolution, stride)
    assert actual.shape == expected.shape == (2, channels, 20, 28)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_vit_models_embed_patches_with_a_gemm_and_keep_the_checkpoint_layout(backbone):
    model = MFMForPreTraining(tiny_config(backbone))
    projection = model.mfm.backbone.embeddings.patch_embeddings.projection
    assert isinstance(projection, PatchEmbeddingProjection)
    state = model.state_dict()
    assert state["mfm.backbone.embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 8, 8)
    assert state["decoder.projection.weight"].shape == (8 * 8 * 3, 32, 1, 1)
    assert not use_gemm_patch_projection(model.mfm.backbone)  # already swapped
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gemm = model.mfm(images).last_hidden_state
        assert use_convolution_patch_projection(model.mfm.backbone)
        assert type(model.mfm.backbone.embeddings.patch_embeddings.projection) is nn.Conv2d
        assert not use_convolution_patch_projection(model.mfm.backbone)
        torch.testing.assert_close(model.mfm(images).last_hidden_state, gemm, rtol=1e-5, atol=1e-5)
        assert model.state_dict().keys() == state.keys()
    resnet = MFMForPreTraining(tiny_config("resnet"))
    assert not any(isinstance(m, PatchEmbeddingProjection) for m in resnet.modules())


def test_patch_projection_runs_in_the_autocast_dtype_like_the_convolution():
    torch.manual_seed(0)
    convolution = nn.Conv2d(3, 16, 8, stride=8)
    projection = PatchEmbeddingProjection.from_conv(convolution)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = projection(images), convolution(images)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
