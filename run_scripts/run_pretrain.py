#!/usr/bin/env python
"""Masked Frequency Modeling pre-training with Accelerate.

    accelerate launch run_scripts/run_pretrain.py                      # embedded demo: a few minutes on a CPU
    accelerate launch run_scripts/run_pretrain.py --preset mfm-vit-base --train_dir path/to/imagenet/train
    accelerate launch run_scripts/run_pretrain.py --help               # every option, MFMConfig fields included

Re-running a command continues its run from the newest checkpoint in --output_dir (with the same settings).
Exit codes: 0 done, 2 refused to start (bad argument, folder in use, changed settings, unsafe checkpoint), 3 stopped
(non-finite loss, failed write such as a full disk).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modeling_mfm.cli import run_script
from modeling_mfm.training.loops.pretrain import run_pretraining
from modeling_mfm.training.loops.pretraining_arguments import parse_arguments


def main(argv: Sequence[str] | None = None) -> None:
    args, config_overrides = parse_arguments(argv)
    result = run_pretraining(args, config_overrides)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"done: {result.steps} steps, final loss {loss}, skipped images {result.skipped_images}; "
          f"model saved to {result.output_dir}" + (f", pushed to {result.pushed_to}" if result.pushed_to else ""))


if __name__ == "__main__":
    sys.exit(run_script(main))
