"""Local ``datasets`` files as training data: parquet, arrow, CSV and JSON lines, through ``--train_file`` and
``--validation_file``.

A flag takes one file or a glob pattern (``'data/train-*.parquet'``, quoted so that the shell leaves it alone); the
files are read with ``datasets.load_dataset(<builder>, data_files=...)``, the builder chosen by the extension (all
matched files must share it). Parquet and arrow files usually carry an ``Image`` column (encoded bytes); CSV and JSON
lines files name the images by path (or hold encoded bytes), and a relative path is taken relative to the folder of
the file that lists it.
"""

from __future__ import annotations

import glob
import os

import datasets

__all__ = ["DATA_FILE_BUILDERS", "absolute_image_paths", "load_data_files", "resolve_data_files"]

DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def resolve_data_files(pattern: str, flag: str = "train_file") -> tuple[list[str], str]:
    """The files a ``--train_file`` / ``--validation_file`` value names (sorted) and their ``datasets`` builder."""
    if "://" in pattern:
        raise ValueError(f"{flag} {pattern!r}: give a local file or glob pattern (Hub data: --dataset_name)")
    files = sorted(path for path in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(path))
    if not files:
        raise ValueError(f"{flag} {pattern!r} matches no file")
    kinds = {os.path.splitext(path)[1].lower() for path in files}
    unknown = sorted(kinds - set(DATA_FILE_BUILDERS))
    if unknown:
        raise ValueError(
            f"{flag} {pattern!r}: unsupported file type {unknown[0]!r} (supported: {', '.join(DATA_FILE_BUILDERS)})"
        )
    builders = {DATA_FILE_BUILDERS[kind] for kind in kinds}
    if len(builders) > 1:
        raise ValueError(f"{flag} {pattern!r} mixes file types {sorted(kinds)}; give files of one type")
    return files, builders.pop()


def load_data_files(
    train_file: str, validation_file: str | None = None, cache_dir: str | None = None
) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """``(splits, files)``: a ``DatasetDict`` with "train" (and "validation" when ``validation_file`` is given) and
    the files each split was read from."""
    files = {"train": resolve_data_files(train_file, "train_file")}
    if validation_file is not None:
        files["validation"] = resolve_data_files(validation_file, "validation_file")
    builders = {builder for _, builder in files.values()}
    if len(builders) > 1:
        raise ValueError(f"train_file and validation_file must have the same file type, got {sorted(builders)}")
    data_files = {split: paths for split, (paths, _) in files.items()}
    splits = datasets.load_dataset(builders.pop(), data_files=data_files, cache_dir=cache_dir)
    return splits, data_files


def absolute_image_paths(dataset: datasets.Dataset, column: str, files: list[str]) -> datasets.Dataset:
    """Makes the relative image paths of a string ``column`` (CSV, JSON lines) relative to the folder of the listing
    file (the one folder all ``files`` lie in). Other columns (``Image`` features, bytes) are returned unchanged."""
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return dataset
    folders = {os.path.dirname(os.path.abspath(path)) for path in files}

    def is_relative(path: str) -> bool:
        return bool(path) and not os.path.isabs(path) and "://" not in path

    if len(folders) > 1:
        if any(is_relative(path) for path in dataset[column]):
            raise ValueError(
                f"the image paths in {column!r} are relative, and the listing files lie in several folders "
                f"({sorted(folders)}): use absolute paths or put the files in one folder"
            )
        return dataset
    folder = folders.pop()

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        return {column: [os.path.join(folder, p) if is_relative(p) else p for p in batch[column]]}

    return dataset.map(resolve, batched=True, desc="resolving image paths")
