#!/usr/bin/env python
"""Judge a pre-trained MFM encoder from frozen features: linear probe (BatchNorm + Linear) and kNN (k=20, T=0.07).

    accelerate launch run_scripts/run_linear_probe.py --model_name_or_path <checkpoint> \\
        --train_dir <folder> --validation_dir <folder> --output_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.linear_probe``.
"""

import logging

from transformers import HfArgumentParser

from modeling_mfm.training.linear_probe import LinearProbeArguments, run_linear_probe
from modeling_mfm.training.run_folder import one_line_errors


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(LinearProbeArguments).parse_args_into_dataclasses(args=argv)
    with one_line_errors("run_linear_probe.py"):  # exit status 2: refused to start, 3: a write failed (full disk...)
        run_linear_probe(args)


if __name__ == "__main__":
    main()
