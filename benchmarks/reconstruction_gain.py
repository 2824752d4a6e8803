#!/usr/bin/env python
"""What a pre-trained MFM model's prediction adds to its input, on your images: the reconstruction gain per view
(PSNR of the input's kept band completed with the predicted band, minus PSNR of the corrupted input; see
``modeling_mfm.training.representation_monitor``) and a picture of the reconstructions.

    python benchmarks/reconstruction_gain.py --model_name_or_path mfm-pretrain-demo --image_dir photos/ \\
        --output_dir gain-demo
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.publishing.folder_layout import RECONSTRUCTION_PICTURE


@dataclass
class GainArguments:
    model_name_or_path: str = field(metadata={"help": "A pre-training folder (save_pretrained of MFMForPreTraining)."})
    image_dir: str = field(metadata={"help": "A folder of images (any depth); each is centre-cropped and resized."})
    output_dir: str = field(metadata={"help": "Where gain.json and reconstruction.png go."})
    max_images: int = field(default=1000, metadata={"help": "Use at most this many images (the first, sorted)."})
    shown: int = field(default=8, metadata={"help": "Images in the picture."})


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(GainArguments, prog="reconstruction_gain.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    if args.max_images < 1 or args.shown < 1:
        raise ScriptError("--max_images and --shown must be >= 1")
    from modeling_mfm import MFMForPreTraining
    from modeling_mfm.training.data.device_dataset import load_device_images
    from modeling_mfm.training.data.sources import load_image_dataset
    from modeling_mfm.training.evaluation.representation_monitor import reconstruction_report
    from modeling_mfm.training.evaluation.visualization import save_png

    try:
        model = MFMForPreTraining.from_pretrained(args.model_name_or_path).eval()
        rows, column, _ = load_image_dataset(train_dir=args.image_dir)
    except (OSError, ValueError) as error:
        raise ScriptError(str(error)) from error
    if model.config.corruption != "mfm":
        raise ScriptError(f"the gain is defined for frequency masking, not the {model.config.corruption} pretext")
    rows = rows.select(range(min(args.max_images, len(rows))))
    images = load_device_images(rows, column, model.config.image_size, "cpu").images
    gains, picture = reconstruction_report(model, images, args.shown)
    output = Path(args.output_dir)
    save_png(picture, output / RECONSTRUCTION_PICTURE)
    record = {"model": args.model_name_or_path, "images": len(images),
              **{f"gain_{view}_db": round(value, 3) for view, value in gains.items()}}
    (output / "gain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
