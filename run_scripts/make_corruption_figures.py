#!/usr/bin/env python
"""Draws one picture per pretext (mfm, sr, deblur, denoise): original | corrupted | both log-magnitude spectra.

    python run_scripts/make_corruption_figures.py --photo_dir PHOTOS          # -> docs/images/corruption_*.png
    python run_scripts/make_corruption_figures.py --photo_dir PHOTOS --num_images 2 --image_size 224 --seed 0

Photos are the first ``--num_images`` image files of the folder in name order (or the ``--files`` given), resized and
centre-cropped to ``--image_size``. Degradation parameters are drawn per photo with the official defaults of
MFMConfig under ``--seed``; ``--blur_types`` picks the blur family per photo instead (e.g. aniso plateau_iso sinc).
The mfm picture shows the first two photos, each low-pass and high-pass filtered with the official radius (16 at 224,
scaled with the image size).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mfm import MFMConfig
from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.training.data.sources import IMAGE_EXTENSIONS
from modeling_mfm.training.evaluation.visualization_corruptions import (
    corruption_examples,
    corruption_figure,
    frequency_masking_examples,
    load_photos,
    save_palette_png,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "images"
TITLES = {
    "mfm": "masked frequency modeling: a low-pass or a high-pass filter per image",
    "sr": "super-resolution pretext: bicubic down x{factor} and up",
    "deblur": "deblurring pretext: a random blur kernel per image",
    "denoise": "denoising pretext: Gaussian or Poisson noise per image",
}


@dataclass
class FigureArguments:
    photo_dir: str = field(metadata={"help": "Folder with photos (JPEG, PNG, ...)."})
    output_dir: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "Where the PNGs go (docs/images/)."})
    files: list[str] | None = field(default=None, metadata={"help": "File names inside photo_dir (default: first N)."})
    num_images: int = field(default=3, metadata={"help": "Number of photos (rows) when --files is not given."})
    image_size: int = field(default=224, metadata={"help": "Side of the centre crop, in pixels."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-photo degradation parameters."})
    blur_types: list[str] | None = field(default=None, metadata={"help": "Blur family per photo (default: random)."})
    dpi: int = field(default=90, metadata={"help": "Resolution of the PNGs."})


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(FigureArguments, prog="make_corruption_figures.py",
                                  description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    photo_dir = Path(args.photo_dir)
    if not photo_dir.is_dir():
        raise ScriptError(f"photo_dir {args.photo_dir!r} is not a folder")
    if args.files:
        paths = [photo_dir / name for name in args.files]
    else:
        candidates = sorted(p for p in photo_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths = candidates[: args.num_images]
    if not paths:
        raise ScriptError(f"no images found in {args.photo_dir}")
    images = load_photos(paths, args.image_size)
    config = MFMConfig(corruption="sr", loss_on="all", image_size=args.image_size,
                       backbone_config={"model_type": "resnet"})
    blur_overrides = {"kernel_type": args.blur_types} if args.blur_types else None
    examples = corruption_examples(images, config, seed=args.seed, blur_overrides=blur_overrides)
    figures = {"mfm": frequency_masking_examples(images[:2], 16 * args.image_size / 224)}
    for name, (degraded, labels) in examples.items():
        labels = [f"{path.stem.split('_', 1)[-1]}\n{label}" for path, label in zip(paths, labels, strict=True)]
        figures[name] = (images, degraded, labels)
    for name, (originals, corrupted, labels) in figures.items():
        picture = corruption_figure(originals, corrupted, labels, TITLES[name].format(factor=config.sr_factor),
                                    args.dpi)
        path = Path(args.output_dir) / f"corruption_{name}.png"
        save_palette_png(picture, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
