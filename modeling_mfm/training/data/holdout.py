"""The held-out validation slice: a stratified, seeded choice of rows that is the same in every script.

Fine-tuning without a validation split holds out a slice of the training rows; pre-training and the linear probe on
the same data can exclude (or evaluate on) exactly that slice, because the rows depend only on the label column, the
slice size and the seed. Each class gives its share of the slice (``size * class_rows / rows``, rounded by largest
remainder so that the shares add up to ``size``), drawn with ``numpy.random.default_rng(seed)``, classes in sorted
order. The rule is written out here rather than taken from ``datasets.Dataset.train_test_split`` so that it works on
any label column (class labels, integers or strings) and stays fixed across library versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

__all__ = ["held_out_size", "split_off_validation", "stratified_holdout", "stratified_subset"]


def held_out_size(num_rows: int, size: int | None = None, percentage: float | None = None) -> int:
    """Rows in the slice: ``size`` if given, else ``round(num_rows * percentage / 100)``; at least one row must stay
    on each side."""
    if size is None and percentage is None:
        raise ValueError("give the validation slice as a number of rows or a percentage")
    if size is not None:
        if size < 1:
            raise ValueError(f"validation_split_size must be >= 1, got {size}")
        count = int(size)
    else:
        if not 0.0 < percentage < 100.0:
            raise ValueError(f"validation_split_percentage must be in (0, 100), got {percentage}")
        count = max(1, round(num_rows * percentage / 100.0))
    if count >= num_rows:
        raise ValueError(f"the validation slice ({count} rows) must be smaller than the data ({num_rows} rows)")
    return count


def stratified_holdout(labels: Sequence[Any] | np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)``: sorted row indices; ``held_out`` has ``size`` rows, each class in proportion to its
    rows (see the module docstring)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one value per row, got shape {labels.shape}")
    total = len(labels)
    if not 1 <= size < total:
        raise ValueError(f"the slice size must be in [1, {total - 1}] for {total} rows, got {size}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    shares = size * counts / total
    take = np.floor(shares).astype(np.int64)
    # the rows still missing go to the classes with the largest remainders (ties: the first classes)
    missing = size - int(take.sum())
    order = np.lexsort((np.arange(len(classes)), -(shares - take)))
    take[order[:missing]] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for index in range(len(classes)):
        rows = np.flatnonzero(inverse == index)
        chosen.append(rng.permutation(rows)[: take[index]])
    held_out = np.sort(np.concatenate(chosen))
    kept = np.setdiff1d(np.arange(total), held_out, assume_unique=True)
    return kept, held_out


def split_off_validation(
    dataset: datasets.Dataset, label_column: str, size: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(training rows, held-out slice)`` of ``dataset`` (`stratified_holdout` on ``label_column``)."""
    if label_column not in dataset.column_names:
        raise ValueError(f"the label column {label_column!r} is not in the dataset; columns: {dataset.column_names}")
    labels = dataset.select_columns([label_column]).with_format("numpy")[label_column]
    kept, held_out = stratified_holdout(labels, size, seed)
    return dataset.select(kept), dataset.select(held_out)


def stratified_subset(dataset: datasets.Dataset, label_column: str, size: int, seed: int) -> datasets.Dataset:
    """``size`` rows of ``dataset`` (all of them if it has no more), each class in proportion to its rows: the
    slice rule of `stratified_holdout`, for a labelled subset such as a low-label fine-tuning split."""
    if size < 1:
        raise ValueError(f"the subset size must be >= 1, got {size}")
    if size >= len(dataset):
        return dataset
    if label_column not in dataset.column_names:
        raise ValueError(f"the label column {label_column!r} is not in the dataset; columns: {dataset.column_names}")
    labels = dataset.select_columns([label_column]).with_format("numpy")[label_column]
    _, chosen = stratified_holdout(labels, size, seed)
    return dataset.select(chosen)
