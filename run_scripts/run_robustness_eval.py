#!/usr/bin/env python
"""Evaluate an ImageNet-1K classifier on ImageNet-C (mCE), ImageNet-A, ImageNet-R and ImageNet-Sketch.

    accelerate launch run_scripts/run_robustness_eval.py --model_name_or_path <fine-tuned checkpoint> \\
        --imagenet_c_dir <dir> --imagenet_a_dir <dir> --imagenet_r_dir <dir> --imagenet_sketch_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.robustness``.
"""

import logging

from transformers import HfArgumentParser

from modeling_mfm.training.robustness import RobustnessArguments, run_robustness_eval


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(RobustnessArguments).parse_args_into_dataclasses(args=argv)
    run_robustness_eval(args)


if __name__ == "__main__":
    main()
