#!/usr/bin/env python
"""Regenerates model_cards/ (one card per official MFM release) from the card template in the package.

    python run_scripts/make_model_cards.py            # rewrite model_cards/
    python run_scripts/make_model_cards.py --check    # exit 1 if model_cards/ is out of date
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.conversion.release import HUB_NAMESPACE, write_release_cards

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "model_cards"


@dataclass
class ModelCardArguments:
    output_dir: str = field(default=str(DEFAULT_DIR), metadata={"help": "Where the cards go (model_cards/)."})
    namespace: str = field(default=HUB_NAMESPACE, metadata={"help": "Hub organisation in the repository ids."})
    check: bool = field(default=False, metadata={"help": "Compare with --output_dir instead of writing."})


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(ModelCardArguments, prog="make_model_cards.py", description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    output_dir = Path(args.output_dir)
    if not args.check:
        for path in write_release_cards(output_dir, args.namespace):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        names = [path.name for path in write_release_cards(fresh, args.namespace)]
        existing = sorted(path.name for path in output_dir.glob("*.md"))
        _, mismatch, errors = filecmp.cmpfiles(fresh, output_dir, names, shallow=False)
        stale = sorted(set(existing) - set(names))
    if mismatch or errors or stale:
        print(f"model cards out of date: differ {mismatch}, missing {errors}, not generated {stale}; "
              f"run python run_scripts/make_model_cards.py", file=sys.stderr)
        return 1
    print(f"{len(names)} model cards up to date")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
