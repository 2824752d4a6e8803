"""Pictures of what the model learns: original | corrupted | reconstruction, and their log-magnitude spectra with
the outline of the frequency mask.

Rendered with matplotlib's object API on an Agg canvas (no pyplot, no global backend change), returned as an
(H, W, 3) uint8 array that can be saved as PNG and logged to the trackers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ...frequency import low_pass_mask, sample_frequency_masks
from ..data.transforms import normalize_on_device
from ..run.randomness import seeded_device_rng

__all__ = [
    "combine_bands",
    "figure_to_array",
    "log_magnitude_spectrum",
    "predict_fixed_batch",
    "reconstruction_grid",
    "save_png",
    "view_masks",
]


def log_magnitude_spectrum(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, H, W) ``log(1 + |F|)`` of the channel mean, zero frequency centred."""
    gray = images.float().mean(dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1))
    return torch.log1p(spectrum.abs())


def combine_bands(visible: torch.Tensor, predicted: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The input's kept frequencies plus the prediction's removed ones: ``ifft(keep * F(visible) + (1 - keep) *
    F(predicted))``, clamped to [0, 1]. With MFM's loss on the removed band only, this is the picture of what the
    model adds to its input (its raw output is unconstrained on the kept band). Images (B, C, H, W), keep (B, H, W)."""
    keep = keep.float()[:, None]
    spectrum = keep * torch.fft.fftshift(torch.fft.fft2(visible.float()), dim=(-2, -1))
    spectrum = spectrum + (1 - keep) * torch.fft.fftshift(torch.fft.fft2(predicted.float()), dim=(-2, -1))
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.clamp(0, 1)


def reconstruction_grid(
    original: torch.Tensor,
    corrupted: torch.Tensor,
    reconstruction: torch.Tensor,
    frequency_mask: torch.Tensor | None = None,
    row_labels: list[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> np.ndarray:
    """One row per image: original, corrupted, reconstruction (all (B, C, H, W) in [0, 1]) and, with a keep-mask
    (B, H, W), the input's kept band completed by the predicted removed band (`combine_bands`); then the
    log-magnitude spectra of original, corrupted and reconstruction with the mask's outline. Returns an (H, W, 3)
    uint8 picture."""
    if not (original.shape == corrupted.shape == reconstruction.shape) or original.dim() != 4:
        raise ValueError(
            "original, corrupted and reconstruction must be (B, C, H, W) of one shape, got "
            f"{tuple(original.shape)}, {tuple(corrupted.shape)}, {tuple(reconstruction.shape)}"
        )
    batch = original.shape[0]
    if frequency_mask is not None and tuple(frequency_mask.shape) != (batch, *original.shape[-2:]):
        raise ValueError(f"frequency_mask must be (B, H, W), got {tuple(frequency_mask.shape)}")
    images = [t.detach().float().cpu().clamp(0, 1) for t in (original, corrupted, reconstruction)]
    spectra = [log_magnitude_spectrum(t) for t in images]
    titles = ["original", "corrupted", "reconstruction"]
    mask = None
    if frequency_mask is not None:
        mask = frequency_mask.detach().float().cpu()
        images.append(combine_bands(images[0], images[2], mask))
        titles.append("kept band + predicted band")
    titles += ["original spectrum", "corrupted spectrum", "reconstruction spectrum"]
    num_images = len(images)
    figure = Figure(figsize=(2.0 * len(titles), 2.0 * batch + (0.4 if title else 0.0)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(batch, len(titles), squeeze=False)
    for row in range(batch):
        vmin, vmax = float(spectra[0][row].min()), float(spectra[0][row].max())
        for col in range(len(titles)):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < num_images:
                ax.imshow(images[col][row].permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                spectrum = spectra[col - num_images][row].numpy()
                ax.imshow(spectrum, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
                if mask is not None and 0.0 < float(mask[row].mean()) < 1.0:
                    ax.contour(mask[row].numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
        if row_labels is not None:
            axes[row][0].set_ylabel(row_labels[row], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure_to_array(figure)


def figure_to_array(figure: Any) -> np.ndarray:
    """A matplotlib figure (Agg canvas) rendered to an (H, W, 3) uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(picture: np.ndarray, path: str | os.PathLike) -> None:
    """Writes an (H, W, 3) uint8 array as PNG (creating the folder), via a temporary file and a rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp"
    Image.fromarray(picture).save(temporary, format="PNG")
    os.replace(temporary, path)


def view_masks(model: Any, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's two keep-masks (H, W) from its own radii: ``low_pass`` and its complement ``high_pass``, the fixed
    views of the pictures and of the representation monitor's reconstruction gain."""
    config = model.config
    low = low_pass_mask(height, width, config.mask_radius, config.mask_outer_radius, device=device)
    return {"low_pass": low, "high_pass": 1 - low}


@torch.no_grad()
def predict_fixed_batch(model: Any, images_uint8: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Runs ``model`` (an `MFMForPreTraining`, unwrapped) on a fixed batch, reproducibly: for frequency masking the
    images alternate low-pass / high-pass masks (`view_masks`); restoration degradations are drawn under a fixed
    seed. The images are normalised and restored with the model's own mean and std. Returns the original, corrupted
    and reconstructed images in [0, 1] on the CPU, the mask and row labels."""
    config = model.config
    device = next(model.parameters()).device
    pixel_values = normalize_on_device(images_uint8.to(device), model.image_mean, model.image_std)
    batch, _, height, width = pixel_values.shape
    frequency_mask = None
    labels = [config.corruption] * batch
    if config.corruption == "mfm":
        keep = view_masks(model, height, width, device)["low_pass"]
        low_pass = torch.arange(batch, device=device) % 2 == 0
        frequency_mask = sample_frequency_masks(batch, low_pass, keep)
        labels = ["low-pass" if flag else "high-pass" for flag in low_pass.tolist()]
    was_training = model.training
    model.eval()
    try:
        with seeded_device_rng(device, seed):
            output = model(pixel_values, frequency_mask=frequency_mask, return_dict=True)
    finally:
        model.train(was_training)

    def unnormalize(x: torch.Tensor) -> torch.Tensor:
        return model.unnormalize(x.float()).clamp(0, 1).cpu()

    return {
        "original": unnormalize(pixel_values),
        "corrupted": unnormalize(output.corrupted_pixel_values),
        "reconstruction": unnormalize(output.reconstruction),
        "frequency_mask": output.frequency_mask.cpu() if output.frequency_mask is not None else None,
        "row_labels": labels,
        "loss": float(output.loss),
    }


def reconstruction_picture(model: Any, images_uint8: torch.Tensor, seed: int = 0,
                           title: str = "loss on this batch {loss:.4f}") -> np.ndarray:
    """`predict_fixed_batch` drawn by `reconstruction_grid`: the picture of the training runs and the study;
    ``{loss}`` in the title is the batch's loss."""
    prediction = predict_fixed_batch(model, images_uint8, seed=seed)
    return reconstruction_grid(
        prediction["original"], prediction["corrupted"], prediction["reconstruction"],
        prediction["frequency_mask"], prediction["row_labels"], title=title.format(loss=prediction["loss"]),
    )
