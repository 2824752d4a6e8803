#!/usr/bin/env python
"""Fine-tune an MFM checkpoint (or a native encoder, or a preset from scratch) for image classification.

    accelerate launch run_scripts/run_finetune.py --model_name_or_path <checkpoint> --dataset_name <hub id> \\
        --output_dir <dir> [--recipe vit|resnet] [--push_to_hub --hub_model_id user/name]

Every option: ``--help``; the logic lives in ``modeling_mfm.training.loops.finetune``. Exit codes: 0 done, 2 refused to
start, 3 stopped (a failed write).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.training.loops.finetune import FinetuneArguments, finetune


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(FinetuneArguments, prog="run_finetune.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    finetune(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
