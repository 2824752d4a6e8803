#!/usr/bin/env python
"""Train UperNet on an MFM encoder for semantic segmentation on ADE20K-format data (BEiT's ADE20K recipe).

    accelerate launch run_scripts/run_segmentation.py --model_name_or_path <MFM checkpoint> \\
        --data_dir ADEChallengeData2016 --output_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.loops.segmentation_training`` and
``modeling_mfm.training.loops.segmentation_model``. Exit codes: 0 done, 2 refused to start, 3 stopped (a failed write).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.training.loops.segmentation_training import SegmentationArguments, train_segmentation


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(SegmentationArguments, prog="run_segmentation.py",
                                  description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    train_segmentation(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
