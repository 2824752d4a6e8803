"""JPEG decoding on the accelerator: workers only read the file and draw the crop, the device decodes, crops,
resizes and flips.

Why: a PIL worker decodes, crops and resizes a few hundred ImageNet JPEGs per second per core (docs/performance.md),
so a host with few cores per GPU cannot feed a fast MFM step. With ``--decode_on_device`` a worker reads the JPEG's
header (size, mode) and its bytes, draws the RandomResizedCrop box and the flip from the sample's generator exactly
as `PretrainTransform` does (same draws, same order: the same sample gets the same crop on either path), and
returns an `EncodedCrop`. On the device, `decode_batch` decodes the batch with ``torchvision.io.decode_jpeg``
(nvJPEG on CUDA, batched), crops, resizes with antialiased bicubic interpolation (`resized_crop`, as the PIL path) and
flips. Images nvJPEG may not take (PNG, greyscale or CMYK JPEGs, decoded in-memory images) fall back to the PIL
path in the worker and travel decoded in the same batch.

Crop boxes and flips travel as Python lists, not tensors: the device code slices with them, and tensors moved to
the accelerator would have to be read back (a host-device synchronisation per image).

On CUDA the decoder runs under a stream of its own (`decode_jpegs`). torchvision's nvJPEG decoder allocates its
outputs on the current stream but writes them from a private stream that does not wait for the current one; the
caching allocator hands it blocks that kernels still queued on the training stream (the last step's backward and
optimizer) are about to read, and the decoder overwrites them: parameters turn to NaN a few steps into training.
Under a stream that runs no kernels, the decoder only gets blocks that stream freed, and
`Tensor.record_stream` keeps each image's block from returning to it while the training stream still uses it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .transforms import PretrainTransform, read_encoded, resized_crop

with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs in favour of TorchCodec
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg

logger = logging.getLogger(__name__)

__all__ = ["DeviceDecodeTransform", "EncodedCrop", "collate_encoded_batches", "decode_batch", "decode_jpegs"]

# JPEG modes nvJPEG decodes to RGB as libjpeg does (YCbCr colour); the others go through PIL in the worker.
DEVICE_JPEG_MODES = frozenset({"RGB"})


@dataclass(frozen=True)
class EncodedCrop:
    """A JPEG still encoded, with the augmentation drawn for it: the crop box in full-resolution pixels
    (``top, left, height, width``) and whether to flip it horizontally."""

    data: bytes
    top: int
    left: int
    height: int
    width: int
    flip: bool


class DeviceDecodeTransform:
    """Worker side of device decoding: opened PIL image -> `EncodedCrop` for RGB JPEGs, else the decoded
    ``uint8`` tensor of ``fallback`` (the PIL path, same crop distribution)."""

    def __init__(self, fallback: PretrainTransform) -> None:
        self.fallback = fallback
        self.size = fallback.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fallback={self.fallback!r})"

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> EncodedCrop | torch.Tensor:
        if image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES or getattr(image, "fp", None) is None:
            return self.fallback(image, rng)  # not an RGB JPEG file still encoded: the PIL path
        (top, left, crop_h, crop_w), flip = self.fallback.draw(image.size, rng)
        return EncodedCrop(read_encoded(image), top, left, crop_h, crop_w, flip)


def collate_encoded_batches(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples whose ``pixel_values`` are `EncodedCrop` s or decoded ``uint8`` tensors -> a batch for
    `decode_batch`: the JPEGs (bytes, crop boxes, flips, positions) as lists, the decoded ones stacked."""
    encoded = [(i, s["pixel_values"]) for i, s in enumerate(samples) if isinstance(s["pixel_values"], EncodedCrop)]
    decoded = [(i, s["pixel_values"]) for i, s in enumerate(samples) if not isinstance(s["pixel_values"], EncodedCrop)]
    if decoded:
        decoded_pixels = torch.stack([pixels for _, pixels in decoded])
    else:
        decoded_pixels = torch.empty(0, dtype=torch.uint8)
    return {
        "jpeg_crops": [crop for _, crop in encoded],
        "jpeg_positions": [i for i, _ in encoded],
        "decoded_pixels": decoded_pixels,
        "decoded_positions": [i for i, _ in decoded],
        "batch_size": len(samples),
        "skipped": torch.tensor(sum(int(s["skipped"]) for s in samples), dtype=torch.int64),
    }


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG bytes (1-D ``uint8`` CPU tensors) -> RGB ``uint8`` (3, H, W) images on ``device``, decoded in one
    batched call; on CUDA safe for the kernels queued on the current stream (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    consumer = torch.cuda.current_stream(device)
    decoder_stream = _DECODE_STREAMS.get(device)
    if decoder_stream is None:
        decoder_stream = _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(decoder_stream):
        images = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    consumer.wait_stream(decoder_stream)
    for image in images:
        image.record_stream(consumer)
    return images


def _decode_all(crops: list[EncodedCrop], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes the JPEGs on ``device`` in one batched call; if that fails (one corrupt file fails the whole
    batch), decodes them one by one, on the device then on the CPU, and returns None for the unreadable ones."""
    tensors = [torch.frombuffer(bytearray(crop.data), dtype=torch.uint8) for crop in crops]
    try:
        return list(decode_jpegs(tensors, device))
    except RuntimeError:
        pass
    images: list[torch.Tensor | None] = []
    for tensor in tensors:
        image = None
        for target in dict.fromkeys([device, torch.device("cpu")]):
            try:
                image = decode_jpegs([tensor], target)[0].to(device)
                break
            except RuntimeError:
                continue
        images.append(image)
    return images


def _crop_resize_flip(image: torch.Tensor, crop: EncodedCrop, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): the crop resized as on the PIL path (`resized_crop`), then flipped
    if drawn so."""
    if image.shape[-2] < crop.top + crop.height or image.shape[-1] < crop.left + crop.width:
        raise ValueError(f"crop box {crop.top, crop.left, crop.height, crop.width} lies outside the decoded image "
                         f"{tuple(image.shape[-2:])}: the header and the data disagree")
    resized = resized_crop(image, crop.top, crop.left, crop.height, crop.width, size)
    return resized.flip(-1) if crop.flip else resized


def decode_batch(batch: dict[str, Any], size: int, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """A batch from `collate_encoded_batches` -> (``uint8`` (B, 3, size, size) on ``device``, number of images
    that could not be decoded). An unreadable JPEG is replaced by another image of the batch, so the batch keeps its
    size, and counts as skipped (as an unreadable file does on the PIL path)."""
    device = torch.device(device)
    total = int(batch["batch_size"])
    out = torch.empty(total, 3, size, size, dtype=torch.uint8, device=device)
    if batch["decoded_positions"]:
        positions = torch.tensor(batch["decoded_positions"], dtype=torch.long).to(device, non_blocking=True)
        out.index_copy_(0, positions, batch["decoded_pixels"].to(device, non_blocking=True))
    crops: list[EncodedCrop] = batch["jpeg_crops"]
    failed: list[int] = []
    done: list[int] = list(batch["decoded_positions"])
    if crops:
        for position, crop, image in zip(batch["jpeg_positions"], crops, _decode_all(crops, device)):
            try:
                if image is None:
                    raise ValueError("the JPEG data could not be decoded")
                out[position] = _crop_resize_flip(image, crop, size)
                done.append(position)
            except ValueError as error:
                logger.warning("skipping an undecodable JPEG (%d bytes): %s", len(crop.data), error)
                failed.append(position)
    if failed:
        if not done:
            raise RuntimeError(f"none of the {total} images of the batch could be decoded")
        for i, position in enumerate(failed):
            out[position] = out[done[i % len(done)]]
    return out, len(failed)
