"""Regenerates model_cards/ (one card per official MFM release) from the card template in the package.

    python run_scripts/make_model_cards.py            # rewrite model_cards/
    python run_scripts/make_model_cards.py --check    # exit 1 if model_cards/ is out of date
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from modeling_mfm.conversion.release import HUB_NAMESPACE, write_release_cards

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "model_cards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_DIR, help="where the cards go (model_cards/)")
    parser.add_argument("--namespace", default=HUB_NAMESPACE, help="Hub organisation in the repo ids")
    parser.add_argument("--check", action="store_true", help="compare with --output-dir instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        for path in write_release_cards(args.output_dir, args.namespace):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        names = [path.name for path in write_release_cards(fresh, args.namespace)]
        existing = sorted(path.name for path in args.output_dir.glob("*.md"))
        _, mismatch, errors = filecmp.cmpfiles(fresh, args.output_dir, names, shallow=False)
        stale = sorted(set(existing) - set(names))
    if mismatch or errors or stale:
        print(f"model cards out of date: differ {mismatch}, missing {errors}, not generated {stale}; "
              f"run python run_scripts/make_model_cards.py", file=sys.stderr)
        return 1
    print(f"{len(names)} model cards up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
