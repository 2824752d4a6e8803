"""The pre-training augmentation of MFM: RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) + horizontal flip.

Why not torchvision's transform object: the crop parameters here are drawn from an explicit ``numpy`` generator
(one per sample, seeded from (seed, epoch, index)), so that a sample looks the same whichever worker, process or
resumed run produces it; and the crop is known *before* the image is decoded, which lets JPEGs be decoded at a
reduced resolution (PIL draft mode, DCT scaling by 1/2, 1/4 or 1/8) when the crop is going to be downscaled anyway
(the crop box is then mapped to the reduced image, to the nearest reduced pixel). JPEGs decoded at full size go
through torchvision's libjpeg-turbo decoder instead of PIL's: the same pixels, faster.

The crop is cut, then resized with antialiased bicubic interpolation, as torchvision's ``resized_crop`` does on PIL
images in the official pipeline; the resize runs in torch's ``uint8`` kernel, which reproduces PIL's BICUBIC filter
faster than PIL's own resize (``benchmarks/benchmark.py --pipeline_stages`` times both).

The output is a ``uint8`` tensor (C, H, W): four times less data through worker queues, pinned memory and the
host-to-device copy than float32. Normalisation happens on the device (`normalize_on_device`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

__all__ = [
    "DEFAULT_CROP_RATIO",
    "DEFAULT_CROP_SCALE",
    "PretrainTransform",
    "normalize_on_device",
    "read_encoded",
    "resized_crop",
    "sample_resized_crop",
    "to_rgb",
]

DEFAULT_CROP_SCALE = (0.2, 1.0)  # official MFM pre-training
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Draws a RandomResizedCrop box ``(top, left, crop_height, crop_width)`` for an image of ``width x height``.

    The distribution is torchvision's: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``, up to ``attempts`` tries to fit the box, then a centre crop clipped to ``ratio``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    # fallback: the largest centred box whose aspect ratio is within `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _scaled_to_uint8(array: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.round(array.astype(np.float64) * (255.0 / max_value)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    Greyscale, palette and CMYK images are converted by PIL; 16-bit and 32-bit integer images are rescaled from
    their full range (PIL's own conversion would clip them to 255); float images in [0, 1] are scaled by 255;
    images with transparency are composited over ``background`` (what the transparent pixels hide is undefined).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return Image.fromarray(_scaled_to_uint8(np.asarray(image), 65535.0), mode="L").convert("RGB")
    if mode == "I":
        array = np.asarray(image)
        max_value = 65535.0 if array.max(initial=0) > 255 else 255.0
        return Image.fromarray(_scaled_to_uint8(array, max_value), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image)
        max_value = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(_scaled_to_uint8(array, max_value), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class PretrainTransform:
    """Opened PIL image -> augmented ``uint8`` tensor (3, size, size).

    Args:
        size: output side length (the model's image_size).
        scale, ratio: RandomResizedCrop area and aspect-ratio ranges (official: scale (0.2, 1.0)).
        hflip_probability: probability of a horizontal flip.
        jpeg_draft: decode JPEGs at a reduced resolution when the crop is downscaled by 2x or more.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = DEFAULT_CROP_SCALE,
        ratio: Sequence[float] = DEFAULT_CROP_RATIO,
        hflip_probability: float = 0.5,
        jpeg_draft: bool = True,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0.0 <= hflip_probability <= 1.0:
            raise ValueError(f"hflip_probability must be in [0, 1], got {hflip_probability}")
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip_probability = hflip_probability
        self.jpeg_draft = jpeg_draft

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip_probability={self.hflip_probability}, jpeg_draft={self.jpeg_draft})"
        )

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        box, flip = self.draw(image.size, rng)  # the size comes from the header: nothing is decoded yet
        pixels, box = self.decode(image, box)
        return self.crop(pixels, box, flip)

    def draw(
        self, image_size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[tuple[int, int, int, int], bool]:
        """A sample's random draws, in this order: the crop box ``(top, left, height, width)`` for an image of
        ``image_size`` (width, height), then the flip."""
        box = sample_resized_crop(image_size[0], image_size[1], rng, self.scale, self.ratio)
        return box, bool(rng.random() < self.hflip_probability)

    def decode(
        self, image: Image.Image, box: tuple[int, int, int, int]
    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Decodes an opened image to ``uint8`` (3, H, W), at a reduced size when it is a JPEG and the crop ``box``
        is downscaled by 2x or more (draft mode), and returns the box in the decoded pixels."""
        width, height = image.size
        if image.format in ("JPEG", "MPO"):
            if self.jpeg_draft:
                _, _, crop_h, crop_w = box
                # ask for the smallest decode in which the crop still has >= size pixels per side
                image.draft(
                    "RGB",
                    (max(1, math.ceil(width * self.size / crop_w)), max(1, math.ceil(height * self.size / crop_h))),
                )
            if image.size == (width, height):  # full size: libjpeg-turbo straight to RGB is faster than PIL
                pixels = _decode_full_jpeg(image)
                if pixels is not None:
                    return pixels, box
        image = to_rgb(image)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) view of the HWC array
        return pixels, _box_in_decoded_pixels(box, (width, height), image.size)

    def crop(self, pixels: torch.Tensor, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """Decoded ``uint8`` (3, H, W) -> the augmented ``uint8`` (3, size, size)."""
        out = resized_crop(pixels, *box, self.size)
        return (out.flip(-1) if flip else out).contiguous()


def read_encoded(image: Image.Image) -> bytes:
    """The file bytes of a lazily opened image (``Image.open`` keeps the file object until the pixels are loaded).
    The file stays open: the ``with`` block the image was opened in closes it."""
    image.fp.seek(0)
    return image.fp.read()


def _decode_full_jpeg(image: Image.Image) -> torch.Tensor | None:
    """A lazily opened RGB or greyscale JPEG -> ``uint8`` (3, H, W) by torchvision's libjpeg-turbo decoder, or None
    when PIL must decode it (CMYK, or an image already loaded: then PIL has no tiles left to decode).

    Why: PIL decodes into 4-byte pixels and then packs them to RGB; torchvision writes packed RGB directly, which
    is faster, and the pixels are the same (both are libjpeg-turbo with the same settings, and neither applies the
    EXIF orientation). The result is, like PIL's, a
    (3, H, W) view of height x width x 3 memory, the layout the ``uint8`` resize is fastest on. PIL does not read
    the file then, so it does not close it either: open images with ``with``.
    """
    if getattr(image, "fp", None) is None or not getattr(image, "tile", None) or image.mode not in ("RGB", "L"):
        return None
    encoded = torch.frombuffer(bytearray(read_encoded(image)), dtype=torch.uint8)
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)
    except RuntimeError as error:  # truncated or corrupt data: the OSError PIL would raise, with the decoder's reason
        raise OSError(f"cannot decode the JPEG: {str(error).splitlines()[-1].split(', ')[-1]}") from error


def _box_in_decoded_pixels(
    box: tuple[int, int, int, int], full_size: tuple[int, int], decoded_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Maps a crop box drawn on the full image to an image decoded at a reduced size (JPEG draft), to the nearest
    reduced pixel; the identity when nothing was reduced."""
    if decoded_size == full_size:
        return box
    top, left, crop_h, crop_w = box
    scale_x, scale_y = decoded_size[0] / full_size[0], decoded_size[1] / full_size[1]
    new_top = min(round(top * scale_y), decoded_size[1] - 1)
    new_left = min(round(left * scale_x), decoded_size[0] - 1)
    bottom = min(max(round((top + crop_h) * scale_y), new_top + 1), decoded_size[1])
    right = min(max(round((left + crop_w) * scale_x), new_left + 1), decoded_size[0])
    return new_top, new_left, bottom - new_top, right - new_left


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``uint8`` (C, H, W) -> ``uint8`` (C, size, size): the box cut out, then resized with antialiased bicubic
    interpolation (PIL's BICUBIC filter). On the CPU this runs in torch's ``uint8`` kernel; other devices have no
    such kernel and go through float32, rounded back."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"image must be uint8 (C, H, W), got {image.dtype} {tuple(image.shape)}")
    region = image[None, :, top : top + height, left : left + width]
    if image.device.type == "cpu":
        return F.interpolate(region, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    resized = F.interpolate(region.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def normalize_on_device(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``uint8`` (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, computed where ``images`` lives (the
    accelerator), as torchvision's ``ToTensor`` + ``Normalize`` do on the host."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t
