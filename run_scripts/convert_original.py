#!/usr/bin/env python
"""Convert an official MFM checkpoint (.pth) into a ``save_pretrained`` folder, checked against an independent
re-computation of the official forward; optionally with its model card, and published on the Hub.

    python run_scripts/convert_original.py --checkpoint mfm_pretrain_vit_base.pth --output_dir mfm-vit-base \\
        --release mfm-vit-base [--push_to_hub --hub_model_id <org>/mfm-vit-base [--dry_run]]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from modeling_mfm.cli import ScriptArgumentParser, ScriptError, run_script
from modeling_mfm.conversion import release
from modeling_mfm.conversion.convert_original import PARITY_TOLERANCE, convert_checkpoint, write_converted
from modeling_mfm.publishing.hub import check_repo_id, publish_folder


@dataclass
class ConversionArguments:
    checkpoint: str = field(metadata={"help": "Official .pth file (pre-trained or fine-tuned)."})
    output_dir: str = field(metadata={"help": "Folder for save_pretrained (created)."})
    task: Literal["pretraining", "classification"] | None = field(
        default=None, metadata={"help": "Expected kind (detected from the keys when omitted; a mismatch is an error)."}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "Encoder attention heads (default: the stored config, else width // 64)."}
    )
    decoder_num_heads: int | None = field(
        default=None, metadata={"help": "Transformer-decoder heads (default: the stored config, else width // 32)."}
    )
    corruption: Literal["mfm", "sr", "deblur", "denoise"] | None = field(
        default=None, metadata={"help": "Pretext, when the checkpoint stores no config."}
    )
    mask_radius: float | None = field(default=None, metadata={"help": "Inner frequency radius r1 (default 16)."})
    mask_outer_radius: float | None = field(default=None, metadata={"help": "Outer radius r2 (default: none)."})
    low_pass_probability: float | None = field(
        default=None, metadata={"help": "Probability of a low-pass filter (default 0.5 ViT, 0.3 ResNet)."}
    )
    loss_on: Literal["masked", "all"] | None = field(
        default=None, metadata={"help": "masked: removed frequencies only (MFM); all: every frequency (pretexts)."}
    )
    sr_factor: int | None = field(default=None, metadata={"help": "Down-sampling factor of the sr pretext."})
    image_size: int | None = field(default=None, metadata={"help": "Input size of ResNet models (default 224)."})
    max_relative_error: float = field(
        default=PARITY_TOLERANCE,
        metadata={"help": "Parity tolerance: largest accepted max|ours - official| / max|official| (float32)."},
    )
    export_backbone: bool = field(
        default=True, metadata={"help": "Also write the native transformers encoder to <output_dir>/backbone."}
    )
    release: str | None = field(
        default=None, metadata={"help": "Official release name (e.g. mfm-vit-base): its model card as README.md."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Publish the output folder on the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository 'user/name'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    dry_run: bool = field(default=False, metadata={"help": "With --push_to_hub: print what would be uploaded."})

    def __post_init__(self) -> None:
        if self.push_to_hub:
            check_repo_id(self.hub_model_id)
        if self.release is not None and self.release not in release.OFFICIAL_RELEASES:
            raise ValueError(f"unknown release {self.release!r}; known: {', '.join(sorted(release.OFFICIAL_RELEASES))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ScriptArgumentParser(ConversionArguments, prog="convert_original.py", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    overrides = {name: getattr(args, name) for name in (
        "corruption", "mask_radius", "mask_outer_radius", "low_pass_probability", "loss_on", "sr_factor", "image_size"
    )}
    try:
        result = convert_checkpoint(
            args.checkpoint, task=args.task, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
            overrides=overrides, tolerance=args.max_relative_error,
        )
    except (ValueError, OSError) as error:
        raise ScriptError(f"{args.checkpoint}: {error}") from error
    print(result.architecture.describe())
    print("parity (relative error): " + ", ".join(f"{k} {v:.2e}" for k, v in result.parity.items()))
    if result.unused_keys:
        print(f"unused checkpoint keys ({len(result.unused_keys)}): {', '.join(result.unused_keys)}")
    write_converted(result, args.output_dir, export_backbone=args.export_backbone)
    repo_id = args.hub_model_id if args.push_to_hub else None
    card = None
    if args.release is not None:
        card = release.release_card(args.release, config=result.model.config, repo_id=repo_id)
    elif repo_id is not None:
        card = release.generic_card(repo_id, result.model.config, result.architecture.task)
    if card is not None:
        release.write_card(args.output_dir, card)
    print(f"wrote {args.output_dir}")
    if repo_id is not None:
        url = publish_folder(args.output_dir, repo_id, private=args.hub_private_repo, token=args.hub_token,
                             dry_run=args.dry_run)
        if url:
            print(f"published {args.output_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
