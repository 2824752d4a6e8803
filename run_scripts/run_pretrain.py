#!/usr/bin/env python
"""Masked Frequency Modeling pre-training with Accelerate.

    accelerate launch run_scripts/run_pretrain.py                      # embedded demo: a few minutes on a CPU
    accelerate launch run_scripts/run_pretrain.py --model mfm-vit-base --train_dir /data/imagenet/train
    accelerate launch run_scripts/run_pretrain.py --help               # every option, MFMConfig fields included

Re-running a command continues its run from the newest checkpoint in --output_dir (with the same settings).
Exit status: 0 done, 2 refused to start (bad argument, folder in use, changed settings, unsafe checkpoint), 3 stopped
(non-finite loss, failed write such as a full disk).
"""

from __future__ import annotations

import sys

from modeling_mfm.training.arguments import parse_arguments
from modeling_mfm.training.disk_faults import WriteFailedError
from modeling_mfm.training.pretrain import NonFiniteLossError, PretrainingArgumentError, run_pretraining


def main(argv: list[str] | None = None) -> int:
    args, config_overrides = parse_arguments(argv)
    try:
        result = run_pretraining(args, config_overrides)
    except PretrainingArgumentError as error:
        print(f"run_pretrain.py: error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, WriteFailedError) as error:
        print(f"run_pretrain.py: stopped: {error}", file=sys.stderr)
        return 3
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"done: {result.steps} steps, final loss {loss}, skipped images {result.skipped_images}; "
          f"model saved to {result.output_dir}" + (f", pushed to {result.pushed_to}" if result.pushed_to else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
