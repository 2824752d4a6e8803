#!/usr/bin/env python
"""Train UperNet on an MFM encoder for semantic segmentation on ADE20K-format data (BEiT's ADE20K recipe).

    accelerate launch run_scripts/run_segmentation.py --model_name_or_path <MFM checkpoint> \\
        --data_dir ADEChallengeData2016 --output_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.segmentation_training`` and
``modeling_mfm.training.segmentation_model``.
"""

import logging

from transformers import HfArgumentParser

from modeling_mfm.training.run_folder import one_line_errors
from modeling_mfm.training.segmentation_training import SegmentationArguments, train_segmentation


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(SegmentationArguments).parse_args_into_dataclasses(args=argv)
    with one_line_errors("run_segmentation.py"):  # exit status 2: refused to start, 3: a write failed (full disk...)
        train_segmentation(args)


if __name__ == "__main__":
    main()
