#!/usr/bin/env python
"""Convert an official MFM checkpoint (.pth) into a ``save_pretrained`` folder, checked against an independent
re-computation of the official forward; optionally write its model card and publish it.

    python run_scripts/convert_original.py --checkpoint mfm_pretrain_vit_base.pth --output-dir mfm-vit-base \\
        --release mfm-vit-base
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from modeling_mfm.conversion import release
from modeling_mfm.conversion.convert_original import PARITY_TOLERANCE, convert_checkpoint, write_converted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_original.py",
        description="Convert an official MFM checkpoint (.pth) to a transformers folder, checked against an "
        "independent re-computation of the official forward.",
    )
    parser.add_argument("--checkpoint", required=True, help="official .pth file (pre-trained or fine-tuned)")
    parser.add_argument("--output-dir", required=True, help="folder for save_pretrained (created)")
    parser.add_argument("--task", choices=("pretraining", "classification"), default=None,
                        help="expected kind (detected from the keys when omitted; a mismatch is an error)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="encoder attention heads (default: the stored config, else embed_dim // 64)")
    parser.add_argument("--decoder-num-heads", type=int, default=None,
                        help="transformer-decoder heads (default: the stored config, else width // 32)")
    group = parser.add_argument_group("pre-training settings, used when the checkpoint stores no config")
    group.add_argument("--corruption", choices=("mfm", "sr", "deblur", "denoise"), default=None)
    group.add_argument("--mask-radius", type=float, default=None, help="inner frequency radius r1 (default 16)")
    group.add_argument("--mask-outer-radius", type=float, default=None, help="outer radius r2 (default: none)")
    group.add_argument("--low-pass-probability", type=float, default=None,
                       help="probability of a low-pass filter (default 0.5 ViT, 0.3 ResNet)")
    group.add_argument("--loss-on", choices=("masked", "all"), default=None,
                       help="masked: removed frequencies only (MFM); all: every frequency (restoration pretexts)")
    group.add_argument("--sr-factor", type=int, default=None, help="down-sampling factor of the sr pretext")
    group.add_argument("--image-size", type=int, default=None, help="input size of ResNet models (default 224)")
    parser.add_argument("--max-relative-error", type=float, default=PARITY_TOLERANCE,
                        help="parity tolerance: largest accepted max|ours - official| / max|official| (float32)")
    parser.add_argument("--no-backbone-export", action="store_true",
                        help="do not write the native transformers encoder to <output-dir>/backbone")
    parser.add_argument("--release", default=None,
                        help="name of an official release (see modeling_mfm.conversion.release.OFFICIAL_RELEASES): writes its "
                        "model card as README.md")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="publish the output folder to this Hub repo (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--dry-run", action="store_true", help="with --push-to-hub: print what would be uploaded")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        "corruption": args.corruption,
        "mask_radius": args.mask_radius,
        "mask_outer_radius": args.mask_outer_radius,
        "low_pass_probability": args.low_pass_probability,
        "loss_on": args.loss_on,
        "sr_factor": args.sr_factor,
        "image_size": args.image_size,
    }
    result = convert_checkpoint(
        args.checkpoint,
        task=args.task,
        num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads,
        overrides=overrides,
        tolerance=args.max_relative_error,
    )
    print(result.architecture.describe())
    print("parity (relative error): " + ", ".join(f"{k} {v:.2e}" for k, v in result.parity.items()))
    if result.unused_keys:
        print(f"unused checkpoint keys ({len(result.unused_keys)}): {', '.join(result.unused_keys)}")
    write_converted(result, args.output_dir, export_backbone=not args.no_backbone_export)
    repo_id = args.push_to_hub
    if args.release is not None:
        card = release.release_card(args.release, config=result.model.config, repo_id=repo_id)
        release.write_card(args.output_dir, card)
    print(f"wrote {args.output_dir}")
    if repo_id is not None:
        if args.release is None:
            release.write_card(
                args.output_dir, release.generic_card(repo_id, result.model.config, result.architecture.task)
            )
        release.publish_folder(args.output_dir, repo_id, private=args.private, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
