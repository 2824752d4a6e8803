"""The paper's restoration pretexts — super-resolution, deblurring and denoising — batched on the images' device.

MFM (Xie et al., ICLR 2023) compares frequency masking with classical image restoration used as a pre-training
pretext: the encoder sees a degraded image and the decoder restores the original, scored with the same frequency
loss. This module implements the three degradations in pure torch, for a whole batch at once, on whatever device the
images live on:

* ``"sr"``: bicubic down-sampling by ``config.sr_factor`` and bicubic up-sampling back, clamped after each step
  (as the official model does, with ``F.interpolate``, ``align_corners=False``, no antialiasing);
* ``"deblur"``: a random blur kernel per image from Real-ESRGAN's family (isotropic / anisotropic Gaussian,
  generalized Gaussian, plateau, sinc), kernel size, shape and orientation drawn per image, applied with reflect
  borders (OpenCV's default ``BORDER_REFLECT_101``, which the official ``cv2.filter2D`` uses);
* ``"denoise"``: per image either Gaussian or Poisson noise, colour or grey (the same noise on every channel).

Per-image parameters are drawn with torch RNG on the images' device (``torch.manual_seed`` or an explicit
``torch.Generator`` makes a run repeatable) and every draw can be passed in explicitly, for tests and pictures.
The sampling path has no host-device synchronisation (no ``.item()``, no data-dependent Python branches): which
kernel families and noise types are computed depends only on the configuration. Validation of explicitly passed
parameter *values* does synchronise, but it only runs when such values are given.

The official pipeline degrades 8-bit images on the CPU in the data loader (OpenCV/NumPy); here the degradations act on
the model's un-normalised float input, which is the same image up to float rounding. Two documented deviations: the
output of ``degrade`` is always clamped to [0, 1] (the official blur and noise outputs are not; only sinc ringing
and noise at the extremes are affected), and Poisson noise uses a fixed 256 levels instead of the official
``2 ** ceil(log2(#unique values))`` per image (a data-dependent count; for natural 8-bit photos, which have more than
128 distinct values, both give 256).

Pure torch with no imports from the rest of the package, so it ships unchanged as Hub remote code. ``config`` is any
object with the ``MFMConfig`` fields used here (``corruption``, ``sr_factor``, ``blur_*``, ``noise_*``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BlurParameters",
    "NoiseParameters",
    "add_noise",
    "apply_noise",
    "blur",
    "degrade",
    "gaussian_kernels",
    "generalized_gaussian_kernels",
    "plateau_kernels",
    "sample_blur_kernels",
    "sample_noise_parameters",
    "sinc_kernels",
    "super_resolution_degrade",
]

RESTORATION_CORRUPTIONS = ("sr", "deblur", "denoise")
# Luminance weights of OpenCV's RGB -> grey conversion (ITU-R BT.601), used by the official grey Poisson noise.
_LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
# Quantisation levels of the Poisson noise: the official 2 ** ceil(log2(#unique values)) is 256 for 8-bit photos.
POISSON_LEVELS = 256.0


def _autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Degradations run in float32 even inside an autocast region (devices without autocast need nothing)."""
    if not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}")


