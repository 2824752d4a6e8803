"""Pictures of the pretexts: original | corrupted | the log-magnitude spectra of both, one row per photo.

The spectra show what each pretext removes or adds in the frequency frame MFM works in: super-resolution and blur
cut the high frequencies (SR also folds them back, it aliases), noise raises the whole high-frequency floor.
Rendered with matplotlib's object API on an Agg canvas and returned as an (H, W, 3) uint8 array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ...corruptions import (
    BlurParameters,
    NoiseParameters,
    apply_noise,
    blur,
    sample_blur_kernels,
    sample_noise_parameters,
    super_resolution_degrade,
)
from ...frequency import filter_frequencies, low_pass_mask
from ..data.transforms import to_rgb
from .visualization import figure_to_array, log_magnitude_spectrum

__all__ = [
    "corruption_examples",
    "corruption_figure",
    "describe_blur",
    "describe_noise",
    "frequency_masking_examples",
    "load_photos",
    "save_palette_png",
]


def load_photos(paths: Sequence[str | os.PathLike], size: int) -> torch.Tensor:
    """Photos as a (B, 3, size, size) float tensor in [0, 1]: RGB, shorter side resized to ``size`` (bicubic), centre
    crop — a fixed view of each photo, so pictures are comparable between runs."""
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    if not paths:
        raise ValueError("paths must name at least one image")
    tensors = []
    for path in paths:
        with Image.open(path) as opened:
            image = to_rgb(opened)
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            tensors.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(tensors).float() / 255.0


def describe_blur(parameters: BlurParameters, kernel_types: Sequence[str]) -> list[str]:
    """One short label per image: family, size and the parameters that family uses."""
    labels = []
    for i in range(parameters.kernel_type.shape[0]):
        name = kernel_types[int(parameters.kernel_type[i])]
        size = int(parameters.kernel_size[i])
        text = f"{name} {size}x{size}"
        if name == "sinc":
            text += f"\nω={float(parameters.omega[i]) / math.pi:.2f}π"
        elif name.endswith("_iso") or name == "iso":
            text += f"\nσ={float(parameters.sigma_x[i]):.2f}"
        else:
            text += (
                f"\nσ=({float(parameters.sigma_x[i]):.2f}, {float(parameters.sigma_y[i]):.2f})"
                f" θ={math.degrees(float(parameters.rotation[i])):.0f}°"
            )
        if name.startswith("generalized"):
            text += f" β={float(parameters.beta_gaussian[i]):.2f}"
        elif name.startswith("plateau"):
            text += f" β={float(parameters.beta_plateau[i]):.2f}"
        labels.append(text)
    return labels


def describe_noise(parameters: NoiseParameters, noise_types: Sequence[str]) -> list[str]:
    """One short label per image: noise type, strength, colour or grey."""
    labels = []
    for i in range(parameters.noise_type.shape[0]):
        name = noise_types[int(parameters.noise_type[i])]
        colour = "grey" if bool(parameters.gray[i]) else "colour"
        if name == "gaussian":
            labels.append(f"gaussian σ={float(parameters.gaussian_sigma[i]) * 255:.1f}/255\n{colour}")
        else:
            labels.append(f"poisson scale={float(parameters.poisson_scale[i]):.2f}\n{colour}")
    return labels


def corruption_examples(
    images: torch.Tensor,
    config: Any,
    seed: int = 0,
    blur_overrides: dict[str, Any] | None = None,
    noise_overrides: dict[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The three degradations of ``images`` (B, C, H, W) in [0, 1] as ``{name: (degraded, row labels)}``.

    Draws come from a ``torch.Generator`` seeded with ``seed`` (one per pretext), so the pictures are reproducible;
    ``blur_overrides`` / ``noise_overrides`` pass explicit parameters to `sample_blur_kernels` /
    `sample_noise_parameters` (e.g. ``{"kernel_type": ["aniso", "plateau_iso", "sinc"]}``).
    """
    batch = images.shape[0]
    examples: dict[str, tuple[torch.Tensor, list[str]]] = {}
    examples["sr"] = (super_resolution_degrade(images, config.sr_factor), [f"bicubic x{config.sr_factor}"] * batch)
    generator = torch.Generator(images.device).manual_seed(seed)
    kernels, blur_parameters = sample_blur_kernels(
        batch, config, images.device, generator, **(blur_overrides or {})
    )
    examples["deblur"] = (blur(images, kernels).clamp(0, 1), describe_blur(blur_parameters, config.blur_kernel_types))
    generator = torch.Generator(images.device).manual_seed(seed)
    noise_parameters = sample_noise_parameters(batch, config, images.device, generator, **(noise_overrides or {}))
    examples["denoise"] = (
        apply_noise(images, noise_parameters, config.noise_types, generator),
        describe_noise(noise_parameters, config.noise_types),
    )
    return examples


def frequency_masking_examples(images: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """MFM's corruption of each of ``images`` (B, C, H, W) in [0, 1], low-pass then high-pass with the circular mask
    of ``radius``: (originals, filtered, labels), 2B rows in that order, for `corruption_figure`."""
    height, width = images.shape[-2:]
    low = low_pass_mask(height, width, radius, device=images.device)
    originals = images.repeat_interleave(2, dim=0)
    keep = torch.stack([low, 1 - low]).repeat(images.shape[0], 1, 1)
    labels = [f"{kind}-pass\nr = {radius:g}" for _ in range(images.shape[0]) for kind in ("low", "high")]
    return originals, filter_frequencies(originals, keep), labels


def corruption_figure(
    original: torch.Tensor,
    corrupted: torch.Tensor,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> np.ndarray:
    """One row per image: original, corrupted (both (B, C, H, W) in [0, 1]), then the log-magnitude spectrum of each
    (zero frequency at the centre, both on the original's colour scale). Returns an (H, W, 3) uint8 picture."""
    if original.dim() != 4 or original.shape != corrupted.shape:
        raise ValueError(
            f"original and corrupted must be (B, C, H, W) of one shape, got {tuple(original.shape)} and "
            f"{tuple(corrupted.shape)}"
        )
    batch = original.shape[0]
    if row_labels is not None and len(row_labels) != batch:
        raise ValueError(f"row_labels needs one label per image ({batch}), got {len(row_labels)}")
    images = [t.detach().float().cpu().clamp(0, 1) for t in (original, corrupted)]
    spectra = [log_magnitude_spectrum(t) for t in images]
    columns = ["original", "corrupted", "spectrum of original", "spectrum of corrupted"]
    figure = Figure(figsize=(2.0 * len(columns) + (0.9 if row_labels else 0.0), 2.0 * batch + (0.4 if title else 0.1)),
                    dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(batch, len(columns), squeeze=False)
    for row in range(batch):
        vmin, vmax = float(spectra[0][row].min()), float(spectra[0][row].max())
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < 2:
                ax.imshow(images[col][row].permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                ax.imshow(spectra[col - 2][row].numpy(), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        if row_labels is not None:
            axes[row][0].set_ylabel(row_labels[row], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_to_array(figure)


def save_palette_png(picture: np.ndarray, path: str | os.PathLike, colors: int = 256) -> None:
    """Writes an (H, W, 3) uint8 picture as an optimised palette PNG (``colors`` colours, median cut): about a third of
    the size of a true-colour PNG for these figures, small enough to keep in the repository."""
    if not 2 <= colors <= 256:
        raise ValueError(f"colors must be in [2, 256], got {colors}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp"
    image = Image.fromarray(picture).quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    image.save(temporary, format="PNG", optimize=True)
    os.replace(temporary, path)
