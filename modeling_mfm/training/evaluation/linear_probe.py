"""Frozen-feature evaluation of a pre-trained encoder: a linear probe and a k-nearest-neighbour classifier.

Both judge a pre-training run without fine-tuning it. Features are computed once, in eval mode, from the evaluation
transform (resize + centre crop) of every training and validation image:

* the encoder's ``pooler_output`` (`MFMModel`, as ``AutoModel`` and the classifier see it): for ViT / BEiT the
  LayerNorm of the mean patch token (BEiT without its pre-trained final LayerNorm, as in the official fine-tuning;
  the pooling LayerNorm of a pre-training checkpoint starts as the identity), for ResNet / ConvNeXt global average
  pooling (ConvNeXt then applies its final LayerNorm). ``pooling="cls"`` reads the CLS token of
  ``last_hidden_state`` instead (ViTs).
* Linear probe (MAE's protocol): ``BatchNorm1d(affine=False)`` then ``Linear``, i.e. a linear classifier on
  standardised features; the head's weights start from a truncated normal with std 0.01. MAE trains it with LARS
  (lr 0.1 x batch / 256, no weight decay, 90 epochs, warmup 10) through the frozen encoder with crop + flip
  augmentation; here the head is trained on the cached features (no augmentation) with SGD + momentum 0.9 and the
  same lr rule and warmup + cosine schedule, which takes seconds instead of a full pass per epoch.
* kNN (Wu et al. 2018, as used by DINO): L2-normalised features, cosine similarity to every training feature, the
  k = 20 nearest neighbours vote for their class with weight ``exp(similarity / 0.07)``; classes are ranked by
  their summed votes (top-1 / top-5).

Feature extraction is distributed (``accelerator.gather_for_metrics``: each image once); the probe and the kNN run on
the main process. Unreadable images are left out of both sets and counted in the results, as are the folder entries
that could not be listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from ...modeling_mfm import MFMModel
from ..data.classification_data import (
    ClassificationDataArguments,
    ClassificationDataset,
    build_eval_transform,
    collate_classification,
)
from ..models.model_factory import preferred_memory_format
from ..models.model_loading import load_encoder
from ..optim.schedules import LearningRateSchedule
from ..run.disk_faults import write_json
from ..run.run_folder import hold_output_dir
from .classification_metrics import TopKAccuracy

logger = get_logger(__name__)

__all__ = [
    "LinearProbe",
    "LinearProbeArguments",
    "extract_features",
    "knn_scores",
    "pool_features",
    "run_linear_probe",
    "top_k_accuracy",
    "train_linear_probe",
]


@dataclass(kw_only=True)
class LinearProbeArguments(ClassificationDataArguments):
    """Options of ``run_scripts/run_linear_probe.py`` (the command line is generated from these fields)."""

    model_name_or_path: str = field(metadata={"help": "Pre-trained MFM checkpoint or native encoder."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Feature extraction batch per process."})
    crop_pct: float = field(default=0.875, metadata={"help": "Centre-crop fraction of the eval transform."})
    pooling: str = field(default="mean", metadata={"help": "ViT features: 'mean' of patch tokens or 'cls'."})
    # linear probe: the head trains on the main process, on the cached features
    num_train_epochs: int = field(default=90, metadata={"help": "Epochs of the linear head (0 skips the probe)."})
    per_device_train_batch_size: int = field(
        default=256,
        metadata={"help": "Batch of the linear head (the features are extracted with --per_device_eval_batch_size)."},
    )
    base_learning_rate: float = field(
        default=0.1,
        metadata={"help": "The head's lr = base_learning_rate * per_device_train_batch_size / 256 (MAE's rule; the "
                          "training scripts scale by / 512)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the head (SGD)."})
    warmup_epochs: int = field(default=10, metadata={"help": "Warmup epochs of the head."})
    # kNN
    knn_k: int = field(default=20, metadata={"help": "Neighbours that vote (0 skips kNN)."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(similarity / T)."})
    output_dir: str = field(default="mfm-linear-probe", metadata={"help": "Where results.json goes."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no / fp16 / bf16 for the feature extraction (default: accelerate's)."}
    )

    def check(self) -> None:
        self.check_data_source()
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.num_train_epochs < 0 or self.knn_k < 0:
            raise ValueError(f"num_train_epochs and knn_k must be >= 0, got {self.num_train_epochs}, {self.knn_k}")
        if self.num_train_epochs == 0 and self.knn_k == 0:
            raise ValueError("nothing to do: num_train_epochs (the linear probe) and knn_k are both 0")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")
        for name in ("per_device_eval_batch_size", "per_device_train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


# ---------------------------------------------------------------------------------------------------- features
def pool_features(encoder: MFMModel, pixel_values: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, C, H, W) images -> (B, D) frozen features (see the module docstring)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    outputs = encoder(pixel_values)
    if pooling == "cls" and encoder.config.is_vit:
        return outputs.last_hidden_state[:, 0]
    return outputs.pooler_output


@torch.no_grad()
def extract_features(
    encoder: MFMModel, dataloader: DataLoader, accelerator: Accelerator, pooling: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) of a prepared dataloader, every readable sample once (batches may
    mark unreadable ones with ``valid``), on every process."""
    encoder.eval()
    features, labels = [], []
    for batch in dataloader:
        pooled = pool_features(encoder, batch["pixel_values"], pooling).float()
        valid = batch.get("valid", torch.ones_like(batch["labels"], dtype=torch.bool))
        pooled, batch_labels, valid = accelerator.gather_for_metrics((pooled, batch["labels"], valid))
        features.append(pooled[valid].cpu())
        labels.append(batch_labels[valid].cpu())
    if not features or sum(len(f) for f in features) == 0:
        raise ValueError("no readable images to extract features from")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------- linear probe
