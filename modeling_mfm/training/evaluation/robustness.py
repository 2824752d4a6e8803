"""Robustness benchmarks of an ImageNet-1K classifier: ImageNet-C, ImageNet-A, ImageNet-R and ImageNet-Sketch.

Each benchmark is read from a local folder in its published layout:

* ImageNet-C (Hendrycks & Dietterich, ICLR 2019): ``<root>/<corruption>/<severity 1-5>/<wnid>/*.JPEG`` for the 15
  corruptions of `IMAGENET_C_CORRUPTIONS`. The corruption error of corruption c is
  ``CE_c = sum_s err(c, s) / sum_s err_AlexNet(c, s)`` and the mean corruption error is ``mCE = mean_c CE_c``
  (reported in %, lower is better). The AlexNet errors are the published per-corruption averages over the 5
  severities (`ALEXNET_CORRUPTION_ERRORS`), so the denominator is ``5 * average``.
* ImageNet-A and ImageNet-R: ``<root>/<wnid>/*``, 200 ImageNet classes each. As in their evaluation code the
  1000-way logits are restricted to the 200 classes before taking the argmax (top-1 accuracy, %).
* ImageNet-Sketch: ``<root>/<wnid>/*`` over the 1000 classes (top-1 accuracy, %).

The classifier's classes are matched to WordNet ids through ``config.id2label`` when its labels are wnids (a model
fine-tuned on ImageNet image folders), else by the standard ImageNet-1K index order when it has 1000 labels (the
Hub's ``imagenet-1k`` and torchvision's folder order are the sorted wnids, `IMAGENET_1K_WNIDS`).

Images get the evaluation transform of the classifier's saved image processor (`eval_transform_from_processor`:
shorter side to ``size / crop_pct``, bicubic, centre crop); ImageNet-C images are already 224x224 centre crops, so
they use ``crop_pct = 1``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..data.classification_data import eval_transform_from_processor
from ..data.image_folders import list_image_folder, local_path
from ..data.sources import open_image
from ..data.transforms import to_rgb
from ..run.disk_faults import write_json
from ..run.run_folder import hold_output_dir
from .robustness_classes import (
    ALEXNET_CORRUPTION_ERRORS,
    IMAGENET_1K_WNIDS,
    IMAGENET_A_WNIDS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_R_WNIDS,
)

logger = get_logger(__name__)
data_logger = logging.getLogger(__name__)  # DataLoader workers log without Accelerate's state

__all__ = [
    "RobustnessArguments",
    "WnidFolderDataset",
    "class_wnids",
    "evaluate_folder",
    "format_table",
    "mean_corruption_error",
    "run_robustness_eval",
]

_WNID_RE = re.compile(r"^n\d{8}$")
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass
class RobustnessArguments:
    """Options of ``run_scripts/run_robustness_eval.py`` (the command line is generated from these fields)."""

    model_name_or_path: str = field(metadata={"help": "An ImageNet-1K classifier (folder or Hub id)."})
    imagenet_c_dir: str | None = field(default=None, metadata={"help": "<dir>/<corruption>/<severity>/<wnid>/*."})
    imagenet_a_dir: str | None = field(default=None, metadata={"help": "<dir>/<wnid>/* (200 classes)."})
    imagenet_r_dir: str | None = field(default=None, metadata={"help": "<dir>/<wnid>/* (200 classes)."})
    imagenet_sketch_dir: str | None = field(default=None, metadata={"help": "<dir>/<wnid>/* (1000 classes)."})
    corruptions: str | None = field(
        default=None, metadata={"help": "Comma-separated subset of the 15 ImageNet-C corruptions (default: all)."}
    )
    crop_pct: float | None = field(
        default=None,
        metadata={"help": "Centre-crop fraction (default: the checkpoint's image processor's; ImageNet-C: 1)."},
    )
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch per process."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes."})
    output_dir: str = field(default="mfm-robustness", metadata={"help": "Where results.json goes."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no / fp16 / bf16 (default: accelerate's)."}
    )

    def check(self) -> None:
        dirs = {
            "imagenet_c_dir": self.imagenet_c_dir, "imagenet_a_dir": self.imagenet_a_dir,
            "imagenet_r_dir": self.imagenet_r_dir, "imagenet_sketch_dir": self.imagenet_sketch_dir,
        }
        if all(v is None for v in dirs.values()):
            raise ValueError(f"give at least one of {', '.join('--' + k for k in dirs)}")
        for name, path in dirs.items():
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{name} {path!r} is not a directory")
        if self.per_device_eval_batch_size < 1:
            raise ValueError(f"per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def corruption_list(self) -> list[str]:
        if self.corruptions is None:
            return list(IMAGENET_C_CORRUPTIONS)
        names = [c.strip() for c in self.corruptions.split(",") if c.strip()]
        unknown = sorted(set(names) - set(IMAGENET_C_CORRUPTIONS))
        if unknown or not names:
            raise ValueError(f"corruptions {unknown or names} unknown; choose from {', '.join(IMAGENET_C_CORRUPTIONS)}")
        return names


# ---------------------------------------------------------------------------------------------------- classes
def class_wnids(config: Any) -> list[str]:
    """The WordNet id of each output class of a classifier (see the module docstring)."""
    labels = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else []
    if labels and all(_WNID_RE.match(str(label)) for label in labels):
        return [str(label) for label in labels]
    if config.num_labels == len(IMAGENET_1K_WNIDS):
        return list(IMAGENET_1K_WNIDS)
    raise ValueError(
        f"cannot match the classifier's {config.num_labels} classes to ImageNet: its id2label values are not "
        "WordNet ids and it does not have the 1000 ImageNet-1K classes"
    )


# ---------------------------------------------------------------------------------------------------- data
class WnidFolderDataset(Dataset):
    """``<root>/<wnid>/*`` images as ``{"pixel_values", "labels", "valid"}``, the label being the index of the
    folder's wnid in ``wnids`` (the evaluated class list). An unreadable image comes back blank with
    ``valid = False`` (left out of the scores and counted); `problems` names the entries that could not be listed."""

    def __init__(self, root: str | os.PathLike, wnids: Sequence[str], transform: Any) -> None:
        index = {wnid: i for i, wnid in enumerate(wnids)}
        try:
            listing = list_image_folder(root, by_class=True)
        except ValueError as error:
            raise ValueError(f"{error} (layout <wnid>/*)") from None
        unknown = [name for name in listing.class_names if name not in index]
        if unknown:
            raise ValueError(f"{root} has folders that are not evaluated classes: {unknown[:5]}")
        listing.log_problems()
        self.problems = listing.problems
        self.samples = [(local_path(path), index[wnid]) for path, wnid in zip(listing.files, listing.classes)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        try:
            with open_image(path) as image:
                return {"pixel_values": self.transform(to_rgb(image)), "labels": label, "valid": True}
        except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files (bombs included)
            data_logger.warning("leaving out unreadable image %s: %s: %s", path, type(error).__name__, error)
        return {"pixel_values": self.transform(Image.new("RGB", (8, 8))), "labels": label, "valid": False}


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": torch.tensor([s["labels"] for s in samples], dtype=torch.long),
        "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
    }


@torch.no_grad()
def evaluate_folder(
    model: torch.nn.Module,
    dataset: WnidFolderDataset,
    accelerator: Accelerator,
    class_indices: torch.Tensor | None,
    batch_size: int,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy (%) over the readable images of a folder, their count, and the counts of unreadable images
    and unlisted entries; ``class_indices`` restricts the logits to these model classes (the labels are then
    positions in it)."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                            collate_fn=_collate))
    model.eval()
    correct, count, unreadable = 0, 0, 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        if class_indices is not None:
            logits = logits[:, class_indices.to(logits.device)]
        hits = (logits.argmax(dim=1) == batch["labels"]).long()
        hits, valid = accelerator.gather_for_metrics((hits, batch["valid"]))
        correct += int(hits[valid].sum())
        count += int(valid.sum())
        unreadable += int((~valid).sum())
    if count == 0:
        raise ValueError(f"none of the {unreadable} images of the folder could be read")
    return {"top1": 100.0 * correct / count, "num_samples": count, "num_unreadable": unreadable,
            "unlisted_entries": len(dataset.problems)}


# ---------------------------------------------------------------------------------------------------- metrics
def mean_corruption_error(errors: dict[str, Sequence[float]]) -> dict[str, Any]:
    """``errors[corruption]`` = top-1 errors (fractions) at severities 1..5 -> per-corruption CE and mCE (%),
    normalised by AlexNet as Hendrycks & Dietterich define it."""
    if not errors:
        raise ValueError("no corruption errors to average")
    ce = {}
    for name, values in errors.items():
        if name not in ALEXNET_CORRUPTION_ERRORS:
            raise ValueError(f"unknown corruption {name!r}; known: {', '.join(IMAGENET_C_CORRUPTIONS)}")
        if len(values) != len(SEVERITIES):
            raise ValueError(f"{name}: need the errors of the 5 severities, got {len(values)}")
        ce[name] = 100.0 * sum(values) / (len(SEVERITIES) * ALEXNET_CORRUPTION_ERRORS[name])
    return {"corruption_errors": ce, "mCE": sum(ce.values()) / len(ce)}


def format_table(results: dict[str, Any]) -> str:
    """The summary the paper reports, as a Markdown table (IN-C mCE lower is better; the others are accuracies)."""
    header, row = [], []
    if "imagenet_c" in results:
        header.append("IN-C mCE (%, lower is better)")
        row.append(f"{results['imagenet_c']['mCE']:.1f}")
    for key, name in (("imagenet_a", "IN-A top-1"), ("imagenet_r", "IN-R top-1"), ("imagenet_sketch", "IN-SK top-1")):
        if key in results:
            header.append(f"{name} (%)")
            row.append(f"{results[key]['top1']:.1f}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    if "imagenet_c" in results:
        lines += ["", "| corruption | CE (%) | " + " | ".join(f"top-1 s{s}" for s in SEVERITIES) + " |",
                  "|---|---|" + "---|" * len(SEVERITIES)]
        c = results["imagenet_c"]
        for name, value in c["corruption_errors"].items():
            accs = " | ".join(f"{a:.1f}" for a in c["accuracy"][name])
            lines.append(f"| {name} | {value:.1f} | {accs} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the run
def run_robustness_eval(args: RobustnessArguments) -> dict[str, Any]:
    """Evaluates every benchmark whose folder is given; prints the table and writes ``output_dir/results.json``."""
    args.check()
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    with hold_output_dir(accelerator, args.output_dir):
        model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path)
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        wnids = class_wnids(model.config)
        model = accelerator.prepare(model)
        results: dict[str, Any] = {"model": args.model_name_or_path}
        if args.imagenet_c_dir is not None:
            results["imagenet_c"] = _imagenet_c(args, model, processor, wnids, accelerator)
        for key, classes in (("imagenet_a", IMAGENET_A_WNIDS), ("imagenet_r", IMAGENET_R_WNIDS),
                             ("imagenet_sketch", wnids)):
            if getattr(args, f"{key}_dir") is not None:
                results[key] = _evaluate(args, model, processor, getattr(args, f"{key}_dir"), classes, wnids,
                                         args.crop_pct, accelerator)

        if accelerator.is_main_process:
            print(format_table(results))
            write_json(Path(args.output_dir) / "results.json", results)
        accelerator.wait_for_everyone()
        return results


def _evaluate(args: RobustnessArguments, model: Any, processor: Any, root: str | Path, classes: Sequence[str],
              wnids: Sequence[str], crop_pct: float | None, accelerator: Accelerator) -> dict[str, Any]:
    """Top-1 on the folder ``root`` of ``classes``; the logits are restricted to them when they are a subset of the
    classifier's ``wnids``."""
    indices = None
    if list(classes) != list(wnids):
        position = {wnid: i for i, wnid in enumerate(wnids)}
        missing = [w for w in classes if w not in position]
        if missing:
            raise ValueError(f"the classifier lacks {len(missing)} of the benchmark's classes, e.g. {missing[:3]}")
        indices = torch.tensor([position[w] for w in classes])
    dataset = WnidFolderDataset(root, classes, eval_transform_from_processor(processor, crop_pct))
    return evaluate_folder(model, dataset, accelerator, indices, args.per_device_eval_batch_size,
                           args.dataloader_num_workers)


def _imagenet_c(args: RobustnessArguments, model: Any, processor: Any, wnids: Sequence[str],
                accelerator: Accelerator) -> dict[str, Any]:
    """Top-1 per corruption and severity (the images are 224 x 224 centre crops already: crop_pct 1), the
    corruption errors and mCE."""
    accuracy, errors, count, unreadable, unlisted = {}, {}, 0, 0, 0
    for corruption in args.corruption_list():
        accuracy[corruption] = []
        for severity in SEVERITIES:
            folder = Path(args.imagenet_c_dir) / corruption / str(severity)
            if not folder.is_dir():
                raise ValueError(f"ImageNet-C folder {folder} is missing (layout <corruption>/<severity>/<wnid>)")
            scores = _evaluate(args, model, processor, folder, wnids, wnids, 1.0, accelerator)
            accuracy[corruption].append(scores["top1"])
            count += scores["num_samples"]
            unreadable += scores["num_unreadable"]
            unlisted += scores["unlisted_entries"]
        errors[corruption] = [1.0 - a / 100.0 for a in accuracy[corruption]]
        logger.info("ImageNet-C %s: top-1 %s", corruption, [round(a, 2) for a in accuracy[corruption]])
    return {**mean_corruption_error(errors), "accuracy": accuracy, "num_samples": count,
            "num_unreadable": unreadable, "unlisted_entries": unlisted,
            "complete": len(errors) == len(IMAGENET_C_CORRUPTIONS)}
