"""Draws one picture per restoration pretext (sr, deblur, denoise): original | degraded | both log-magnitude spectra.

    python run_scripts/make_corruption_figures.py PHOTO_DIR                    # -> docs/images/corruption_*.png
    python run_scripts/make_corruption_figures.py PHOTO_DIR --num-images 2 --image-size 224 --seed 0

Photos are the first ``--num-images`` image files of PHOTO_DIR in name order (or the ``--files`` given), resized and
centre-cropped to ``--image-size``. Degradation parameters are drawn per photo with the official defaults of
MFMConfig under ``--seed``; ``--blur-types`` picks the blur family per photo instead (e.g. aniso plateau_iso sinc).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling_mfm import MFMConfig
from modeling_mfm.training.data import IMAGE_EXTENSIONS
from modeling_mfm.training.visualization_corruptions import (
    corruption_examples,
    corruption_figure,
    load_photos,
    save_palette_png,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "images"
TITLES = {
    "sr": "super-resolution pretext: bicubic down x{factor} and up",
    "deblur": "deblurring pretext: a random blur kernel per image",
    "denoise": "denoising pretext: Gaussian or Poisson noise per image",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photo_dir", type=Path, help="folder with photos (JPEG, PNG, ...)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where the PNGs go (docs/images/)")
    parser.add_argument("--files", nargs="+", default=None, help="file names inside photo_dir (default: first N)")
    parser.add_argument("--num-images", type=int, default=3, help="number of photos (rows) when --files is not given")
    parser.add_argument("--image-size", type=int, default=224, help="side of the centre crop, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-photo degradation parameters")
    parser.add_argument("--blur-types", nargs="+", default=None, help="blur family per photo (default: random)")
    parser.add_argument("--dpi", type=int, default=90, help="resolution of the PNGs")
    args = parser.parse_args(argv)

    if args.files:
        paths = [args.photo_dir / name for name in args.files]
    else:
        candidates = sorted(p for p in args.photo_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths = candidates[: args.num_images]
    if not paths:
        parser.error(f"no images found in {args.photo_dir}")
    images = load_photos(paths, args.image_size)
    config = MFMConfig(corruption="sr", loss_on="all", image_size=args.image_size,
                       backbone_config={"model_type": "resnet"})
    blur_overrides = {"kernel_type": args.blur_types} if args.blur_types else None
    examples = corruption_examples(images, config, seed=args.seed, blur_overrides=blur_overrides)
    for name, (degraded, labels) in examples.items():
        labels = [f"{path.stem.split('_', 1)[-1]}\n{label}" for path, label in zip(paths, labels, strict=True)]
        picture = corruption_figure(images, degraded, labels, TITLES[name].format(factor=config.sr_factor), args.dpi)
        path = args.output_dir / f"corruption_{name}.png"
        save_palette_png(picture, path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
