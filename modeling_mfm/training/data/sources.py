"""Image datasets for pre-training: Hub datasets, image folders, streams and the photos bundled with scikit-image.

Design choices, and why:

* Images are decoded here, not by ``datasets``: the image column is cast to ``Image(decode=False)`` so that an
  unreadable file is *skipped with a warning and counted* instead of crashing a worker, and so that JPEGs can be
  decoded at reduced resolution (see `transforms.PretrainTransform`).
* Randomness is indexed, not streamed: a map-style sample is addressed by ``(epoch, index)`` and its augmentation
  is drawn from ``numpy.random.default_rng([seed, epoch, index])``. The same sample therefore looks the same with
  any number of workers or processes and after a resume, which makes restarts exact and lets a 2-process run be
  compared with a 1-process run.
* An unreadable image is replaced by the next readable one (index + 1, + 2, ...), so batches keep their size and
  every process takes the same number of steps; each replacement counts as one skipped image. "Unreadable"
  includes decompression bombs: PIL's ``DecompressionBombWarning`` (an image of more than ``Image.MAX_IMAGE_PIXELS``)
  is an error here, not a warning followed by a decode that could exhaust the memory.
* Image folders are listed by `image_folders` (entries that cannot be listed are counted; names that are not UTF-8
  work).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from itertools import count
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from .data_files import absolute_image_paths, load_data_files
from .holdout import held_out_size, split_off_validation
from .image_folders import IMAGE_EXTENSIONS, folder_dataset, list_image_folder, local_path
from .transforms import PretrainTransform, to_rgb

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_PHOTOS",
    "EpochShuffleSampler",
    "HFImageSource",
    "InMemoryImageSource",
    "PretrainingDataset",
    "StreamingPretrainingDataset",
    "collate_pixel_batches",
    "find_image_column",
    "find_label_column",
    "load_image_dataset",
    "open_image",
    "sample_photo_paths",
    "sample_photo_source",
]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture", "photo", "jpg", "jpeg", "png", "file_name",
                           "image_path", "path")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target", "category")

# Photographs that ship inside the scikit-image wheel (no download): colour photos first, then greyscale ones
# (which also exercise the greyscale -> RGB conversion).
SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
    "brick.png",
    "camera.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "moon.png",
)

# Give up after this many unreadable images in a row: the data is broken, not an odd file.
MAX_CONSECUTIVE_FAILURES = 64
# Shards of a streamed image folder (what --streaming splits across processes and DataLoader workers).
STREAM_SHARDS = 256


# ---------------------------------------------------------------------------------------------------- decoding
def open_image(value: Any) -> Image.Image:
    """Opens an image from what a dataset row holds: ``{"bytes", "path"}`` (``datasets.Image(decode=False)``),
    raw bytes, a path, or an already decoded PIL image. The file is opened lazily (header only); a decompression
    bomb raises (``Image.DecompressionBombWarning`` / ``Error``)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _open_path(value["path"])
        raise ValueError("image value has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return _open(io.BytesIO(value))
    if isinstance(value, (str, os.PathLike)):
        return _open_path(os.fspath(value))
    raise TypeError(f"cannot open an image from a {type(value).__name__}")


def _open(file: Any) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(file)


def _open_path(path: str) -> Image.Image:
    path = local_path(path)  # a file name that is not UTF-8 is stored as a file:// URI
    if os.path.exists(path):
        return _open(path)
    # remote (hf://, https://, s3://...) files of streamed datasets
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb") as f:
        return _open(io.BytesIO(f.read()))


class ImageSource(Protocol):
    """Random access to images: ``len(source)`` and ``source.open(i)`` -> PIL image (may raise)."""

    def __len__(self) -> int: ...

    def open(self, index: int) -> Image.Image: ...


class HFImageSource:
    """Images of one column of a map-style ``datasets.Dataset`` (cast to ``Image(decode=False)``)."""

    def __init__(self, dataset: datasets.Dataset, column: str) -> None:
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def open(self, index: int) -> Image.Image:
        return open_image(self.dataset[index][self.column])

    def describe(self, index: int) -> str:
        value = self.dataset[index][self.column]
        if isinstance(value, dict) and value.get("path"):
            return f"{value['path']} (row {index})"
        return f"row {index}"


class InMemoryImageSource:
    """Decoded images kept in memory (the embedded demo's few photos)."""

    def __init__(self, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> None:
        if not images:
            raise ValueError("InMemoryImageSource needs at least one image")
        self.images = list(images)
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def open(self, index: int) -> Image.Image:
        return self.images[index]

    def describe(self, index: int) -> str:
        return self.names[index]


def _describe(source: Any, index: int) -> str:
    try:
        return source.describe(index)
    except Exception:  # describing must never hide the original error
        return f"index {index}"


# ---------------------------------------------------------------------------------------------------- datasets
class PretrainingDataset(Dataset):
    """Map-style dataset: key ``(epoch, index)`` -> ``{"pixel_values": uint8 (3, S, S), "skipped": int}``.

    Args:
        source: the images (`HFImageSource`, `InMemoryImageSource`).
        transform: the augmentation (called with the opened image and the sample's generator).
        seed: the run's seed; the sample generator is ``default_rng([seed, epoch, index])``.
        repeats: the dataset is ``repeats`` passes over the source (for tiny sources such as the demo photos).
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, seed: int, repeats: int = 1) -> None:
        if len(source) == 0:
            raise ValueError("the dataset has no images")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.repeats = int(repeats)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def load(self, epoch: int, index: int) -> torch.Tensor:
        """Decodes and augments one sample (raises if the image is unreadable)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        with self.source.open(index % len(self.source)) as image:  # closes a file PIL opened, decoded or not
            return self.transform(image, rng)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        skipped = 0
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            current = (index + attempt) % len(self)
            try:
                pixels = self.load(epoch, current)
            except Exception as error:  # any decoding problem: PIL, OSError, truncated files, bad rows...
                skipped += 1
                source_index = current % len(self.source)
                if source_index not in self._warned:
                    self._warned.add(source_index)
                    logger.warning(
                        "skipping unreadable image %s: %s: %s",
                        _describe(self.source, source_index),
                        type(error).__name__,
                        error,
                    )
                continue
            return {"pixel_values": pixels, "skipped": skipped}
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row from index {index}: the dataset looks broken"
        )


class StreamingPretrainingDataset(IterableDataset):
    """Iterable dataset over a streamed ``datasets.IterableDataset`` (already split for this process), repeated
    epoch after epoch (``set_epoch`` reshuffles shards and buffer), so that no process runs dry before the others.

    Samples carry ``skipped``: the number of unreadable images dropped just before them. The augmentation of the
    n-th sample of an epoch in a worker uses ``default_rng([seed, rank, worker, epoch, n])``.
    """

    def __init__(self, dataset: datasets.IterableDataset, column: str, transform: PretrainTransform, seed: int,
                 rank: int = 0) -> None:
        self.dataset = dataset
        self.column = column
        self.transform = transform
        self.seed = int(seed)
        self.rank = int(rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        skipped = 0
        for epoch in count():
            self.dataset.set_epoch(epoch)
            produced = 0
            for position, row in enumerate(self.dataset):
                produced += 1
                rng = np.random.default_rng([self.seed, self.rank, worker, epoch, position])
                try:
                    with open_image(row[self.column]) as image:
                        pixels = self.transform(image, rng)
                except Exception as error:
                    skipped += 1
                    if skipped >= MAX_CONSECUTIVE_FAILURES:
                        raise RuntimeError(
                            f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row: the stream looks broken"
                        ) from error
                    logger.warning("skipping unreadable streamed image: %s: %s", type(error).__name__, error)
                    continue
                yield {"pixel_values": pixels, "skipped": skipped}
                skipped = 0
            if produced == 0:  # this worker has no shard: stop instead of spinning
                return


class EpochShuffleSampler(Sampler):
    """Yields ``(epoch, index)`` keys: a permutation drawn from ``default_rng([seed, epoch])``, or the identity.

    The epoch travels with each key so that DataLoader workers (which hold their own copy of the dataset) know it.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in order])


def collate_pixel_batches(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks samples into ``{"pixel_values": uint8 (B, 3, S, S), "skipped": int64 scalar}``."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "skipped": torch.tensor(sum(int(s["skipped"]) for s in samples), dtype=torch.int64),
    }


# ---------------------------------------------------------------------------------------------------- loading
def find_image_column(features: datasets.Features | None, requested: str | None = None) -> str:
    """The column holding the images: ``requested`` if given (it must exist), else the first ``datasets.Image``
    column, else a column with a usual name (image, img, ...)."""
    if features is None:
        raise ValueError("the dataset does not declare its columns; pass --image_column_name")
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"image_column_name {requested!r} is not a column of the dataset; columns: {columns}")
        feature = features[requested]
        is_text_or_bytes = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string",
                                                                                     "binary", "large_binary")
        if not (isinstance(feature, datasets.Image) or is_text_or_bytes):
            raise ValueError(
                f"image_column_name {requested!r} holds {feature!r}, not images (an Image feature, file paths or "
                f"encoded bytes); columns: {columns}"
            )
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in features:
            return name
    raise ValueError(f"no image column found among {columns}; pass --image_column_name")


def find_label_column(features: datasets.Features, requested: str | None = None) -> str:
    """``requested`` if given (it must exist and hold class labels, integers or strings), else the first
    ``ClassLabel`` column, else a column with a usual name (label, labels, fine_label, ...)."""
    columns = list(features)

    def usable(feature: Any) -> bool:
        return isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value)
            and (feature.dtype.startswith("int") or feature.dtype in ("string", "large_string"))
        )

    if requested is not None:
        if requested not in features:
            raise ValueError(f"label_column_name {requested!r} is not a column of the dataset; columns: {columns}")
        if not usable(features[requested]):
            raise ValueError(
                f"label_column_name {requested!r} holds {features[requested]!r}, not class labels (ClassLabel, "
                f"integers or strings); columns: {columns}"
            )
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in LABEL_COLUMN_CANDIDATES:
        if name in features and usable(features[name]):
            return name
    raise ValueError(f"no label column found among {columns}; pass --label_column_name")


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    image_column_name: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    train_file: str | None = None,
    validation_split_size: int | None = None,
    validation_split_percentage: float | None = None,
    validation_split_seed: int = 0,
    label_column_name: str | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, str, list[str]]:
    """Loads a Hub dataset (``dataset_name``, ``dataset_config_name``, ``split``), an image folder (``train_dir``,
    listed by `image_folders.list_image_folder`) or local data files (``train_file``: parquet, arrow, CSV, JSON
    lines; see `data_files`), keeps only the image column and turns off decoding. Returns ``(dataset, column,
    problems)``, ``problems`` naming the folder entries that could not be listed (logged here).

    With ``validation_split_size`` or ``validation_split_percentage``, the held-out validation slice that
    fine-tuning draws from the same rows with the same seed (`holdout`, stratified by the label column; the class
    folders of an image folder) is left out.
    """
    if sum(source is not None for source in (dataset_name, train_dir, train_file)) != 1:
        raise ValueError("give exactly one of dataset_name, train_dir and train_file")
    holding_out = validation_split_size is not None or validation_split_percentage is not None
    if holding_out and streaming:
        raise ValueError("a validation slice cannot be left out of a stream; drop --streaming")
    problems: list[str] = []
    if train_dir is not None:
        if not os.path.isdir(train_dir):
            raise ValueError(f"train_dir {train_dir!r} is not a directory")
        if cache_dir is not None and _is_within(cache_dir, train_dir):
            raise ValueError(
                f"cache_dir {cache_dir!r} lies inside train_dir {train_dir!r}: the image folder loader would then "
                "read the cache as part of the data; put the cache elsewhere"
            )
        try:
            listing = list_image_folder(train_dir, by_class=holding_out)  # fine-tuning's listing, labels included
        except ValueError as error:
            raise ValueError(f"train_dir {error}") from None
        listing.log_problems()
        problems = listing.problems
        dataset = folder_dataset(listing)
        if streaming:
            dataset = dataset.to_iterable_dataset(num_shards=min(len(dataset), STREAM_SHARDS))
    elif train_file is not None:
        if streaming:
            raise ValueError("--streaming reads Hub datasets; local files are read directly")
        splits, files = load_data_files(train_file, cache_dir=cache_dir)
        dataset = splits["train"]
    else:
        dataset = datasets.load_dataset(
            dataset_name,
            dataset_config_name,
            split=split,
            streaming=streaming,
            cache_dir=cache_dir,
            revision=revision,
            token=token,
        )
    features = dataset.features
    if features is None and streaming:
        dataset = dataset._resolve_features()
        features = dataset.features
    column = find_image_column(features, image_column_name)
    if train_file is not None:
        dataset = absolute_image_paths(dataset, column, files["train"])
    if holding_out:
        label_column = find_label_column(features, label_column_name)
        size = held_out_size(len(dataset), validation_split_size, validation_split_percentage)
        dataset, _ = split_off_validation(dataset, label_column, size, validation_split_seed)
    dataset = dataset.select_columns([column])
    if isinstance(features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if not streaming and len(dataset) == 0:
        raise ValueError(f"the dataset split {split!r} has no rows")
    return dataset, column, problems


def prepare_stream(
    dataset: datasets.IterableDataset, seed: int, shuffle_buffer_size: int, rank: int, world_size: int
) -> datasets.IterableDataset:
    """Shuffles a stream (shard order + a buffer of ``shuffle_buffer_size`` rows) and keeps this process's part
    (``split_dataset_by_node``: whole shards when their number divides by ``world_size``, else every
    ``world_size``-th row)."""
    if shuffle_buffer_size > 0:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset


def sample_photo_paths() -> list[str]:
    """Paths of the `SAMPLE_PHOTOS` that ship inside the installed scikit-image (no download)."""
    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError as error:
        raise ValueError("the embedded demo's photos ship with scikit-image: pip install "
                         "'masked-frequency-modeling[demo]'") from error
    paths = [str(folder / name) for name in SAMPLE_PHOTOS if (folder / name).is_file()]
    if not paths:
        raise ValueError(f"none of the sample photos {SAMPLE_PHOTOS} were found in {folder}")
    return paths


def sample_photo_source(short_side: int = 256) -> InMemoryImageSource:
    """The scikit-image photos, decoded once, converted to RGB and shrunk so that their shorter side is at most
    ``short_side`` (random crops of these still downscale to a small demo resolution, and cost little)."""
    images, names = [], []
    for path in sample_photo_paths():
        with Image.open(path) as opened:
            image = to_rgb(opened)
            image.load()
        factor = short_side / min(image.size)
        if factor < 1:
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
        names.append(os.path.basename(path))
    return InMemoryImageSource(images, names)
