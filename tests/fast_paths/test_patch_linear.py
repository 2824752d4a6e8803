"""The patch embedding and the decoder head computed as GEMMs are the convolutions they replace: checked against
torch's own convolution and PixelShuffle in float64, in a model, and under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from modeling_mfm import MFMForPreTraining
from modeling_mfm.fast_paths import apply_fast_paths
from modeling_mfm.fast_paths.patch_linear import PatchEmbeddingProjection, PointwiseProjection


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


def test_pointwise_projection_then_pixel_shuffle_is_the_decoder_head():
    torch.manual_seed(0)
    stride, channels = 4, 3
    convolution = nn.Conv2d(10, stride**2 * channels, kernel_size=1).double()
    projection = PointwiseProjection.from_conv(convolution)
    assert projection.weight is convolution.weight and projection.bias is convolution.bias
    channel_last = torch.randn(2, 5, 7, 10, dtype=torch.float64)  # what the MFM decoders hand the projection
    feature_map = channel_last.permute(0, 3, 1, 2)
    expected = F.pixel_shuffle(convolution(feature_map), stride)
    actual = F.pixel_shuffle(projection(feature_map), stride)
    assert actual.shape == expected.shape == (2, channels, 20, 28)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not a 1x1 convolution"):
        PointwiseProjection.from_conv(nn.Conv2d(10, 8, 2, stride=2))


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_fast_paths_embed_patches_with_a_gemm_and_keep_the_checkpoint_layout(backbone):
    model = MFMForPreTraining(tiny_config(backbone))
    patch_embeddings = model.mfm.backbone.embeddings.patch_embeddings
    assert type(patch_embeddings.projection) is nn.Conv2d  # the model itself is stock
    images = torch.randn(2, 3, 32, 32)
    state = model.state_dict()
    with torch.no_grad():
        stock = model.mfm(images).last_hidden_state
        stock_reconstruction = model(images, frequency_mask=torch.ones(2, 32, 32)).reconstruction
        fast = apply_fast_paths(model)
        assert isinstance(patch_embeddings.projection, PatchEmbeddingProjection)
        assert isinstance(model.decoder.projection, PointwiseProjection)
        assert fast.switched["patch_gemm"] == 1 and fast.switched["decoder_gemm"] == 1
        assert model.state_dict().keys() == state.keys()
        assert model.state_dict()["mfm.backbone.embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 8, 8)
        assert model.state_dict()["decoder.projection.weight"].shape == (8 * 8 * 3, 32, 1, 1)
        torch.testing.assert_close(model.mfm(images).last_hidden_state, stock, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images, frequency_mask=torch.ones(2, 32, 32)).reconstruction,
                                   stock_reconstruction, rtol=1e-5, atol=1e-5)
        fast.remove()
        assert type(patch_embeddings.projection) is nn.Conv2d and type(model.decoder.projection) is nn.Conv2d
        torch.testing.assert_close(model.mfm(images).last_hidden_state, stock, rtol=0, atol=0)
    resnet = MFMForPreTraining(tiny_config("resnet"))
    apply_fast_paths(resnet)
    assert not any(isinstance(m, PatchEmbeddingProjection) for m in resnet.modules())
    assert isinstance(resnet.decoder.projection, PointwiseProjection)


def test_patch_projection_runs_in_the_autocast_dtype_like_the_convolution():
    torch.manual_seed(0)
    convolution = nn.Conv2d(3, 16, 8, stride=8)
    projection = PatchEmbeddingProjection.from_conv(convolution)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = projection(images), convolution(images)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
