#!/usr/bin/env python
"""Evaluate an ImageNet-1K classifier on ImageNet-C (mCE), ImageNet-A, ImageNet-R and ImageNet-Sketch.

    accelerate launch run_scripts/run_robustness_eval.py --model_name_or_path <fine-tuned checkpoint> \\
        --imagenet_c_dir <dir> --imagenet_a_dir <dir> --imagenet_r_dir <dir> --imagenet_sketch_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.evaluation.robustness``. Exit codes: 0 done,
2 refused to start.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.training.evaluation.robustness import RobustnessArguments, run_robustness_eval


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(RobustnessArguments, prog="run_robustness_eval.py",
                                  description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    run_robustness_eval(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
