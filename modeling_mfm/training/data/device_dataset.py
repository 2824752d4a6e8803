"""Small-image datasets kept on the training device: decoded once, then batched, cropped and flipped there.

Why: at 32x32 a GPU trains on hundreds of images in less time than a per-sample CPU pipeline (open, decode, crop,
resize, collate, copy) takes to make them, nearly all of it Python overhead rather than pixels. Here the images are
decoded once (`load_device_images`, in DataLoader workers) into one ``uint8`` tensor (N, 3, S, S) on the device
(CIFAR-10's 50,000 images: 147 MiB), and `DeviceBatches` makes every batch there:

* order: a permutation of the N rows drawn on the device from ``(seed, epoch)``; global batch ``g`` of an epoch is
  rows ``g * B ... (g + 1) * B - 1`` of it, and process ``p`` of ``P`` takes batches ``p, p + P, ...`` (as
  Accelerate shards a map-style loader); the rows left over at the end of an epoch are dropped;
* augmentation of global batch ``g``: drawn from a device generator seeded with ``(seed, epoch, g)``, so a batch
  is the same whichever process makes it and after a resume (a resumed run repeats the uninterrupted one);
* RandomResizedCrop with torchvision's distribution (area fraction uniform in ``scale``, log aspect ratio uniform
  in ``log(ratio)``, 10 tries, integer boxes, centre-crop fallback) and a horizontal flip, resampled with PIL's
  antialiased bicubic filter (a = -0.5, kernel widened when downscaling, taps limited to the crop box: what
  torchvision's ``resized_crop`` computes on the PIL path), as two batched matrix products per batch
  (`resized_crop_batch`). Differences from the PIL path: float32 arithmetic, equal to torch's float antialiased
  resize of the crop within 1 of 255 after rounding, where PIL's 8-bit kernel rounds and clips between its two
  passes (at strong edges the paths differ by a few levels; on CIFAR-10 crops by 0.2 of 255 on average); the crop is
  taken from the stored S x S image, so images of another size were first centre-cropped to a square and resized
  to S (`load_device_images`); and the random draws come from a torch device generator, not numpy's per-sample
  generators;
* fine-tuning additions (`DeviceBatches` with ``mean``/``std``): normalisation and torchvision's
  ``RandomErasing(p, value="random")`` (area 0.02-1/3, aspect 0.3-3.3, per-pixel normal noise), batched. Mixup and
  CutMix already run on the device in the loop (`mixup`). RandAugment, a per-image PIL transform, is not available
  on this path.

The step's code reads no value back from the device (no host synchronisation); the resampling and erasing functions
take their random draws as tensors, with static shapes, so ``torch.compile`` can trace them whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..run.randomness import derive_seed
from .sources import open_image
from .transforms import DEFAULT_CROP_RATIO, normalize_on_device, resized_crop, to_rgb

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceBatches",
    "DeviceImages",
    "InMemoryDataset",
    "cache_in_memory",
    "crop_resize_weights",
    "load_device_images",
    "random_erasing_batch",
    "resized_crop_batch",
    "sample_crop_boxes",
    "sample_erasing_boxes",
]

SEED_TAG = 2  # randomness domains: 0 = per-sample data (sources.py), 1 = the model's draws (pretrain.py), 2 = this
ERASING_SCALE = (0.02, 1.0 / 3.0)  # torchvision's RandomErasing defaults
ERASING_RATIO = (0.3, 3.3)


# ---------------------------------------------------------------------------------------------------- decoding
@dataclass
class DeviceImages:
    """``images``: ``uint8`` (N, 3, S, S) on the device; ``labels``: ``int64`` (N,) or None; ``skipped``: rows that
    could not be decoded and were left out."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])


