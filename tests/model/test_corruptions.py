"""Tests of the restoration pretexts (modeling_mfm.corruptions) against independent derivations and statistics."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, special

from modeling_mfm import MFMConfig, MFMForPreTraining
from modeling_mfm.corruptions import (
    POISSON_LEVELS,
    BlurParameters,
    add_noise,
    apply_noise,
    blur,
    degrade,
    gaussian_kernels,
    generalized_gaussian_kernels,
    plateau_kernels,
    sample_blur_kernels,
    sample_noise_parameters,
    sinc_kernels,
    super_resolution_degrade,
)

ISOTROPIC = ("iso", "generalized_iso", "plateau_iso", "sinc")
ANISOTROPIC = ("aniso", "generalized_aniso", "plateau_aniso")


def make_config(corruption: str = "deblur", **overrides) -> MFMConfig:
    return MFMConfig(corruption=corruption, loss_on="all", **overrides)


def smooth_images(batch: int = 2, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure at several scales (random low-res noise upsampled, plus fine noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, size // 4, size // 4, generator=g)
    coarse = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * coarse + 0.2 * torch.rand(batch, channels, size, size, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ independent refs
def reference_quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """q = p^T Σ^-1 p, Σ = R diag(σx², σy²) R^T, p = (column, row) offset, via an explicit matrix inverse."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    offsets = np.arange(size) - size // 2
    xs, ys = np.meshgrid(offsets, offsets)  # xs varies along columns
    points = np.stack([xs, ys], axis=-1).astype(np.float64)
    return np.einsum("...i,ij,...j->...", points, inv, points)


