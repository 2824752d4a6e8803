#!/usr/bin/env python
"""Judge a pre-trained MFM encoder from frozen features: linear probe (BatchNorm + Linear) and kNN (k=20, T=0.07).

    accelerate launch run_scripts/run_linear_probe.py --model_name_or_path <checkpoint> \\
        --train_dir <folder> --validation_dir <folder> --output_dir <dir>

Every option: ``--help``; the logic lives in ``modeling_mfm.training.evaluation.linear_probe``. Exit codes: 0 done,
2 refused to start, 3 stopped (a failed write).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.training.evaluation.linear_probe import LinearProbeArguments, run_linear_probe


def main(argv: Sequence[str] | None = None) -> None:
    parser = ScriptArgumentParser(LinearProbeArguments, prog="run_linear_probe.py",
                                  description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    run_linear_probe(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
