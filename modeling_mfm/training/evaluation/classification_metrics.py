"""Top-k accuracy as an `evaluate.Metric`.

``evaluate.load("accuracy")`` fetches its script from the Hub, which fails offline and scores top-1 only; this metric
is defined in the package (``evaluate``'s documented way to write a metric: a `Metric` subclass with ``_info`` and
``_compute``) and scores any k from one pass. Its predictions are each sample's k best class indices, best first,
so the per-sample data stays small: the evaluation loop gathers (B, k) indices across processes, not logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch

__all__ = ["TopKAccuracy", "top_k_indices"]

_DESCRIPTION = "Top-k accuracy: the fraction of samples whose label is among the k highest-scoring classes."
_INPUTS = """
Args:
    predictions (`list[list[int]]`): per sample, class indices sorted by decreasing score (at least max(k)).
    references (`list[int]`): the true class of each sample.
    k (`Sequence[int]`, defaults to (1, 5)): the k values to score; each must be <= the number of predictions.
Returns:
    `{"top1": float, "top5": float, ...}` in [0, 1], and "num_samples".
"""


def top_k_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C) scores -> (B, min(k, C)) class indices, best first."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got {tuple(logits.shape)}")
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy (see the module docstring); ``TopKAccuracy(keep_in_memory=True)`` avoids cache files."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: Sequence[int] = (1, 5)) -> dict[str, float]:
        ranked = np.asarray(predictions, dtype=np.int64)
        labels = np.asarray(references, dtype=np.int64)
        if ranked.ndim != 2 or len(ranked) != len(labels):
            raise ValueError("predictions must be one list of class indices per reference")
        if len(labels) == 0:
            raise ValueError("no samples to score")
        results: dict[str, float] = {}
        for value in k:
            if not 1 <= value <= ranked.shape[1]:
                raise ValueError(f"k={value} needs 1 <= k <= {ranked.shape[1]} (predictions per sample)")
            results[f"top{value}"] = float((ranked[:, :value] == labels[:, None]).any(axis=1).mean())
        results["num_samples"] = len(labels)
        return results