class _DecodedRows(Dataset):
    """Row ``i`` -> ``(uint8 (3, S, S), label, readable)``; an unreadable image gives zeros and ``readable=False``."""

    def __init__(self, dataset: datasets.Dataset, column: str, label_column: str | None, size: int) -> None:
        self.dataset, self.column, self.label_column, self.size = dataset, column, label_column, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        row = self.dataset[index]
        label = int(row[self.label_column]) if self.label_column is not None else -1
        try:
            with open_image(row[self.column]) as image:
                pixels = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)
        except Exception as error:  # any decoding problem: skipped and counted, as on the PIL path
            logger.warning("skipping unreadable image in row %d: %s: %s", index, type(error).__name__, error)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, False
        height, width = pixels.shape[-2:]
        if (height, width) != (self.size, self.size):  # the centre square, resized to size x size
            side = min(height, width)
            pixels = resized_crop(pixels, (height - side) // 2, (width - side) // 2, side, side, self.size)
        return pixels.contiguous(), label, True


def load_device_images(
    dataset: datasets.Dataset,
    column: str,
    size: int,
    device: torch.device | str,
    label_column: str | None = None,
    num_workers: int = 0,
    batch_size: int = 512,
) -> DeviceImages:
    """Decodes every row of ``dataset`` (an undecoded image ``column``, optional integer ``label_column``) into
    ``uint8`` (N, 3, size, size) on ``device``; images of another size are centre-cropped to a square and resized
    (antialiased bicubic). Unreadable rows are left out and counted."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    loader = DataLoader(_DecodedRows(dataset, column, label_column, size), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    images, labels, readable = [], [], []
    for batch_images, batch_labels, batch_readable in loader:
        images.append(batch_images)
        labels.append(batch_labels)
        readable.append(batch_readable)
    keep = torch.cat(readable)
    skipped = int((~keep).sum())
    if skipped == len(keep):
        raise ValueError(f"none of the {len(keep)} images could be decoded")
    images_cpu = torch.cat(images)[keep]
    labels_cpu = torch.cat(labels)[keep].long() if label_column is not None else None
    if skipped:
        logger.warning("left out %d unreadable images of %d", skipped, len(keep))
    device = torch.device(device)
    return DeviceImages(
        images_cpu.to(device), labels_cpu.to(device) if labels_cpu is not None else None, skipped=skipped
    )


class InMemoryDataset(Dataset):
    """Rows of already transformed tensors: ``{"pixel_values", "labels", "skipped", "valid"}`` (see
    `cache_in_memory`); a row whose image could not be read keeps ``valid = False`` so that metrics leave it out."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        self.pixel_values, self.labels, self.valid = pixel_values, labels, valid

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        valid = bool(self.valid[index])
        return {"pixel_values": self.pixel_values[index], "labels": int(self.labels[index]), "skipped": int(not valid),
                "valid": valid}


def _stack_rows(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.stack([r["pixel_values"] for r in rows]),
        torch.tensor([r["labels"] for r in rows], dtype=torch.long),
        torch.tensor([r.get("valid", True) for r in rows], dtype=torch.bool),
    )


def cache_in_memory(dataset: Dataset, num_workers: int = 0, batch_size: int = 256) -> InMemoryDataset:
    """Runs a deterministic (evaluation) dataset of ``{"pixel_values", "labels"}`` rows once and keeps the result,
    so that evaluating every epoch costs no decoding."""
    pixel_values, labels, valid = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=_stack_rows)
    for batch_pixels, batch_labels, batch_valid in loader:
        pixel_values.append(batch_pixels)
        labels.append(batch_labels)
        valid.append(batch_valid)
    return InMemoryDataset(torch.cat(pixel_values), torch.cat(labels), torch.cat(valid))