def reference_bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution (a = -0.75) resampling matrix, half-pixel centres, edge-clamped taps, no antialias."""

    def cubic(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    matrix = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for out_index in range(out_size):
        source = (out_index + 0.5) * scale - 0.5
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            matrix[out_index, min(max(tap, 0), in_size - 1)] += cubic(source - tap)
    return matrix


def moment_covariance(kernel: torch.Tensor) -> np.ndarray:
    """Covariance of the kernel seen as a distribution over (column, row) offsets."""
    k = kernel.double().numpy()
    size = k.shape[-1]
    offsets = np.arange(size) - size // 2
    xs, ys = np.meshgrid(offsets, offsets)
    return np.array([[(k * xs * xs).sum(), (k * xs * ys).sum()], [(k * xs * ys).sum(), (k * ys * ys).sum()]])


def angle_error(vector: np.ndarray, theta: float) -> float:
    """Smallest angle (radians) between the axis of ``vector`` and the direction ``theta`` (axes are mod π)."""
    angle = math.atan2(vector[1], vector[0])
    return abs((angle - theta + math.pi / 2) % math.pi - math.pi / 2)


# ------------------------------------------------------------------------------------------------ kernels
def test_sampled_kernels_sum_to_one_and_stay_in_their_support():
    config = make_config()
    kernels, params = sample_blur_kernels(256, config, generator=torch.Generator().manual_seed(0))
    assert kernels.shape == (256, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(256), atol=1e-5, rtol=0)
    offsets = (torch.arange(21) - 10).abs()
    outside = torch.maximum(offsets[None, :], offsets[:, None])[None] > (params.kernel_size // 2)[:, None, None]
    assert torch.all(kernels[outside] == 0)
    inside_centre = kernels[:, 10, 10]
    assert torch.all(inside_centre > 0)
    assert set(params.kernel_size.tolist()) <= set(config.blur_kernel_sizes)


@pytest.mark.parametrize("kernel_type", ISOTROPIC + ANISOTROPIC)
def test_each_family_sums_to_one(kernel_type):
    kernels, _ = sample_blur_kernels(
        32, make_config(), kernel_type=[kernel_type] * 32, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(32), atol=1e-5, rtol=0)
    assert torch.isfinite(kernels).all()


@pytest.mark.parametrize("kernel_type", ISOTROPIC)
def test_isotropic_kernels_are_radially_symmetric(kernel_type):
    # sigma_y and rotation are given on purpose: isotropic families must ignore them.
    kernels, params = sample_blur_kernels(
        16, make_config(), kernel_type=[kernel_type] * 16, sigma_y=2.9, rotation=0.7,
        generator=torch.Generator().manual_seed(2),
    )
    if kernel_type != "sinc":
        torch.testing.assert_close(params.sigma_y, params.sigma_x)
        assert torch.all(params.rotation == 0)
    for transformed in (
        kernels.transpose(1, 2),
        torch.rot90(kernels, 1, dims=(1, 2)),
        torch.rot90(kernels, 2, dims=(1, 2)),
        kernels.flip(1),
        kernels.flip(2),
    ):
        torch.testing.assert_close(transformed, kernels, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("theta", [0.3, 1.0, -2.0, 2.9])
def test_anisotropic_gaussian_covariance_matches_sigma_and_angle(theta):
    kernel = gaussian_kernels(41, torch.tensor([4.0]), torch.tensor([1.5]), torch.tensor([theta]))[0]
    covariance = moment_covariance(kernel)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    np.testing.assert_allclose(eigenvalues, [1.5**2, 4.0**2], rtol=1e-3)
    assert angle_error(eigenvectors[:, 1], theta) < math.radians(0.1)
    # the major axis points along (cos θ, sin θ) in (column, row) pixel coordinates
    assert covariance[0, 1] * math.sin(2 * theta) > 0


@pytest.mark.parametrize("builder,beta", [(generalized_gaussian_kernels, 0.7), (generalized_gaussian_kernels, 3.0),
                                          (plateau_kernels, 1.0), (plateau_kernels, 2.0)])
@pytest.mark.parametrize("theta", [0.3, -2.0])
def test_anisotropic_shaped_kernels_follow_the_angle(builder, beta, theta):
    kernel = builder(41, 3.0, 1.0, theta, beta)[0]
    _, eigenvectors = np.linalg.eigh(moment_covariance(kernel))
    # the square support of a discrete kernel bends the moments slightly; a wrong convention is off by 2θ (> 30°)
    assert angle_error(eigenvectors[:, 1], theta) < math.radians(4)


def test_kernel_formulas_match_an_independent_derivation():
    size, sx, sy, theta = 15, 2.5, 0.9, 0.8
    q = reference_quadratic_form(size, sx, sy, theta)
    expected = {
        "gaussian": np.exp(-0.5 * q),
        "generalized": np.exp(-0.5 * q**1.7),
        "plateau": 1 / (1 + q**1.4),
    }
    got = {
        "gaussian": gaussian_kernels(size, sx, sy, theta)[0],
        "generalized": generalized_gaussian_kernels(size, sx, sy, theta, 1.7)[0],
        "plateau": plateau_kernels(size, sx, sy, theta, 1.4)[0],
    }
    for name, reference in expected.items():
        np.testing.assert_allclose(got[name].numpy(), reference / reference.sum(), rtol=2e-4, atol=1e-7, err_msg=name)

    omega = 1.3
    offsets = np.arange(size) - size // 2
    xs, ys = np.meshgrid(offsets, offsets)
    r = np.hypot(xs, ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        sinc = omega * special.j1(omega * r) / (2 * np.pi * r)
    sinc[size // 2, size // 2] = omega**2 / (4 * np.pi)
    np.testing.assert_allclose(sinc_kernels(size, omega)[0].numpy(), sinc / sinc.sum(), rtol=1e-4, atol=1e-7)


def test_kernel_sizes_restrict_the_support():
    padded = gaussian_kernels(21, torch.tensor([3.0, 3.0]), kernel_sizes=torch.tensor([7, 21]))
    alone = gaussian_kernels(7, 3.0)[0]
    torch.testing.assert_close(padded[0, 7:14, 7:14], alone)
    assert padded[0].count_nonzero() == 49
    assert padded[1].count_nonzero() == 21 * 21


def radial_frequencies(n: int) -> torch.Tensor:
    f = torch.fft.fftfreq(n) * 2 * math.pi
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def test_blur_kernels_are_low_pass():
    n = 64
    radius = radial_frequencies(n)
    kernels, _ = sample_blur_kernels(256, make_config(), generator=torch.Generator().manual_seed(3))
    response = torch.fft.fft2(kernels.double(), s=(n, n)).abs()
    dc = response[:, 0, 0]
    torch.testing.assert_close(dc, torch.ones(256, dtype=torch.float64), atol=1e-5, rtol=0)
    low = response[:, radius < 0.5].mean(dim=1)
    high = response[:, radius > 2.5].mean(dim=1)
    assert torch.all(high <= low + 1e-6)
    non_negative = kernels.amin(dim=(1, 2)) >= 0  # every family but sinc
    assert torch.all(response[non_negative].amax(dim=(1, 2)) <= dc[non_negative] + 1e-9)
    # A clearly blurring Gaussian keeps < 5% of its DC response beyond half the Nyquist frequency.
    wide = torch.fft.fft2(gaussian_kernels(21, 2.0).double(), s=(n, n)).abs()[0]
    assert wide[radius > math.pi / 2].max() < 0.05
    # sinc kernels: pass-band below ω/2, stop-band beyond 1.25 ω (truncated, so some ripple).
    for size in (7, 13, 21):
        for omega in (math.pi / 5, math.pi / 3, 2.0, math.pi):
            h = torch.fft.fft2(sinc_kernels(size, omega)[0].double(), s=(128, 128)).abs()
            r = radial_frequencies(128)
            assert h[r < omega / 2].mean() > 0.8
            assert h[r > min(1.25 * omega, 0.9 * math.sqrt(2) * math.pi)].mean() < 0.1


# ------------------------------------------------------------------------------------------------ sampling
def test_blur_parameters_follow_the_configured_distributions():
    config = make_config()
    n = 20000
    _, params = sample_blur_kernels(n, config, generator=torch.Generator().manual_seed(4))
    frequencies = torch.bincount(params.kernel_type, minlength=7).double() / n
    expected = torch.tensor(config.blur_kernel_probs, dtype=torch.float64)
    assert torch.all((frequencies - expected).abs() < 4 * torch.sqrt(expected * (1 - expected) / n) + 1e-3)
    size_counts = torch.bincount(params.kernel_size, minlength=22)[config.blur_kernel_sizes].double() / n
    assert torch.all((size_counts - 1 / 8).abs() < 0.015)
    assert params.sigma_x.min() >= 0.2 and params.sigma_x.max() <= 3.0
    aniso = torch.isin(params.kernel_type, torch.tensor([1, 3, 5]))
    assert params.rotation[aniso].min() >= -math.pi and params.rotation[aniso].max() <= math.pi
    assert abs(params.rotation[aniso].mean()) < 0.1
    small = params.kernel_size < 13
    assert params.omega[small].min() >= math.pi / 3 - 1e-6 and params.omega[~small].min() >= math.pi / 5 - 1e-6
    assert params.omega[~small].min() < math.pi / 3 - 0.1  # the wider range is used for large kernels
    assert params.omega.max() <= math.pi
    # β as the official sampler draws it: b ~ U(range), then β ~ U between 1 and b; E[β] = 1 + (E[b] - 1) / 2.
    assert params.beta_gaussian.min() >= 0.5 and params.beta_gaussian.max() <= 4.0
    assert abs(params.beta_gaussian.mean() - (1 + (2.25 - 1) / 2)) < 0.03
    assert params.beta_plateau.min() >= 1.0 and params.beta_plateau.max() <= 2.0
    assert abs(params.beta_plateau.mean() - 1.25) < 0.01


def test_released_single_gaussian_setting():
    # The released deblur configs: isotropic Gaussian, sigma fixed at 5, random size from 7..21.
    config = make_config(blur_kernel_types=["iso"], blur_kernel_probs=[1.0], blur_sigma_x_range=[5.0, 5.0],
                         blur_sigma_y_range=[5.0, 5.0])
    kernels, params = sample_blur_kernels(8, config, generator=torch.Generator().manual_seed(5))
    assert torch.all(params.sigma_x == 5.0) and torch.all(params.kernel_type == 0)
    torch.testing.assert_close(kernels, gaussian_kernels(21, torch.full((8,), 5.0), kernel_sizes=params.kernel_size))


def test_explicit_blur_parameters_override_only_their_draw():
    config = make_config()
    _, drawn = sample_blur_kernels(6, config, generator=torch.Generator().manual_seed(6))
    kernels, given = sample_blur_kernels(
        6, config, generator=torch.Generator().manual_seed(6), kernel_type=["aniso"] * 6, sigma_x=2.0,
        rotation=torch.linspace(-1, 1, 6),
    )
    assert torch.all(given.kernel_type == 1) and torch.all(given.sigma_x == 2.0)
    torch.testing.assert_close(given.rotation, torch.linspace(-1, 1, 6))
    for name in ("kernel_size", "beta_gaussian", "beta_plateau", "omega"):
        torch.testing.assert_close(getattr(given, name), getattr(drawn, name))
    expected = gaussian_kernels(21, given.sigma_x, given.sigma_y, given.rotation, given.kernel_size)
    torch.testing.assert_close(kernels, expected)
    assert isinstance(given, BlurParameters)


def test_explicit_blur_parameters_are_validated():
    config = make_config()
    with pytest.raises(ValueError, match="kernel_type"):
        sample_blur_kernels(2, config, kernel_type=["box", "iso"])
    with pytest.raises(ValueError, match="kernel_type"):
        sample_blur_kernels(2, config, kernel_type=["iso"])
    with pytest.raises(ValueError, match="kernel_size"):
        sample_blur_kernels(2, config, kernel_size=[8, 9])
    with pytest.raises(ValueError, match="kernel_size"):
        sample_blur_kernels(2, config, kernel_size=[23, 9])
    with pytest.raises(ValueError, match="sigma_x"):
        sample_blur_kernels(2, config, sigma_x=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="batch_size"):
        sample_blur_kernels(0, config)


# ------------------------------------------------------------------------------------------------ blur
def test_blur_equals_reflect_101_correlation_per_image():
    images = smooth_images(3, 3, 32)
    kernels, _ = sample_blur_kernels(
        3, make_config(), kernel_type=["aniso", "sinc", "plateau_aniso"], generator=torch.Generator().manual_seed(7)
    )
    out = blur(images, kernels)
    for i in range(3):
        for c in range(3):
            # scipy's "mirror" border is OpenCV's BORDER_REFLECT_101 (d c b | a b c d | c b a)
            expected = ndimage.correlate(images[i, c].double().numpy(), kernels[i].double().numpy(), mode="mirror")
            np.testing.assert_allclose(out[i, c].numpy(), expected, atol=2e-6)
        torch.testing.assert_close(out[i : i + 1], blur(images[i : i + 1], kernels[i : i + 1]))


def test_blur_with_a_non_symmetric_kernel_is_a_correlation():
    images = smooth_images(1, 1, 16)
    kernel = torch.zeros(1, 3, 3)
    kernel[0, 1, 2] = 1.0  # output(y, x) = input(y, x + 1)
    out = blur(images, kernel)
    torch.testing.assert_close(out[..., :-1], images[..., 1:])
    torch.testing.assert_close(out[..., -1], images[..., -2])  # reflect-101 border


def test_blur_rejects_bad_kernels():
    images = smooth_images(2, 3, 16)
    with pytest.raises(ValueError, match="kernels"):
        blur(images, torch.ones(3, 5, 5) / 25)
    with pytest.raises(ValueError, match="odd"):
        blur(images, torch.ones(2, 4, 4) / 16)
    with pytest.raises(ValueError, match="larger"):
        blur(images, torch.ones(2, 41, 41) / 41**2)


# ------------------------------------------------------------------------------------------------ noise
def noise_config(**overrides) -> MFMConfig:
    return make_config("denoise", **overrides)


def test_gaussian_noise_std_and_channel_independence():
    images = torch.full((2, 3, 192, 192), 0.5)
    out = add_noise(images, noise_config(), generator=torch.Generator().manual_seed(8), noise_type=["gaussian"] * 2,
                    gaussian_sigma=torch.tensor([10 / 255, 25 / 255]), gray=[False, True])
    noise = (out - images).double()
    for i, sigma in enumerate((10 / 255, 25 / 255)):
        assert abs(noise[i].std().item() / sigma - 1) < 0.01
        assert abs(noise[i].mean().item()) < 4 * sigma / math.sqrt(noise[i].numel())
    correlation = np.corrcoef(noise[0].reshape(3, -1).numpy())
    assert np.abs(correlation - np.eye(3)).max() < 0.02  # colour noise: independent channels
    torch.testing.assert_close(noise[1, 0], noise[1, 1], atol=0, rtol=0)  # grey noise: equal channels
    torch.testing.assert_close(noise[1, 0], noise[1, 2], atol=0, rtol=0)


def test_poisson_noise_variance_is_mean_times_scale_squared_over_levels():
    levels = torch.tensor([51, 102, 153]) / 255.0  # exactly 8-bit values
    images = levels[None, :, None, None].expand(2, 3, 256, 256).contiguous()
    scales = torch.tensor([0.5, 1.5])
    out = add_noise(images, noise_config(), generator=torch.Generator().manual_seed(9), noise_type=["poisson"] * 2,
                    poisson_scale=scales, gray=False)
    noise = (out - images).double()
    for i in range(2):
        for c in range(3):
            expected_variance = levels[c].item() * scales[i].item() ** 2 / POISSON_LEVELS
            assert abs(noise[i, c].var().item() / expected_variance - 1) < 0.03
            assert abs(noise[i, c].mean().item()) < 4 * math.sqrt(expected_variance / noise[i, c].numel())
    # Poisson counts over 256 levels: noise / scale + q lies on the lattice k / 256.
    lattice = (noise / scales.double()[:, None, None, None] + levels.double()[None, :, None, None]) * 256
    torch.testing.assert_close(lattice, lattice.round(), atol=2e-3, rtol=0)


def test_grey_poisson_noise_uses_the_luminance_and_is_shared():
    rgb = torch.tensor([51, 102, 153]) / 255.0
    images = rgb[None, :, None, None].expand(1, 3, 256, 256).contiguous()
    out = add_noise(images, noise_config(), generator=torch.Generator().manual_seed(10), noise_type=["poisson"],
                    poisson_scale=1.0, gray=True)
    noise = (out - images).double()
    torch.testing.assert_close(noise[0, 0], noise[0, 1], atol=1e-7, rtol=0)
    torch.testing.assert_close(noise[0, 0], noise[0, 2], atol=1e-7, rtol=0)
    luminance = round(255 * (0.299 * rgb[0].item() + 0.587 * rgb[1].item() + 0.114 * rgb[2].item())) / 255
    assert abs(noise[0, 0].var().item() / (luminance / POISSON_LEVELS) - 1) < 0.03


def test_noise_parameters_follow_the_configured_distributions():
    config = noise_config()
    n = 20000
    params = sample_noise_parameters(n, config, generator=torch.Generator().manual_seed(11))
    is_gaussian = params.noise_type == 0
    assert abs(is_gaussian.double().mean().item() - 0.5) < 0.015
    assert abs(params.gray.double().mean().item() - 0.4) < 0.015
    assert params.gaussian_sigma.min() >= 1 / 255 and params.gaussian_sigma.max() <= 30 / 255
    assert abs(params.gaussian_sigma.mean().item() - 15.5 / 255) < 0.3 / 255
    assert params.poisson_scale.min() >= 0.05 and params.poisson_scale.max() <= 3.0
    grey_only = sample_noise_parameters(n, noise_config(noise_gaussian_gray_prob=1.0, noise_poisson_gray_prob=0.0),
                                        generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(grey_only.gray, grey_only.noise_type == 0)


def test_noise_batch_uses_each_images_own_parameters():
    images = torch.full((4, 3, 128, 128), 0.4)
    params = sample_noise_parameters(
        4, noise_config(), generator=torch.Generator().manual_seed(12), noise_type=["gaussian", "poisson"] * 2,
        gaussian_sigma=torch.tensor([5.0, 20.0, 20.0, 5.0]) / 255, poisson_scale=torch.tensor([0.1, 0.5, 2.0, 1.0]),
        gray=False,
    )
    noise = apply_noise(images, params, ("gaussian", "poisson"), torch.Generator().manual_seed(0)) - images
    expected_std = [5 / 255, math.sqrt(0.4 / 256) * 0.5, 20 / 255, math.sqrt(0.4 / 256) * 1.0]
    for i, std in enumerate(expected_std):
        assert abs(noise[i].double().std().item() / std - 1) < 0.03


def test_gaussian_only_config_never_makes_poisson_noise():
    config = noise_config(noise_types=["gaussian"], noise_probs=[1.0], noise_gaussian_sigma_range=[75.0, 75.0],
                          noise_gaussian_gray_prob=0.0)
    images = torch.full((3, 3, 64, 64), 0.5)
    params = sample_noise_parameters(3, config, generator=torch.Generator().manual_seed(13))
    assert torch.all(params.noise_type == 0) and not params.gray.any()
    noise = add_noise(images, config, generator=torch.Generator().manual_seed(13)) - images
    # The output is clamped to [0, 1]: the noise is a normal N(0, σ²) clipped to [-0.5, 0.5].
    sigma = 75 / 255
    z = np.linspace(-8, 8, 160001)
    density = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    clipped_std = math.sqrt(np.trapezoid(np.clip(sigma * z, -0.5, 0.5) ** 2 * density, z))
    assert clipped_std < 0.95 * sigma
    assert abs(noise.double().std().item() / clipped_std - 1) < 0.02


# ------------------------------------------------------------------------------------------------ super-resolution
@pytest.mark.parametrize("size,factor", [(32, 8), (32, 4), (24, 3)])
@pytest.mark.parametrize("sharp", [False, True])
def test_super_resolution_equals_independent_bicubic(size, factor, sharp):
    images = smooth_images(2, 3, size, seed=14)
    if sharp:  # black/white blocks: bicubic overshoots, so the clamps after each step matter
        images = (images > 0.5).float()
    out = super_resolution_degrade(images, factor)
    down = reference_bicubic_matrix(size, size // factor)
    up = reference_bicubic_matrix(size // factor, size)
    x = images.double().numpy()
    low = np.clip(np.einsum("oh,bchw,pw->bcop", down, x, down), 0, 1)
    expected = np.clip(np.einsum("oh,bchw,pw->bcop", up, low, up), 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)


def test_super_resolution_removes_high_frequencies():
    images = smooth_images(4, 3, 64, seed=15)
    out = super_resolution_degrade(images, 8)
    radius = radial_frequencies(64)
    high = radius > math.pi / 2
    energy_in = torch.fft.fft2(images).abs()[..., high].mean()
    energy_out = torch.fft.fft2(out).abs()[..., high].mean()
    assert energy_out < 0.2 * energy_in


def test_super_resolution_rejects_bad_factors():
    images = smooth_images(1, 3, 16)
    with pytest.raises(ValueError, match="sr_factor"):
        super_resolution_degrade(images, 0)
    with pytest.raises(ValueError, match="sr_factor"):
        super_resolution_degrade(images, 32)


# ------------------------------------------------------------------------------------------------ degrade
@pytest.mark.parametrize("corruption", ["sr", "deblur", "denoise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_degrade_keeps_shape_dtype_and_range(corruption, dtype):
    images = smooth_images(3, 3, 32).to(dtype)
    out = degrade(images, make_config(corruption), generator=torch.Generator().manual_seed(16))
    assert out.shape == images.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)


@pytest.mark.parametrize("corruption", ["sr", "deblur", "denoise"])
def test_degrade_is_repeatable_under_a_seed(corruption):
    config = make_config(corruption)
    images = smooth_images(4, 3, 32)
    torch.manual_seed(0)
    first = degrade(images, config)
    torch.manual_seed(0)
    second = degrade(images, config)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    from_generator = degrade(images, config, torch.Generator().manual_seed(1))
    again = degrade(images, config, torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_generator, again, atol=0, rtol=0)
    if corruption != "sr":  # SR is deterministic
        torch.manual_seed(1)
        assert not torch.equal(first, degrade(images, config))


@pytest.mark.parametrize("corruption", ["sr", "deblur", "denoise"])
def test_degrade_reads_no_values_on_the_host(corruption):
    # Meta tensors have no data: any .item(), bool(tensor) or data-dependent shape would raise. Running on them shows
    # that degrade makes no host-device synchronisation on an accelerator.
    out = degrade(torch.empty(4, 3, 32, 32, device="meta"), make_config(corruption))
    assert out.device.type == "meta" and out.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("corruption", ["sr", "deblur", "denoise"])
def test_degrade_computes_in_float32_under_autocast(corruption):
    images = smooth_images(2, 3, 32)
    expected = degrade(images, make_config(corruption), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = degrade(images, make_config(corruption), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_degrade_deblur_equals_blur_with_the_sampled_kernels():
    config = make_config("deblur")
    images = smooth_images(4, 3, 32)
    out = degrade(images, config, torch.Generator().manual_seed(17))
    kernels, _ = sample_blur_kernels(4, config, generator=torch.Generator().manual_seed(17))
    torch.testing.assert_close(out, blur(images, kernels).clamp(0, 1))


def test_degrade_rejects_other_corruptions_and_bad_images():
    with pytest.raises(ValueError, match="corruption"):
        degrade(smooth_images(1, 3, 32), MFMConfig(corruption="mfm"))
    config = make_config("sr")
    config.corruption = "jpeg"
    with pytest.raises(ValueError, match="corruption"):
        degrade(smooth_images(1, 3, 32), config)
    with pytest.raises(ValueError, match="images"):
        degrade(torch.rand(3, 32, 32), make_config("sr"))
    with pytest.raises(ValueError, match="floating"):
        degrade(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), make_config("sr"))


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("corruption", ["sr", "deblur", "denoise"])
def test_pretraining_model_with_restoration_pretexts(corruption):
    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    config = MFMConfig.from_preset(
        "mfm-vit-small", image_size=32, corruption=corruption, loss_on="all", backbone_overrides=tiny
    )
    model = MFMForPreTraining(config)
    mean = torch.tensor(config.image_mean)[None, :, None, None]
    std = torch.tensor(config.image_std)[None, :, None, None]
    images = smooth_images(2, 3, 32, seed=18)
    pixel_values = (images - mean) / std

    torch.manual_seed(0)
    output = model(pixel_values)
    assert output.frequency_mask is None
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # What the encoder saw is the degradation of the un-normalised image, re-normalised.
    torch.manual_seed(0)
    expected = (degrade(pixel_values * std + mean, config) - mean) / std
    torch.testing.assert_close(output.corrupted_pixel_values, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ pictures
def write_photos(folder: Path, count: int = 2) -> list[Path]:
    paths = []
    for i in range(count):
        array = (smooth_images(1, 3, 48, seed=20 + i)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        path = folder / f"n0000000{i}_photo{i}.png"
        Image.fromarray(array[:, : 40 + 8 * i]).save(path)  # non-square: exercises resize + centre crop
        paths.append(path)
    return paths


def test_corruption_pictures(tmp_path):
    from modeling_mfm.training.evaluation.visualization_corruptions import (
        corruption_examples,
        corruption_figure,
        load_photos,
        save_palette_png,
    )

    paths = write_photos(tmp_path)
    photos = load_photos(paths, 32)
    assert photos.shape == (2, 3, 32, 32) and photos.dtype == torch.float32
    assert 0 <= photos.min() and photos.max() <= 1
    config = MFMConfig(corruption="sr", loss_on="all", image_size=32, backbone_config={"model_type": "resnet"})
    examples = corruption_examples(photos, config, seed=0, blur_overrides={"kernel_type": ["aniso", "sinc"]})
    assert set(examples) == {"sr", "deblur", "denoise"}
    torch.testing.assert_close(examples["sr"][0], super_resolution_degrade(photos, 8))
    assert examples["deblur"][1][0].startswith("aniso") and examples["deblur"][1][1].startswith("sinc")
    picture = corruption_figure(photos, examples["deblur"][0], examples["deblur"][1], title="deblur", dpi=40)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.std() > 10  # something was drawn
    save_palette_png(picture, tmp_path / "out" / "deblur.png")
    with Image.open(tmp_path / "out" / "deblur.png") as saved:
        assert saved.mode == "P" and saved.size == (picture.shape[1], picture.shape[0])
    with pytest.raises(ValueError, match="row_labels"):
        corruption_figure(photos, photos, ["only one"])
    with pytest.raises(ValueError, match="one shape"):
        corruption_figure(photos, photos[:1])


def test_make_corruption_figures_script(tmp_path):
    root = Path(__file__).resolve().parents[2]
    write_photos(tmp_path)
    output = tmp_path / "images"
    result = subprocess.run(
        [sys.executable, str(root / "run_scripts" / "make_corruption_figures.py"), "--photo_dir", str(tmp_path),
         "--num_images", "2", "--image_size", "32", "--output_dir", str(output), "--dpi", "40",
         "--blur_types", "plateau_aniso", "iso"],
        check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == [
        "corruption_deblur.png", "corruption_denoise.png", "corruption_mfm.png", "corruption_sr.png"
    ]


def test_frequency_masking_examples_are_the_low_and_high_pass_halves_of_each_photo():
    from modeling_mfm.frequency import low_pass_mask
    from modeling_mfm.training.evaluation.visualization_corruptions import frequency_masking_examples

    photos = torch.rand(2, 3, 32, 32)
    originals, filtered, labels = frequency_masking_examples(photos, radius=4)
    assert torch.equal(originals, photos.repeat_interleave(2, dim=0))
    assert labels == ["low-pass\nr = 4", "high-pass\nr = 4"] * 2
    # before clamping, the low-pass and high-pass images add up to the photo (the two keep-masks partition the spectrum)
    keep = low_pass_mask(32, 32, 4)
    unclamped = [torch.fft.ifft2(torch.fft.ifftshift(torch.fft.fftshift(torch.fft.fft2(photos[0])) * k)).real
                 for k in (keep, 1 - keep)]
    torch.testing.assert_close(unclamped[0] + unclamped[1], photos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(filtered[0], unclamped[0].clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(filtered[1], unclamped[1].clamp(0, 1), atol=1e-5, rtol=0)
    assert filtered[1].mean() < 0.25 < filtered[0].mean()  # high-pass keeps edges only, low-pass the brightness
