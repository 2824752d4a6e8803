"""Does a precision change train like float32? Pre-trains the same small MFM model with the same seed, data, crops
and masks in each precision variant and compares the loss curves.

The variants differ only in arithmetic: ``fp32``; ``bf16`` (the package's bf16 autocast, float32 residual stream);
``bf16_residual`` (autocast with the encoder's residual stream cast to bf16: pre-training's opt-in
``--bf16_residual_stream``, which departs from the official recipe). The distance between ``fp32`` and ``bf16`` is
the yardstick: a variant that stays as close to ``fp32`` as plain autocast does trains alike at this scale. Each
variant runs in its own process (the package's `run_pretraining`, whose logs give the curve).

    python benchmarks/precision_convergence.py --train_dir path/to/cifar10/train --output_dir runs/precision
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from modeling_mfm.cli import ScriptArgumentParser, run_script
from modeling_mfm.configuration_mfm import official_mask_radius
from modeling_mfm.publishing.folder_layout import LOGS_FOLDER

VARIANTS = ("fp32", "bf16", "bf16_residual")


@dataclass
class ConvergenceArguments:
    train_dir: str = field(metadata={"help": "A folder of training images (imagefolder layout)."})
    output_dir: str = field(metadata={"help": "One pre-training run per variant in <output_dir>/<variant>."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS),
                                metadata={"help": "Precision variants to compare.", "choices": VARIANTS})
    max_train_steps: int = field(default=1200, metadata={"help": "Optimizer steps per run."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch per step."})
    base_learning_rate: float = field(default=1.5e-3, metadata={"help": "As pre-training's --base_learning_rate."})
    image_size: int = field(default=64, metadata={"help": "Side of the training crops, in pixels."})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size."})
    layers: int = field(default=6, metadata={"help": "ViT layers."})
    logging_steps: int = field(default=50, metadata={"help": "Steps between two points of the loss curve."})
    seed: int = field(default=0, metadata={"help": "Seed of every run (the same initialisation, data and masks)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches the folder's file list."})
    single: str | None = field(  # internal: one run in this process
        default=None, metadata={"help": argparse.SUPPRESS, "choices": VARIANTS}
    )


def run_variant(variant: str, args: ConvergenceArguments) -> None:
    """One pre-training run, in this process."""
    from modeling_mfm.training.loops import pretrain
    from modeling_mfm.training.loops.pretraining_arguments import parse_arguments

    argv = [
        "--preset", "mfm-vit-tiny", "--image_size", str(args.image_size),
        "--mask_radius", str(official_mask_radius(args.image_size)),
        "--backbone_overrides", json.dumps({"num_hidden_layers": args.layers, "patch_size": args.patch_size}),
        "--train_dir", args.train_dir, "--output_dir", os.path.join(args.output_dir, variant),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--max_train_steps", str(args.max_train_steps),
        "--warmup_ratio", "0.05", "--base_learning_rate", str(args.base_learning_rate),
        "--logging_steps", str(args.logging_steps), "--visualization_steps", "0", "--checkpointing_steps", "0",
        "--report_to", "none", "--mixed_precision", "no" if variant == "fp32" else "bf16",
        "--dataloader_num_workers", "1", "--cpu_threads", "0", "--seed", str(args.seed),
        "--resume_from_checkpoint", "none",
    ]
    if variant == "bf16_residual":
        argv.append("--bf16_residual_stream")
    if args.cache_dir:
        argv += ["--cache_dir", args.cache_dir]
    run_arguments, overrides = parse_arguments(argv)
    pretrain.run_pretraining(run_arguments, overrides)


def metrics_file(folder: str) -> str:
    """Where a run in ``folder`` logs its metrics."""
    from modeling_mfm.training.run.trackers import METRICS_FILE

    return os.path.join(folder, LOGS_FOLDER, METRICS_FILE)


def read_log(folder: str) -> tuple[dict[int, float], float]:
    """The run's loss by logged step, and its median img/s (a log of an older version read under today's names)."""
    from modeling_mfm.training.run.trackers import read_metrics

    records = read_metrics(metrics_file(folder), upgrade=True)
    records = [r for r in records if "train/loss" in r]
    return {r["step"]: r["train/loss"] for r in records}, statistics.median(r["train/img_per_s"] for r in records)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ScriptArgumentParser(ConvergenceArguments, prog="precision_convergence.py",
                                  description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    if args.single:
        run_variant(args.single, args)
        return
    for variant in args.variants:
        if os.path.exists(metrics_file(os.path.join(args.output_dir, variant))):
            print(f"{variant}: already run, reading its log", flush=True)
            continue
        command = [sys.executable, os.path.abspath(__file__), *argv, "--single", variant]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    logs = {variant: read_log(os.path.join(args.output_dir, variant)) for variant in args.variants}
    curves = {variant: curve for variant, (curve, _) in logs.items()}
    steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    shown = steps[:: max(1, len(steps) // 12)]
    print("step    " + "".join(f"{variant:>15s}" for variant in args.variants))
    for step in shown + ([steps[-1]] if shown[-1] != steps[-1] else []):
        print(f"{step:<8d}" + "".join(f"{curves[variant][step]:15.5f}" for variant in args.variants))
    late = steps[len(steps) // 2:]  # the second half of the run, after the curves have flattened
    reference = curves.get("fp32")
    for variant in args.variants:
        mean = sum(curves[variant][s] for s in late) / len(late)
        line = f"{variant:15s} {logs[variant][1]:7.1f} img/s, mean loss over steps {late[0]}-{late[-1]}: {mean:.5f}"
        if reference is not None and variant != "fp32":
            # signed: a variant that trains alike is above fp32 about as often as below
            differences = [(curves[variant][s] - reference[s]) / reference[s] for s in late]
            above = sum(difference > 0 for difference in differences)
            line += (f"; relative difference to fp32 {sum(differences) / len(differences):+.2e} on average, "
                     f"above it at {above} of {len(late)} logged steps")
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
