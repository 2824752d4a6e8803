"""What pre-training learns, measured while it runs: kNN top-1 of the encoder's features, and what the predicted band
adds to each view's input.

A loss that falls says the decoder fits; it does not say the encoder's features got better, nor that the
reconstruction restores more than the mean colour. The monitor answers both on labelled images that the run does not
train on (the held-out slice), every ``--monitor_steps`` optimizer steps:

* **kNN top-1**: features of a bank of training images and of the held-out queries, each query's ``k`` most
  cosine-similar bank images vote with weight ``exp(similarity / T)`` (`linear_probe.knn_scores`, the protocol of the
  final probe). The feature is the classifier's input at initialisation: LayerNorm (no affine) of the mean patch
  token for ViT encoders, the global average (ConvNeXt: its final LayerNorm) for CNNs.
* **Reconstruction gain** per view (low-pass, high-pass), in dB: PSNR of the input's kept band completed with the
  prediction's removed band (`visualization.combine_bands`, the picture's last image column) against the original,
  minus the PSNR of the corrupted input. 0 dB: the prediction adds nothing in the removed band; the high-pass view
  gains as soon as the mean colour is predicted, the low-pass view only when detail is restored.

Everything runs batched on the model's device, in eval mode under the run's autocast, between two optimizer steps;
the values are read to the host once per measurement, so the training step itself gains no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...frequency import filter_frequencies
from .linear_probe import knn_scores
from .visualization import combine_bands, reconstruction_picture, view_masks

__all__ = [
    "MonitorArguments",
    "MonitorImages",
    "RepresentationMonitor",
    "describe_measurement",
    "encoder_features",
    "knn_top1",
    "psnr",
    "reconstruction_gain",
    "reconstruction_report",
    "summarize_measurements",
]


@dataclass(kw_only=True)
class MonitorArguments:
    """The monitor's flags, shared by every script that pre-trains."""

    monitor_steps: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps (and at the start and end), kNN top-1 of the encoder and the "
                          "reconstruction gain per view on the held-out slice (needs --validation_split_size or "
                          "--validation_split_percentage and a label column); 0 turns it off."},
    )
    monitor_bank_size: int = field(
        default=5000, metadata={"help": "Training images in the kNN bank (a stratified choice, fixed for the run)."}
    )
    monitor_eval_size: int = field(
        default=5000, metadata={"help": "Held-out images the kNN classifies (a stratified choice of the slice)."}
    )
    monitor_gain_size: int = field(
        default=512, metadata={"help": "Held-out images of the reconstruction gain (the first of the queries)."}
    )
    knn_k: int = field(default=20, metadata={"help": "Neighbours that vote in the kNN."})
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN vote weight exp(similarity / T)."})

    def check_monitor(self) -> None:
        for name in ("monitor_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("monitor_bank_size", "monitor_eval_size", "monitor_gain_size", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")


@dataclass
class MonitorImages:
    """Labelled uint8 images (N, 3, S, S) on the device: the kNN bank (training rows) and the held-out queries."""

    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.bank_images) != len(self.bank_labels) or len(self.query_images) != len(self.query_labels):
            raise ValueError("monitor images and labels must have the same length")
        if len(self.bank_images) == 0 or len(self.query_images) == 0:
            raise ValueError("the monitor needs at least one bank image and one query image")


# ---------------------------------------------------------------------------------------------------- measurements
def _normalise(images: torch.Tensor, model: Any) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the model's normalised float input."""
    return model.normalize(images.float() / 255.0)