# ---------------------------------------------------------------------------------------------- super-resolution
def super_resolution_degrade(images: torch.Tensor, factor: int, mode: str = "bicubic") -> torch.Tensor:
    """Low-resolution version of ``images`` (B, C, H, W) in [0, 1]: resize to (H // factor, W // factor) and back.

    Both resizes use ``F.interpolate(mode=mode, align_corners=False, antialias=False)`` and are clamped to [0, 1], as
    in the official SR pretext; the down-sampling therefore aliases (no antialiasing), which is part of the pretext.
    Computed in float32; returns the input's shape and dtype.
    """
    _check_images(images)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"sr_factor must be a positive integer, got {factor!r}")
    height, width = images.shape[-2:]
    if height // factor < 1 or width // factor < 1:
        raise ValueError(f"sr_factor ({factor}) must be at most the image size ({height}x{width})")
    align = None if mode in ("nearest", "area", "nearest-exact") else False
    with _autocast_off(images):
        x = images.float()
        x = F.interpolate(x, size=(height // factor, width // factor), mode=mode, align_corners=align).clamp_(0, 1)
        x = F.interpolate(x, size=(height, width), mode=mode, align_corners=align).clamp_(0, 1)
    return x.to(images.dtype)


# ---------------------------------------------------------------------------------------------- blur kernels
def _as_batch(value: torch.Tensor | float, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A per-image parameter as a float32 (B,) tensor (a Python number becomes a batch of one)."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
    if tensor.dim() > 1:
        raise ValueError(f"{name} must be a number or a (B,) tensor, got shape {tuple(tensor.shape)}")
    return tensor.reshape(-1)


def _centred_grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) offsets from the kernel centre, each (size, size)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd positive integer, got {size!r}")
    offsets = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    return offsets[None, :].expand(size, size), offsets[:, None].expand(size, size)


def _quadratic_form(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, rotation: torch.Tensor
) -> torch.Tensor:
    """``p^T Σ^-1 p`` on the kernel grid, (B, size, size), with ``Σ = R diag(σx², σy²) R^T``.

    ``p = (x, y)`` with x the column offset and y the row offset (rows grow downwards), and R the rotation by
    ``rotation`` radians, so the σx axis points along ``(cos θ, sin θ)`` in (column, row) coordinates — the
    parameterisation of BasicSR / the official code.
    """
    xs, ys = _centred_grid(size, sigma_x.device)
    cos, sin = torch.cos(rotation)[:, None, None], torch.sin(rotation)[:, None, None]
    along = xs * cos + ys * sin  # coordinate along the sigma_x axis
    across = -xs * sin + ys * cos  # coordinate along the sigma_y axis
    return (along / sigma_x[:, None, None]) ** 2 + (across / sigma_y[:, None, None]) ** 2


def _restrict_and_normalise(
    kernels: torch.Tensor, size: int, kernel_sizes: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """Zero each kernel outside its own (centred) support ``kernel_sizes[i]`` and normalise it to sum 1."""
    if kernel_sizes is not None:
        sizes = torch.as_tensor(kernel_sizes, device=kernels.device).reshape(-1)
        xs, ys = _centred_grid(size, kernels.device)
        half = (sizes // 2).to(torch.float32)[:, None, None]
        inside = (xs.abs() <= half) & (ys.abs() <= half)
        kernels = kernels * inside
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _broadcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    try:
        return list(torch.broadcast_tensors(*tensors))
    except RuntimeError as error:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"per-image kernel parameters must all have the same length B, got shapes {shapes}") from error


def _shape_parameters(
    sigma_x: torch.Tensor | float,
    sigma_y: torch.Tensor | float | None,
    rotation: torch.Tensor | float | None,
    device: torch.device | None,
) -> list[torch.Tensor]:
    sigma_x = _as_batch(sigma_x, "sigma_x", device)
    sigma_y = sigma_x if sigma_y is None else _as_batch(sigma_y, "sigma_y", sigma_x.device)
    rotation = torch.zeros_like(sigma_x) if rotation is None else _as_batch(rotation, "rotation", sigma_x.device)
    return _broadcast(sigma_x, sigma_y, rotation)


def gaussian_kernels(
    size: int,
    sigma_x: torch.Tensor | float,
    sigma_y: torch.Tensor | float | None = None,
    rotation: torch.Tensor | float | None = None,
    kernel_sizes: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Bivariate Gaussian kernels ``exp(-q / 2)``, ``q = p^T Σ^-1 p``, as (B, size, size) summing to 1.

    ``sigma_y=None`` and ``rotation=None`` give the isotropic kernel (σy = σx, no rotation). ``kernel_sizes``
    (B,) odd sizes <= ``size`` restrict each kernel to its own centred square (zero-padded to ``size``), which is
    how kernels of different sizes share one batch.
    """
    sigma_x, sigma_y, rotation = _shape_parameters(sigma_x, sigma_y, rotation, None)
    q = _quadratic_form(size, sigma_x, sigma_y, rotation)
    return _restrict_and_normalise(torch.exp(-0.5 * q), size, kernel_sizes)


def generalized_gaussian_kernels(
    size: int,
    sigma_x: torch.Tensor | float,
    sigma_y: torch.Tensor | float | None,
    rotation: torch.Tensor | float | None,
    beta: torch.Tensor | float,
    kernel_sizes: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Generalized Gaussian kernels ``exp(-q ** β / 2)`` (β = 1 is the Gaussian; larger β flattens the top)."""
    sigma_x, sigma_y, rotation = _shape_parameters(sigma_x, sigma_y, rotation, None)
    sigma_x, sigma_y, rotation, beta = _broadcast(sigma_x, sigma_y, rotation, _as_batch(beta, "beta", sigma_x.device))
    q = _quadratic_form(size, sigma_x, sigma_y, rotation)
    return _restrict_and_normalise(torch.exp(-0.5 * q ** beta[:, None, None]), size, kernel_sizes)


def plateau_kernels(
    size: int,
    sigma_x: torch.Tensor | float,
    sigma_y: torch.Tensor | float | None,
    rotation: torch.Tensor | float | None,
    beta: torch.Tensor | float,
    kernel_sizes: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Plateau-shaped kernels ``1 / (1 + q ** β)`` (heavier tails than a Gaussian)."""
    sigma_x, sigma_y, rotation = _shape_parameters(sigma_x, sigma_y, rotation, None)
    sigma_x, sigma_y, rotation, beta = _broadcast(sigma_x, sigma_y, rotation, _as_batch(beta, "beta", sigma_x.device))
    q = _quadratic_form(size, sigma_x, sigma_y, rotation)
    return _restrict_and_normalise(1.0 / (1.0 + q ** beta[:, None, None]), size, kernel_sizes)


def sinc_kernels(
    size: int,
    omega: torch.Tensor | float,
    kernel_sizes: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernels ``ω J1(ω r) / (2π r)`` with cut-off ``ω`` in radians per pixel.

    The centre takes the limit ``ω² / (4π)``; the kernel is truncated to its size and normalised, so it rings
    (has negative lobes) like an ideal low-pass filter.
    """
    omega = _as_batch(omega, "omega")[:, None, None]
    xs, ys = _centred_grid(size, omega.device)
    radius = torch.sqrt(xs**2 + ys**2)
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    values = omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius)
    kernels = torch.where(radius > 0, values, omega**2 / (4 * math.pi))
    return _restrict_and_normalise(kernels, size, kernel_sizes)


@dataclass
class BlurParameters:
    """Per-image parameters of a batch of blur kernels, each a (B,) tensor.

    ``kernel_type`` indexes ``config.blur_kernel_types``. Values are the ones used: for isotropic kernels
    ``sigma_y == sigma_x`` and ``rotation == 0``; ``beta_gaussian`` / ``beta_plateau`` / ``omega`` are drawn for every
    image but only used by the generalized / plateau / sinc kernels.
    """

    kernel_type: torch.Tensor
    kernel_size: torch.Tensor
    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    rotation: torch.Tensor
    beta_gaussian: torch.Tensor
    beta_plateau: torch.Tensor
    omega: torch.Tensor


def _uniform(u: torch.Tensor, low: float, high: float | torch.Tensor) -> torch.Tensor:
    return low + (high - low) * u


def _categorical(u: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Index i with probability probs[i] from uniforms ``u`` (inverse CDF; no sync, unlike multinomial checks)."""
    cumulative = list(itertools.accumulate(float(p) for p in probs))
    cdf = torch.tensor([c / cumulative[-1] for c in cumulative], dtype=torch.float32, device=u.device)
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=len(probs) - 1)


def _type_indices(
    value: torch.Tensor | Sequence[str] | Sequence[int], names: Sequence[str], field: str, batch_size: int, device
) -> torch.Tensor:
    """Explicit per-image type choice: names from ``names`` or indices into it, as a (B,) long tensor."""
    if isinstance(value, torch.Tensor):
        indices = value.to(device=device, dtype=torch.long).reshape(-1)
    else:
        values = list(value)
        if any(isinstance(v, str) for v in values):
            unknown = [v for v in values if v not in names]
            if unknown:
                raise ValueError(f"{field} must be names from {list(names)}, got {unknown}")
            values = [list(names).index(v) for v in values]
        indices = torch.tensor(values, dtype=torch.long, device=device)
    if indices.shape != (batch_size,):
        raise ValueError(f"{field} must have one entry per image ({batch_size}), got shape {tuple(indices.shape)}")
    if bool(((indices < 0) | (indices >= len(names))).any()):
        raise ValueError(f"{field} indices must be in [0, {len(names) - 1}] (positions in {list(names)})")
    return indices


def _override(
    drawn: torch.Tensor, value: Any, field: str, low: float | None = None, high: float | None = None
) -> torch.Tensor:
    """Replace a drawn (B,) parameter by an explicit one, checking its shape and (host-side) its range."""
    if value is None:
        return drawn
    given = torch.as_tensor(value, dtype=drawn.dtype, device=drawn.device)
    if given.dim() == 0:
        given = given.expand_as(drawn)
    if given.shape != drawn.shape:
        raise ValueError(
            f"{field} must be a number or a tensor of shape {tuple(drawn.shape)}, got {tuple(given.shape)}"
        )
    if (low is not None and bool((given < low).any())) or (high is not None and bool((given > high).any())):
        raise ValueError(f"{field} values must be in [{low}, {high}], got min {given.min()} and max {given.max()}")
    return given.clone()


def sample_blur_kernels(
    batch_size: int,
    config: Any,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    *,
    kernel_type: torch.Tensor | Sequence[str] | Sequence[int] | None = None,
    kernel_size: torch.Tensor | Sequence[int] | None = None,
    sigma_x: torch.Tensor | float | None = None,
    sigma_y: torch.Tensor | float | None = None,
    rotation: torch.Tensor | float | None = None,
    beta_gaussian: torch.Tensor | float | None = None,
    beta_plateau: torch.Tensor | float | None = None,
    omega: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, BlurParameters]:
    """One random blur kernel per image, as in the official deblur pretext; returns (kernels, parameters).

    ``kernels`` is (B, K, K) with K = max(config.blur_kernel_sizes): each image's kernel has its own size from
    ``config.blur_kernel_sizes``, zero-padded and centred, and sums to 1. Per image (as the official data pipeline
    draws them, once per image): the family from ``config.blur_kernel_types`` with ``config.blur_kernel_probs``,
    the size uniformly from ``config.blur_kernel_sizes``, σx, σy, rotation uniformly from their ranges
    (isotropic families use σy = σx and no rotation), the sinc cut-off ω uniformly from [π/3, π] for sizes < 13 and
    [π/5, π] otherwise (Real-ESRGAN). β follows the official code: b is drawn uniformly from the configured range and
    then β uniformly between 1 and b (BasicSR's sampler called with the range [b, b]), so β concentrates towards 1.

    Every keyword overrides the corresponding draw (a number applies to all images); all draws are made anyway, so
    overriding one parameter leaves the others as the same seed would give them. ``kernel_type`` takes names or
    indices into ``config.blur_kernel_types``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    names = list(config.blur_kernel_types)
    sizes_list = [int(k) for k in config.blur_kernel_sizes]
    max_size = max(sizes_list)

    # One uniform draw per parameter and image, always in the same order (repeatable, overrides keep the rest).
    u = torch.rand(10, batch_size, generator=generator, device=device)
    drawn_type = _categorical(u[0], config.blur_kernel_probs)
    size_table = torch.tensor(sizes_list, dtype=torch.long, device=u.device)
    drawn_size = size_table[(u[1] * len(sizes_list)).long().clamp(max=len(sizes_list) - 1)]
    drawn_sigma_x = _uniform(u[2], *config.blur_sigma_x_range)
    drawn_sigma_y = _uniform(u[3], *config.blur_sigma_y_range)
    drawn_rotation = _uniform(u[4], *config.blur_rotation_range)
    drawn_beta_gaussian = 1.0 + (_uniform(u[5], *config.blur_beta_gaussian_range) - 1.0) * u[6]
    drawn_beta_plateau = 1.0 + (_uniform(u[7], *config.blur_beta_plateau_range) - 1.0) * u[8]

    types = drawn_type
    if kernel_type is not None:
        types = _type_indices(kernel_type, names, "kernel_type", batch_size, u.device)
    if kernel_size is None:
        sizes = drawn_size
    else:
        sizes = _override(drawn_size, kernel_size, "kernel_size", 1, max_size).long()
        if bool((sizes % 2 == 0).any()):
            raise ValueError(f"kernel_size values must be odd, got {sizes.tolist()}")
    omega_low = torch.where(sizes < 13, math.pi / 3, math.pi / 5)
    drawn_omega = _uniform(u[9], omega_low, math.pi)

    sigma_x_ = _override(drawn_sigma_x, sigma_x, "sigma_x", 1e-6)
    sigma_y_ = _override(drawn_sigma_y, sigma_y, "sigma_y", 1e-6)
    rotation_ = _override(drawn_rotation, rotation, "rotation")
    beta_gaussian_ = _override(drawn_beta_gaussian, beta_gaussian, "beta_gaussian", 1e-6)
    beta_plateau_ = _override(drawn_beta_plateau, beta_plateau, "beta_plateau", 1e-6)
    omega_ = _override(drawn_omega, omega, "omega", 1e-6, math.pi)

    # Isotropic families: sigma_y = sigma_x, no rotation.
    iso_indices = [i for i, name in enumerate(names) if name in ("iso", "generalized_iso", "plateau_iso")]
    is_iso = torch.isin(types, torch.tensor(iso_indices, dtype=torch.long, device=types.device))
    sigma_y_ = torch.where(is_iso, sigma_x_, sigma_y_)
    rotation_ = torch.where(is_iso, torch.zeros_like(rotation_), rotation_)

    # Compute each configured family for the whole batch (a loop over at most 4 shapes, not over images), then pick.
    builders = {
        "gaussian": lambda: gaussian_kernels(max_size, sigma_x_, sigma_y_, rotation_, sizes),
        "generalized": lambda: generalized_gaussian_kernels(
            max_size, sigma_x_, sigma_y_, rotation_, beta_gaussian_, sizes
        ),
        "plateau": lambda: plateau_kernels(max_size, sigma_x_, sigma_y_, rotation_, beta_plateau_, sizes),
        "sinc": lambda: sinc_kernels(max_size, omega_, sizes),
    }
    shape_of = {
        "iso": "gaussian",
        "aniso": "gaussian",
        "generalized_iso": "generalized",
        "generalized_aniso": "generalized",
        "plateau_iso": "plateau",
        "plateau_aniso": "plateau",
        "sinc": "sinc",
    }
    kernels = torch.zeros(batch_size, max_size, max_size, device=u.device)
    for shape in dict.fromkeys(shape_of[name] for name in names):
        indices = [i for i, name in enumerate(names) if shape_of[name] == shape]
        chosen = torch.isin(types, torch.tensor(indices, dtype=torch.long, device=types.device))
        kernels = torch.where(chosen[:, None, None], builders[shape](), kernels)

    parameters = BlurParameters(
        kernel_type=types,
        kernel_size=sizes,
        sigma_x=sigma_x_,
        sigma_y=sigma_y_,
        rotation=rotation_,
        beta_gaussian=beta_gaussian_,
        beta_plateau=beta_plateau_,
        omega=omega_,
    )
    return kernels, parameters


def blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter image i with kernel i, every channel alike: ``images`` (B, C, H, W), ``kernels`` (B, K, K), K odd.

    A correlation (like ``cv2.filter2D``; the kernels of this module are point-symmetric, so it is also the
    convolution) with reflect borders (OpenCV's ``BORDER_REFLECT_101``), done for the whole batch as one grouped
    convolution. Computed in float32; the result is not clamped (sinc kernels ring); returns the input's dtype.
    """
    _check_images(images)
    batch, channels, height, width = images.shape
    if kernels.dim() != 3 or kernels.shape[0] != batch or kernels.shape[1] != kernels.shape[2]:
        raise ValueError(f"kernels must be (B={batch}, K, K), got {tuple(kernels.shape)}")
    size = kernels.shape[-1]
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    pad = size // 2
    if pad >= height or pad >= width:
        raise ValueError(f"kernel size {size} needs images larger than {pad} pixels, got {height}x{width}")
    with _autocast_off(images):
        x = images.float().reshape(1, batch * channels, height, width)
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        weight = kernels.float().to(images.device)[:, None].expand(batch, channels, size, size)
        out = F.conv2d(x, weight.reshape(batch * channels, 1, size, size), groups=batch * channels)
    return out.reshape(batch, channels, height, width).to(images.dtype)


# ---------------------------------------------------------------------------------------------- noise
@dataclass
class NoiseParameters:
    """Per-image noise parameters, each a (B,) tensor.

    ``noise_type`` indexes ``config.noise_types``; ``gaussian_sigma`` is in units of the [0, 1] image (the config range
    divided by 255); ``poisson_scale`` multiplies the Poisson noise; ``gray`` is true where one noise image is shared
    by all channels. Both sigma and scale are drawn for every image; only the chosen type's one is used.
    """

    noise_type: torch.Tensor
    gaussian_sigma: torch.Tensor
    poisson_scale: torch.Tensor
    gray: torch.Tensor


def sample_noise_parameters(
    batch_size: int,
    config: Any,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    *,
    noise_type: torch.Tensor | Sequence[str] | Sequence[int] | None = None,
    gaussian_sigma: torch.Tensor | float | None = None,
    poisson_scale: torch.Tensor | float | None = None,
    gray: torch.Tensor | Sequence[bool] | bool | None = None,
) -> NoiseParameters:
    """Per-image noise type and strength as in the official denoise pretext; keywords override the draws.

    Type from ``config.noise_types`` with ``config.noise_probs``; Gaussian σ uniform in
    ``config.noise_gaussian_sigma_range`` / 255; Poisson scale uniform in ``config.noise_poisson_scale_range``;
    grey with probability ``config.noise_gaussian_gray_prob`` or ``config.noise_poisson_gray_prob`` (of the chosen
    type). All draws are always made, so overriding one keeps the others.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    names = list(config.noise_types)
    u = torch.rand(4, batch_size, generator=generator, device=device)
    types = _categorical(u[0], config.noise_probs)
    if noise_type is not None:
        types = _type_indices(noise_type, names, "noise_type", batch_size, u.device)
    low, high = config.noise_gaussian_sigma_range
    sigma = _override(_uniform(u[1], low / 255.0, high / 255.0), gaussian_sigma, "gaussian_sigma", 0.0)
    scale = _override(_uniform(u[2], *config.noise_poisson_scale_range), poisson_scale, "poisson_scale", 0.0)
    is_gaussian = _is_type(types, names, "gaussian")
    gray_prob = torch.where(is_gaussian, config.noise_gaussian_gray_prob, config.noise_poisson_gray_prob)
    is_gray = u[3] < gray_prob
    if gray is not None:
        given = torch.as_tensor(gray, dtype=torch.bool, device=u.device)
        given = given.expand(batch_size) if given.dim() == 0 else given
        if given.shape != (batch_size,):
            raise ValueError(
                f"gray must be a bool or have one entry per image ({batch_size}), got {tuple(given.shape)}"
            )
        is_gray = given.clone()
    return NoiseParameters(noise_type=types, gaussian_sigma=sigma, poisson_scale=scale, gray=is_gray)


def _is_type(types: torch.Tensor, names: Sequence[str], name: str) -> torch.Tensor:
    indices = [i for i, n in enumerate(names) if n == name]
    return torch.isin(types, torch.tensor(indices, dtype=torch.long, device=types.device))


def apply_noise(
    images: torch.Tensor,
    parameters: NoiseParameters,
    noise_types: Sequence[str] = ("gaussian", "poisson"),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add the noise described by ``parameters`` to ``images`` (B, C, H, W) in [0, 1]; clamp to [0, 1].

    Gaussian: ``σ · N(0, 1)`` per pixel and channel (grey: channel 0's noise on every channel, as the official code).
    Poisson (official, BasicSR): the image is quantised to 8 bits, ``q = round(255 x) / 255``, and the noise is
    ``(Poisson(q · L) / L - q) · scale`` with L = 256 levels (see the module docstring), so its variance is
    ``q · scale² / L``; grey Poisson noise is computed on the luminance 0.299 R + 0.587 G + 0.114 B and shared by the
    channels. Only the noise types listed in ``noise_types`` are generated (a config choice, not a data one).
    """
    _check_images(images)
    batch, channels = images.shape[:2]
    names = list(noise_types)
    with _autocast_off(images):
        x = images.float()
        gray = parameters.gray.to(x.device)[:, None, None, None]
        noise = torch.zeros((), device=x.device)  # broadcasts; images whose type is not generated get none
        strength = torch.zeros(batch, device=x.device)  # sigma or scale of each image's noise
        if "gaussian" in names:
            is_gaussian = _is_type(parameters.noise_type.to(x.device), names, "gaussian")
            gaussian = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            gaussian = torch.where(gray, gaussian[:, :1], gaussian)
            noise = torch.where(is_gaussian[:, None, None, None], gaussian, noise)
            strength = torch.where(is_gaussian, parameters.gaussian_sigma.to(x.device), strength)
        if "poisson" in names:
            if channels == 3:
                weights = torch.tensor(_LUMINANCE_WEIGHTS, device=x.device)[None, :, None, None]
                luminance = (x * weights).sum(dim=1, keepdim=True)
            elif channels == 1:
                luminance = x
            else:
                raise ValueError(f"Poisson noise needs 1 or 3 channels (grey noise uses the luminance), got {channels}")
            source = torch.where(gray, luminance, x)
            quantised = (source * 255.0).round_().clamp_(0, 255).div_(255.0)
            counts = torch.poisson(quantised * POISSON_LEVELS, generator=generator)
            poisson = counts.div_(POISSON_LEVELS).sub_(quantised)
            poisson = torch.where(gray, poisson[:, :1], poisson)
            is_poisson = _is_type(parameters.noise_type.to(x.device), names, "poisson")
            noise = torch.where(is_poisson[:, None, None, None], poisson, noise)
            strength = torch.where(is_poisson, parameters.poisson_scale.to(x.device), strength)
        out = (x + noise * strength[:, None, None, None]).clamp_(0, 1)
    return out.to(images.dtype)


def add_noise(
    images: torch.Tensor,
    config: Any,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """The official denoise degradation for a batch: draw per-image parameters (``overrides`` as in
    :func:`sample_noise_parameters`) and apply them with :func:`apply_noise`."""
    _check_images(images)
    parameters = sample_noise_parameters(images.shape[0], config, images.device, generator, **overrides)
    return apply_noise(images, parameters, config.noise_types, generator)


# ---------------------------------------------------------------------------------------------- dispatch
def degrade(images: torch.Tensor, config: Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """Degrade ``images`` (B, C, H, W) in [0, 1] with the restoration pretext ``config.corruption``.

    ``"sr"``: :func:`super_resolution_degrade` by ``config.sr_factor``; ``"deblur"``: a random kernel per image
    (:func:`sample_blur_kernels`) applied with :func:`blur`; ``"denoise"``: :func:`add_noise`. Randomness comes from
    ``generator`` (or torch's default RNG of the images' device). Computed in float32 without host-device
    synchronisation; returns images in [0, 1] with the input's shape and dtype.
    """
    _check_images(images)
    corruption = getattr(config, "corruption", None)
    if corruption == "sr":
        return super_resolution_degrade(images, config.sr_factor)
    if corruption == "deblur":
        kernels, _ = sample_blur_kernels(images.shape[0], config, images.device, generator)
        return blur(images, kernels).clamp_(0, 1)
    if corruption == "denoise":
        return add_noise(images, config, generator)
    raise ValueError(f"config.corruption must be one of {RESTORATION_CORRUPTIONS} for degrade(), got {corruption!r}")
