#!/usr/bin/env python
"""Publish a converted or trained MFM folder on the Hub, optionally with an official release's model card.

    python run_scripts/release.py --folder mfm-vit-base --repo-id <org>/mfm-vit-base --release mfm-vit-base --dry-run
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from modeling_mfm.conversion.release import publish_folder, release_card, write_card


def main(argv: Sequence[str] | None = None) -> int:
    """Write the card (optional) and publish a converted folder."""
    parser = argparse.ArgumentParser(prog="release.py", description=main.__doc__)
    parser.add_argument("--folder", required=True, help="a folder written by convert_original / save_pretrained")
    parser.add_argument("--repo-id", required=True, help="Hub model repo, namespace/name")
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--release", help="official release name: writes its card as README.md")
    card.add_argument("--card", help="a Markdown card file to use as README.md")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    if args.release:
        write_card(args.folder, release_card(args.release, repo_id=args.repo_id))
    elif args.card:
        write_card(args.folder, Path(args.card).read_text(encoding="utf-8"))
    url = publish_folder(args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    if url:
        print(f"published {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