@torch.no_grad()
def encoder_features(model: Any, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) float32 features of uint8 images by the pre-training model's encoder (see the module docstring)."""
    features = []
    for start in range(0, len(images), batch_size):
        hidden = model.mfm(_normalise(images[start:start + batch_size], model)).last_hidden_state
        if model.config.is_vit:
            pooled = hidden[:, 1:].float().mean(dim=1)
            pooled = F.layer_norm(pooled, pooled.shape[-1:])
        else:
            pooled = hidden.float().mean(dim=(-2, -1))
            if hasattr(model.mfm.backbone, "layernorm"):
                pooled = model.mfm.backbone.layernorm(pooled).float()
        features.append(pooled)
    return torch.cat(features)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """kNN top-1 (%) as a 0-d tensor on the features' device."""
    votes = knn_scores(bank, bank_labels, queries, num_classes, k, temperature)
    return (votes.argmax(dim=1) == query_labels).float().mean() * 100.0


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1] against the reference (peak 1; an exact copy counts as 100 dB)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_gain(model: Any, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Mean PSNR gain (dB, 0-d tensors) of each view's kept band completed with the predicted band over its
    corrupted input, on uint8 images (see the module docstring)."""
    height, width = images.shape[-2:]
    masks = view_masks(model, height, width, images.device)
    totals = {view: torch.zeros((), device=images.device) for view in masks}
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        original = chunk.float() / 255.0
        for view, keep in masks.items():
            keep = keep.expand(len(chunk), height, width)
            output = model(model.normalize(original), frequency_mask=keep, return_dict=True)
            predicted = model.unnormalize(output.reconstruction.float()).clamp(0, 1)
            completed = combine_bands(original, predicted, keep)
            corrupted = filter_frequencies(original, keep)
            totals[view] += (psnr(completed, original) - psnr(corrupted, original)).sum()
    return {view: total / len(images) for view, total in totals.items()}


@torch.no_grad()
def reconstruction_report(model: Any, images: torch.Tensor, shown: int = 8) -> tuple[dict[str, float], Any]:
    """The reconstruction gain per view on uint8 ``images`` and the picture of the first ``shown`` of them
    (alternating low-pass / high-pass rows, with spectra), titled with the gain: what the study and
    ``benchmarks/reconstruction_gain.py`` show of a pre-trained model."""
    gains = {view: float(gain) for view, gain in reconstruction_gain(model, images).items()}
    title = (f"gain over the corrupted input on {len(images)} images: low-pass {gains['low_pass']:+.2f} dB, "
             f"high-pass {gains['high_pass']:+.2f} dB PSNR")
    return gains, reconstruction_picture(model, images[:shown], title=title)


# ---------------------------------------------------------------------------------------------------- the monitor
class RepresentationMonitor:
    """Measures a pre-training model on fixed `MonitorImages` (the same images at every measurement)."""

    def __init__(self, images: MonitorImages, k: int = 20, temperature: float = 0.07, gain_size: int = 512,
                 batch_size: int = 512) -> None:
        if k < 1 or temperature <= 0 or gain_size < 1:
            raise ValueError(f"k and gain_size must be >= 1 and temperature > 0, got {k}, {gain_size}, {temperature}")
        self.images, self.k, self.temperature = images, k, temperature
        self.gain_size, self.batch_size = gain_size, batch_size

    @torch.no_grad()
    def measure(self, model: Any) -> dict[str, float]:
        """``{"knn_top1", "gain_low_pass_db", "gain_high_pass_db"}`` of ``model`` (an unwrapped
        `MFMForPreTraining`) in eval mode, read to the host once at the end; the model's mode is restored. (The
        pre-training loop logs them as ``eval/<name>``.)"""
        was_training = model.training
        model.eval()
        try:
            images = self.images
            bank = encoder_features(model, images.bank_images, self.batch_size)
            queries = encoder_features(model, images.query_images, self.batch_size)
            values = {"knn_top1": knn_top1(bank, images.bank_labels, queries, images.query_labels,
                                           images.num_classes, self.k, self.temperature)}
            if model.config.corruption == "mfm":
                gains = reconstruction_gain(model, images.query_images[: self.gain_size], self.batch_size)
                values.update({f"gain_{view}_db": gain for view, gain in gains.items()})
        finally:
            model.train(was_training)
        host = torch.stack(list(values.values())).tolist()
        return {name: round(value, 4) for name, value in zip(values, host)}


def describe_measurement(step: int, values: dict[str, float]) -> str:
    """One line for the progress output."""
    line = f"step {step}: kNN top-1 {values['knn_top1']:.2f} %"
    if "gain_low_pass_db" in values:
        line += (f", reconstruction gain low-pass {values['gain_low_pass_db']:+.2f} dB, "
                 f"high-pass {values['gain_high_pass_db']:+.2f} dB")
    return line


def summarize_measurements(records: list[dict[str, Any]]) -> dict[str, str]:
    """The model card's lines from the logged records (``metrics.jsonl``, all invocations of the run, where
    pre-training logs each measurement as ``eval/<name>``): the first and the last measurement."""
    measured = [{key.removeprefix("eval/"): value for key, value in record.items()}
                for record in records if "eval/knn_top1" in record]
    if not measured:
        return {}
    first, last = measured[0], measured[-1]
    summary = {"kNN top-1 on the held-out slice (monitor)":
               f"{last['knn_top1']:.2f} % at step {last['step']} (step {first['step']}: {first['knn_top1']:.2f} %)"}
    if "gain_low_pass_db" in last:
        summary["reconstruction gain on the held-out slice, low-pass / high-pass view"] = (
            f"{last['gain_low_pass_db']:+.2f} / {last['gain_high_pass_db']:+.2f} dB PSNR over the corrupted input "
            f"(step {first['step']}: {first['gain_low_pass_db']:+.2f} / {first['gain_high_pass_db']:+.2f} dB)"
        )
    return summary