class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False)`` + ``Linear``: MAE's linear-probing head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (%) of (N, C) scores with the `TopKAccuracy` metric; k is capped at C."""
    ks = tuple(sorted({min(k, scores.shape[1]) for k in ks}))
    metric = TopKAccuracy(keep_in_memory=True)
    ranked = scores.topk(max(ks), dim=1).indices
    result = metric.compute(predictions=ranked.tolist(), references=labels.tolist(), k=ks)
    return {f"top{k}": 100.0 * result[f"top{k}"] for k in ks}


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    weight_decay: float = 0.0,
    warmup_epochs: int = 10,
    seed: int = 0,
) -> tuple[LinearProbe, dict[str, float]]:
    """Trains `LinearProbe` on cached features (SGD, momentum 0.9, lr = base_lr * batch / 256, warmup + cosine
    per step) and returns it with its top-1 / top-5 (%) on the evaluation features."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(train_features) != len(train_labels) or len(eval_features) != len(eval_labels):
        raise ValueError("features and labels must have the same length")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = LinearProbe(train_features.shape[1], num_classes)
    batch_size = min(batch_size, len(train_features))
    steps_per_epoch = max(1, len(train_features) // batch_size)  # drop the last partial batch (BatchNorm)
    total_steps = epochs * steps_per_epoch
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    warmup_steps = min(warmup_epochs * steps_per_epoch, total_steps)
    schedule = LearningRateSchedule(lr, total_steps, warmup_steps)
    schedule.apply(optimizer, 0)
    probe.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for batch in range(steps_per_epoch):
            index = order[batch * batch_size:(batch + 1) * batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.apply(optimizer, epoch * steps_per_epoch + batch + 1)
    probe.eval()
    with torch.no_grad():
        scores = probe(eval_features)
    return probe, top_k_accuracy(scores, eval_labels)


# ---------------------------------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(Q, C) class votes: each query's k most cosine-similar training samples vote for their label with weight
    ``exp(similarity / temperature)``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, len(query_features), chunk_size):
        queries = F.normalize(query_features[start:start + chunk_size].float(), dim=1)
        with torch.autocast(device_type=queries.device.type, enabled=False):  # similarities in float32
            similarity, neighbours = (queries @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(queries), num_classes, dtype=torch.float32, device=queries.device)
        votes.scatter_add_(1, train_labels.to(queries.device)[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


# ---------------------------------------------------------------------------------------------------- the run
def run_linear_probe(args: LinearProbeArguments) -> dict[str, Any]:
    """Extracts features, runs the linear probe and / or kNN, writes ``output_dir/results.json`` and returns it."""
    args.check()
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    with hold_output_dir(accelerator, args.output_dir):
        set_seed(args.seed)
        with accelerator.main_process_first():
            data = args.load_datasets(args.seed)
        encoder = load_encoder(args.model_name_or_path, cache_dir=args.cache_dir)
        config = encoder.config
        encoder.to(memory_format=preferred_memory_format(config, accelerator.device))  # CNNs: channels_last
        transform = build_eval_transform(config.image_size, config.image_mean, config.image_std, args.crop_pct)
        train_set = ClassificationDataset(data.train, data.image_column, data.label_column, transform)
        eval_set = ClassificationDataset(data.validation, data.image_column, data.label_column, transform)
        encoder, train_loader, eval_loader = accelerator.prepare(encoder, _loader(args, train_set),
                                                                 _loader(args, eval_set))
        train_features, train_labels = extract_features(encoder, train_loader, accelerator, args.pooling)
        eval_features, eval_labels = extract_features(encoder, eval_loader, accelerator, args.pooling)
        test = None
        if data.test is not None:  # evaluated once, with the head trained for the validation split
            test_set = ClassificationDataset(data.test, data.image_column, data.label_column, transform)
            test = extract_features(encoder, accelerator.prepare(_loader(args, test_set)), accelerator, args.pooling)
        logger.info("features: %d train, %d validation, dimension %d", len(train_features), len(eval_features),
                    train_features.shape[1])
        unreadable = {"train": len(train_set) - len(train_features), "eval": len(eval_set) - len(eval_features)}
        if any(unreadable.values()) or data.unlisted:
            logger.warning("left out %d unreadable training and %d unreadable validation images; %d folder entries "
                           "could not be listed", unreadable["train"], unreadable["eval"], len(data.unlisted))

        results: dict[str, Any] = {
            "model": args.model_name_or_path, "num_train": len(train_features), "num_eval": len(eval_features),
            "num_unreadable_train": unreadable["train"], "num_unreadable_eval": unreadable["eval"],
            "unlisted_entries": len(data.unlisted),
            "feature_dim": int(train_features.shape[1]), "pooling": args.pooling if config.is_vit else "average",
        }
        num_classes = len(data.labels)
        if accelerator.is_main_process:
            if test is not None:
                results["test"] = {"num_eval": len(test[0])}
            if args.knn_k > 0:
                knn = {"k": min(args.knn_k, len(train_features)), "temperature": args.knn_temperature}
                for split, (features, labels) in _evaluated_splits(eval_features, eval_labels, test):
                    votes = knn_scores(train_features, train_labels, features, num_classes, args.knn_k,
                                       args.knn_temperature)
                    _results_of(results, split)["knn"] = {**knn, **top_k_accuracy(votes, labels)}
            if args.num_train_epochs > 0:
                probe, scores = train_linear_probe(
                    train_features, train_labels, eval_features, eval_labels, num_classes, args.num_train_epochs,
                    args.per_device_train_batch_size, args.base_learning_rate, args.weight_decay, args.warmup_epochs,
                    args.seed,
                )
                results["linear_probe"] = {"epochs": args.num_train_epochs, **scores}
                if test is not None:
                    with torch.no_grad():
                        test_scores = top_k_accuracy(probe(test[0]), test[1])
                    results["test"]["linear_probe"] = {"epochs": args.num_train_epochs, **test_scores}
            write_json(Path(args.output_dir) / "results.json", results)
            for split, values in (("validation", results), ("test", results.get("test", {}))):
                for name in ("linear_probe", "knn"):
                    if name in values:
                        scores = {k: v for k, v in values[name].items() if k.startswith("top")}
                        print(f"{split:>10} {name:>12}: " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        accelerator.wait_for_everyone()
        return results


def _evaluated_splits(eval_features: torch.Tensor, eval_labels: torch.Tensor,
                      test: tuple[torch.Tensor, torch.Tensor] | None) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    splits = [("validation", (eval_features, eval_labels))]
    return splits + ([("test", test)] if test is not None else [])


def _results_of(results: dict[str, Any], split: str) -> dict[str, Any]:
    """Where a split's scores go: the top level for the validation split, ``results["test"]`` for the test split."""
    return results if split == "validation" else results["test"]


def _loader(args: LinearProbeArguments, dataset: ClassificationDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                      collate_fn=collate_classification)
