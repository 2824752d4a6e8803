#!/usr/bin/env python
"""Fine-tune an MFM checkpoint (or a native encoder, or a preset from scratch) for image classification.

    accelerate launch run_scripts/run_finetune.py --model_name_or_path <checkpoint> --dataset_name <hub id> \\
        --output_dir <dir> [--recipe vit|resnet] [--push_to_hub --hub_model_id user/name]

Every option: ``--help``; the logic lives in ``modeling_mfm.training.finetune``.
"""

import logging

from transformers import HfArgumentParser

from modeling_mfm.training.finetune import FinetuneArguments, finetune
from modeling_mfm.training.run_folder import one_line_errors


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(FinetuneArguments).parse_args_into_dataclasses(args=argv)
    with one_line_errors("run_finetune.py"):  # exit status 2: refused to start, 3: a write failed (full disk...)
        finetune(args)


if __name__ == "__main__":
    main()
