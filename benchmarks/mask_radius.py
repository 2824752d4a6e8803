"""What does a mask radius remove? The spectrum shares and corrupted-input quality of MFM's two views, per radius,
on real images: the official setting (224 px, radius 16, patch 16) next to candidates for 32 px (CIFAR-10).

For each radius r at image size S and patch size p it reports: the share of the S x S frequencies the low-pass view
keeps (d² < r²); the radius in units of the token grid's Nyquist frequency S / (2p) (the official 16 at 224 / 16 is
2.29: the low-pass view keeps detail finer than a token); the share of the normalised images' spectral energy (DC
included, as in the loss target) in the band each view removes; and the PSNR of each view's input against the
original in [0, 1]. CPU only, seconds.

    python benchmarks/mask_radius.py --cifar_file 'data/cifar10/*.parquet' --imagenet_dir data/imagenet-samples
"""

from __future__ import annotations

import glob
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.configuration_mfm import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_IMAGE_SIZE,
    OFFICIAL_MASK_RADIUS,
    official_mask_radius,
)
from modeling_mfm.frequency import filter_frequencies, low_pass_mask

CIFAR_RADIUS = official_mask_radius(32)


@dataclass
class MaskRadiusArguments:
    cifar_file: str = field(metadata={"help": "CIFAR-10 parquet file(s), a quoted glob pattern."})
    imagenet_dir: str | None = field(
        default=None, metadata={"help": "A folder of ImageNet JPEGs (the official setting, for reference)."}
    )
    count: int = field(default=2000, metadata={"help": "CIFAR images to measure."})
    radii: list[float] = field(
        default_factory=lambda: [CIFAR_RADIUS, 2 * CIFAR_RADIUS, 4.0, 4 * CIFAR_RADIUS],
        metadata={"help": "Radii to measure at 32 px (default: the official ratio 16 / 224, x2, 4 and x4)."},
    )


def radius_statistics(images: torch.Tensor, radius: float, patch: int) -> dict[str, float]:
    """``images``: float (N, 3, S, S) in [0, 1]."""
    size = images.shape[-1]
    keep = low_pass_mask(size, size, radius)
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    normalised = (images - mean) / std
    power = torch.fft.fftshift(torch.fft.fft2(normalised, norm="ortho"), dim=(-2, -1)).abs() ** 2
    low_energy = float((power * keep).sum() / power.sum())

    def psnr(view: torch.Tensor) -> float:
        mse = float(((view - images) ** 2).mean())
        return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")

    return {
        "image_size": size, "patch_size": patch, "radius": round(radius, 3),
        "radius_over_token_nyquist": round(radius / (size / (2 * patch)), 3),
        "low_pass_keeps_frequencies": int(keep.sum()),
        "low_pass_keeps_share": round(float(keep.mean()), 4),
        "energy_removed_by_low_pass": round(1 - low_energy, 4),
        "energy_removed_by_high_pass": round(low_energy, 4),
        "psnr_low_pass_input_db": round(psnr(filter_frequencies(images, keep)), 2),
        "psnr_high_pass_input_db": round(psnr(filter_frequencies(images, 1 - keep)), 2),
    }


def cifar_images(pattern: str, count: int) -> torch.Tensor:
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=pattern, split="train").select(range(count))
    arrays = [np.asarray(row["image"].convert("RGB")) for row in dataset]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def imagenet_images(folder: str, size: int = OFFICIAL_IMAGE_SIZE) -> torch.Tensor:
    arrays = []
    for path in sorted(glob.glob(f"{folder}/*.JPEG")):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(MaskRadiusArguments, prog="mask_radius.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    rows = []
    if args.imagenet_dir:
        official = radius_statistics(imagenet_images(args.imagenet_dir), OFFICIAL_MASK_RADIUS, 16)
        rows.append({"data": "ImageNet samples", **official})
    cifar = cifar_images(args.cifar_file, args.count)
    for radius in args.radii:
        for patch in (4, 2):
            rows.append({"data": "CIFAR-10", **radius_statistics(cifar, radius, patch)})
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(run_script(main))