# ---------------------------------------------------------------------------------------------------- random draws
def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _first_fit(fits: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each row, the values of the first try that fits (any row: the first try when none fits)."""
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    return tuple(v.gather(1, first).squeeze(1) for v in values)


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes ``(top, left, crop_height, crop_width)``, float tensors (B,) of integer values,
    with torchvision's distribution (see the module docstring), drawn on ``generator``'s device."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    shape = (batch_size, attempts)
    area = height * width * _uniform(generator, shape, scale[0], scale[1])
    aspect = torch.exp(_uniform(generator, shape, math.log(ratio[0]), math.log(ratio[1])))
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    crop_h, crop_w = _first_fit(fits, crop_h, crop_w)
    # no try fits: the largest centred box whose aspect ratio is within `ratio`
    if width / height < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    any_fit = fits.any(dim=1)
    crop_h = torch.where(any_fit, crop_h, float(fallback_h))
    crop_w = torch.where(any_fit, crop_w, float(fallback_w))
    corner = torch.rand((2, batch_size), generator=generator, device=generator.device)
    top = torch.where(any_fit, torch.floor(corner[0] * (height - crop_h + 1)), float((height - fallback_h) // 2))
    left = torch.where(any_fit, torch.floor(corner[1] * (width - crop_w + 1)), float((width - fallback_w) // 2))
    return top, left, crop_h, crop_w


def sample_erasing_boxes(
    batch_size: int,
    height: int,
    width: int,
    probability: float,
    generator: torch.Generator,
    scale: Sequence[float] = ERASING_SCALE,
    ratio: Sequence[float] = ERASING_RATIO,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision ``RandomErasing`` draws: ``(erase, top, left, box_height, box_width)``, (B,) tensors; ``erase``
    is False where the image is left alone (probability ``1 - probability``, or no try fitted)."""
    shape = (batch_size, attempts)
    erase = torch.rand(batch_size, generator=generator, device=generator.device) < probability
    area = height * width * _uniform(generator, shape, scale[0], scale[1])
    aspect = torch.exp(_uniform(generator, shape, math.log(ratio[0]), math.log(ratio[1])))
    box_h = torch.round(torch.sqrt(area * aspect))
    box_w = torch.round(torch.sqrt(area / aspect))
    fits = (box_h < height) & (box_w < width)
    box_h, box_w = _first_fit(fits, box_h, box_w)
    corner = torch.rand((2, batch_size), generator=generator, device=generator.device)
    top = torch.floor(corner[0] * (height - box_h + 1))
    left = torch.floor(corner[1] * (width - box_w + 1))
    return erase & fits.any(dim=1), top, left, box_h, box_w


# ---------------------------------------------------------------------------------------------------- resampling
def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The cubic convolution kernel PIL's BICUBIC filter uses (a = -0.5), zero beyond |x| = 2."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def crop_resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) resampling matrices of the intervals ``[start, start + length)`` (B,) of an axis of
    ``in_size`` pixels: PIL's antialiased bicubic resize of the cropped interval to ``out_size`` pixels. Output pixel
    ``j`` is centred at ``start + (j + 0.5) * length / out_size``; the kernel is widened by the downscaling factor,
    only pixels inside the interval contribute, and each row sums to 1."""
    device = start.device
    scale = length / out_size
    support = scale.clamp(min=1.0)
    centres = start[:, None] + (torch.arange(out_size, device=device) + 0.5)[None, :] * scale[:, None]
    positions = torch.arange(in_size, device=device) + 0.5
    weights = _bicubic((positions[None, None, :] - centres[:, :, None]) / support[:, None, None])
    inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < (start + length)[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crop_batch(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    crop_height: torch.Tensor,
    crop_width: torch.Tensor,
    flip: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """``uint8`` (B, C, H, W) -> ``uint8`` (B, C, size, size): each image's box resized as on the PIL path
    (`crop_resize_weights`), then mirrored where ``flip`` (B,) is True."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    rows = crop_resize_weights(top, crop_height, images.shape[-2], size)  # (B, size, H)
    columns = crop_resize_weights(left, crop_width, images.shape[-1], size)  # (B, size, W)
    columns = torch.where(flip[:, None, None], columns.flip(1), columns)
    resized = rows[:, None] @ images.float() @ columns.transpose(1, 2)[:, None]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def random_erasing_batch(
    images: torch.Tensor,
    erase: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    box_height: torch.Tensor,
    box_width: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Float (B, C, H, W) with each erased image's box replaced by ``noise`` (same shape) (`sample_erasing_boxes`)."""
    rows = torch.arange(images.shape[-2], device=images.device)[None, :]
    columns = torch.arange(images.shape[-1], device=images.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + box_height)[:, None])  # (B, H)
    inside_columns = (columns >= left[:, None]) & (columns < (left + box_width)[:, None])  # (B, W)
    box = erase[:, None, None] & inside_rows[:, :, None] & inside_columns[:, None, :]
    return torch.where(box[:, None], noise, images)


# ---------------------------------------------------------------------------------------------------- batches
class DeviceBatches:
    """This process's batches of `DeviceImages`, made on the device (see the module docstring).

    Yields ``{"pixel_values", "skipped"}`` (plus ``"labels"`` when the images have labels): ``uint8`` images, or
    normalised float32 images (then randomly erased with probability ``random_erasing``) when ``mean`` and ``std``
    are given. ``skipped`` is a zero tensor (unreadable images were left out when decoding).
    """

    def __init__(
        self,
        data: DeviceImages,
        batch_size: int,
        seed: int,
        size: int | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = DEFAULT_CROP_RATIO,
        hflip_probability: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        random_erasing: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (normalised output) or neither (uint8 output)")
        if random_erasing and mean is None:
            raise ValueError("random_erasing needs normalised output (mean and std)")
        for name, value in (("hflip_probability", hflip_probability), ("random_erasing", random_erasing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.size = int(size or data.images.shape[-1])
        self.process_index, self.num_processes = int(process_index), int(num_processes)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip_probability = float(hflip_probability)
        self.mean, self.std = mean, std
        self.random_erasing = float(random_erasing)
        self.device = data.images.device
        self.epoch = 0
        self._order: tuple[int, torch.Tensor] | None = None
        self._zero = torch.zeros((), dtype=torch.int64, device=self.device)
        if len(self) == 0:
            raise ValueError(
                f"{len(data)} images make no batch of {self.batch_size} x {self.num_processes} processes"
            )

    def __len__(self) -> int:
        """Batches per epoch for each process."""
        return len(self.data) // (self.batch_size * self.num_processes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """This process's batches ``start, start + 1, ..., stop - 1`` (default: the last) of ``epoch``."""
        for index in range(start, len(self) if stop is None else min(stop, len(self))):
            yield self.batch(epoch, index)

    def _generator(self, *keys: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, SEED_TAG, *keys))
        return generator

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the rows (on the device; kept until the next epoch is asked for)."""
        if self._order is None or self._order[0] != epoch:
            generator = self._generator(0, epoch)
            self._order = (epoch, torch.randperm(len(self.data), generator=generator, device=self.device))
        return self._order[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of this process in ``epoch`` (global batch ``index * processes + process``)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: {len(self)} batches per epoch")
        global_index = index * self.num_processes + self.process_index
        rows = self.order(epoch)[global_index * self.batch_size:(global_index + 1) * self.batch_size]
        generator = self._generator(1, epoch, global_index)
        images = self.data.images.index_select(0, rows)
        height, width = images.shape[-2:]
        top, left, crop_h, crop_w = sample_crop_boxes(len(rows), height, width, generator, self.scale, self.ratio)
        flip = torch.rand(len(rows), generator=generator, device=self.device) < self.hflip_probability
        pixels = resized_crop_batch(images, top, left, crop_h, crop_w, flip, self.size)
        if self.mean is not None:
            pixels = normalize_on_device(pixels, self.mean, self.std)
            if self.random_erasing > 0:
                boxes = sample_erasing_boxes(len(rows), self.size, self.size, self.random_erasing, generator)
                noise = torch.randn(pixels.shape, generator=generator, device=self.device)
                pixels = random_erasing_batch(pixels, *boxes, noise)
        batch = {"pixel_values": pixels, "skipped": self._zero}
        if self.data.labels is not None:
            batch["labels"] = self.data.labels.index_select(0, rows)
        return batch
