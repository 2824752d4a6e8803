#!/usr/bin/env python
"""Publish a converted or trained MFM folder on the Hub, with an official release's card, a card file, the folder's
own README.md, or a generated card. Training checkpoints, optimizer states and logs are never uploaded.

    python run_scripts/release.py --model_name_or_path mfm-vit-base --hub_model_id <org>/mfm-vit-base \\
        --release mfm-vit-base --dry_run
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.conversion.release import OFFICIAL_RELEASES, release_card
from modeling_mfm.publishing.hub import check_repo_id, publish_folder


@dataclass
class ReleaseArguments:
    model_name_or_path: str = field(metadata={"help": "The folder to publish (save_pretrained or converted)."})
    hub_model_id: str = field(metadata={"help": "Hub repository 'user/name'."})
    release: str | None = field(
        default=None, metadata={"help": "Official release name (e.g. mfm-vit-base): its card becomes README.md."}
    )
    card: str | None = field(default=None, metadata={"help": "A Markdown model card file to publish as README.md."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to publish to (default: main)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_local_dir: str | None = field(
        default=None, metadata={"help": "Publish into this local folder instead of the Hub (a preview)."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Print what would be uploaded; write nothing."})

    def __post_init__(self) -> None:
        check_repo_id(self.hub_model_id)
        if self.release is not None and self.card is not None:
            raise ValueError("give --release or --card, not both")
        if self.release is not None and self.release not in OFFICIAL_RELEASES:
            raise ValueError(f"unknown release {self.release!r}; known: {', '.join(sorted(OFFICIAL_RELEASES))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(ReleaseArguments, prog="release.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    card = None
    if args.release is not None:
        card = release_card(args.release, repo_id=args.hub_model_id)
    elif args.card is not None:
        card = Path(args.card).read_text(encoding="utf-8")
    try:
        url = publish_folder(
            args.model_name_or_path, args.hub_model_id, card=card, private=args.hub_private_repo,
            token=args.hub_token, revision=args.hub_revision, dry_run=args.dry_run, local_dir=args.hub_local_dir,
        )
    except ValueError as error:
        raise ScriptError(str(error)) from error
    if url:
        print(f"published {args.model_name_or_path} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
