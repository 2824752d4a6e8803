"""Labelled image datasets and the fine-tuning / evaluation transforms of the official recipe.

Sources: a Hub dataset id (``datasets.load_dataset``), image folders (``<train_dir>/<class>/**`` and optionally
``<validation_dir>/<class>/**``, listed by `image_folders`: class names are the sorted folder names, entries that
cannot be listed are counted), or local data files (``train_file`` and optionally ``validation_file``: parquet,
arrow, CSV or JSON lines, see `data_files`). When there is no validation split, a stratified slice of the training
rows is held out (``validation_split_size`` rows, else ``validation_split_percentage`` %, drawn with
``validation_split_seed``; see `holdout`: pre-training on the same rows can leave out exactly this slice).

Transforms (torchvision ``transforms.v2`` on PIL images):

* train: ``RandomResizedCrop(size, scale=(0.08, 1), bicubic)`` + horizontal flip + RandAugment + ToTensor +
  Normalize + ``RandomErasing(0.25, per-pixel random values)``. The official recipe names timm's
  ``rand-m9-mstd0.5-inc1``: 2 ops per image at magnitude 9 out of 10, magnitude noise with std 0.5, and the
  "increasing" op variants. The closest built-in is ``torchvision.transforms.v2.RandAugment(num_ops=2,
  magnitude=9, num_magnitude_bins=11)``: with 11 bins, level 9 is 9/10 of each op's range, as timm's m9 (the default
  31 bins would make it 9/30). At m9 torchvision's ranges then match timm's for shear (0.27), rotate (27 degrees),
  translate (0.41 vs 0.405 of the image side), the colour enhancers (1 +- 0.81) and solarize (threshold 26), and
  its solarize / posterize grow stronger with the magnitude like timm's "increasing" variants. Differences that
  remain: no magnitude noise (mstd), posterize keeps 4 bits (timm's increasing variant: 1), and torchvision has an
  Identity op where timm has Invert and SolarizeAdd. Empty areas are filled with the mean colour, as timm does.
* eval: resize the shorter side to ``floor(size / crop_pct)`` (bicubic; ``crop_pct = 0.875``: 256 for 224) and
  centre-crop ``size``, then normalise: the checkpoint's saved image processor, on the same uint8 tensors.

Augmentations are indexed: the random draws of sample ``i`` in epoch ``e`` come from torch's RNG seeded with
``(seed, e, i)`` (`ClassificationDataset.set_epoch`), so a sample looks the same with any number of workers or
processes and after a resume.

Decoding is done here (the image column is read with ``Image(decode=False)``), so that one bad file (corrupt,
truncated, a decompression bomb...) never stops a run: training replaces an unreadable image by the next readable
row, evaluation marks its row ``valid = False`` so that the metrics leave it out; both log and count it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ...modeling_mfm import DEFAULT_CROP_PCT
from ..run.randomness import derive_seed
from .data_files import absolute_image_paths, load_data_files
from .holdout import held_out_size, split_off_validation, stratified_subset
from .image_folders import folder_dataset, list_image_folder
from .sources import MAX_CONSECUTIVE_FAILURES, find_image_column, find_label_column, open_image
from .transforms import to_rgb

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_AUTO_AUGMENT",
    "ClassificationData",
    "ClassificationDataArguments",
    "ClassificationDataset",
    "build_eval_transform",
    "build_train_transform",
    "collate_classification",
    "eval_transform_from_processor",
    "find_label_column",
    "load_classification_dataset",
    "parse_rand_augment",
]


@dataclass(kw_only=True)
class ClassificationDataArguments:
    """Where a labelled image dataset comes from and how it is read; shared by the fine-tuning and linear-probe
    command lines (``HfArgumentParser`` turns the fields into flags)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder <train_dir>/<class>/*."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder <validation_dir>/<class>/*."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local data file or quoted glob pattern: parquet, arrow, CSV or JSON lines (images as an "
                          "Image column, bytes or paths; paths relative to the file's folder)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file(s) of the same type as --train_file."}
    )
    train_split_name: str = field(default="train", metadata={"help": "Training split of a Hub dataset."})
    validation_split_name: str | None = field(
        default=None, metadata={"help": "Validation split (default: validation / val / valid / test if present)."}
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percentage of train held out when there is no validation split."}
    )
    validation_split_size: int | None = field(
        default=None,
        metadata={"help": "Rows of train held out when there is no validation split (instead of the percentage); "
                          "stratified by label."},
    )
    validation_split_seed: int | None = field(
        default=None, metadata={"help": "Seed of the held-out slice (default: --seed)."}
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    test_dir: str | None = field(
        default=None,
        metadata={"help": "Image folder <test_dir>/<class>/* evaluated once, at the end (classes matched by name)."},
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Data file(s) evaluated once, at the end, as --test_dir (any type --train_file takes)."},
    )
    train_subset_size: int | None = field(
        default=None,
        metadata={"help": "Train on N training rows chosen stratified by label (a low-label split; seeded by "
                          "--validation_split_seed), after the held-out slice is taken out."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation rows."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets / transformers cache folder."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes."})

    def check_data_source(self) -> None:
        """Exactly one source: a Hub dataset, an image folder or local files."""
        given = [f"--{name}" for name in ("dataset_name", "train_dir", "train_file") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of --dataset_name, --train_dir and --train_file (got {given or 'none'})"
            )
        if self.test_dir is not None and self.test_file is not None:
            raise ValueError("give --test_dir or --test_file, not both")
        if self.train_subset_size is not None and self.train_subset_size < 1:
            raise ValueError(f"train_subset_size must be >= 1 when given, got {self.train_subset_size}")

    def load_datasets(self, seed: int) -> ClassificationData:
        """The training and validation data these arguments name (`load_classification_dataset`), the first
        ``max_train_samples`` / ``max_eval_samples`` rows of each when given; the held-out slice, when there is no
        validation split, and the ``train_subset_size`` rows are drawn with ``validation_split_seed`` (default
        ``seed``); the test split when ``test_dir`` or ``test_file`` is given."""
        data = load_classification_dataset(
            dataset_name=self.dataset_name, dataset_config_name=self.dataset_config_name, train_dir=self.train_dir,
            validation_dir=self.validation_dir, train_split_name=self.train_split_name,
            validation_split_name=self.validation_split_name,
            validation_split_percentage=self.validation_split_percentage, image_column_name=self.image_column_name,
            label_column_name=self.label_column_name,
            seed=seed if self.validation_split_seed is None else self.validation_split_seed, cache_dir=self.cache_dir,
            train_file=self.train_file, validation_file=self.validation_file,
            validation_split_size=self.validation_split_size,
        )
        if self.train_subset_size is not None:
            subset_seed = seed if self.validation_split_seed is None else self.validation_split_seed
            data.train = stratified_subset(data.train, data.label_column, self.train_subset_size, subset_seed)
        if self.max_train_samples is not None:
            data.train = data.train.select(range(min(self.max_train_samples, len(data.train))))
        if self.test_dir is not None or self.test_file is not None:
            test = load_test_split(self.test_dir, self.test_file, data.labels, self.image_column_name,
                                   self.label_column_name, self.cache_dir)
            data.test = test.rename_columns({"image": data.image_column, "label": data.label_column})
        if self.max_eval_samples is not None:
            data.validation = data.validation.select(range(min(self.max_eval_samples, len(data.validation))))
        return data


DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid", "test")


# ---------------------------------------------------------------------------------------------------- transforms
def parse_rand_augment(spec: str) -> dict[str, int]:
    """timm-style ``"rand-m9-n2-mstd0.5-inc1"`` -> ``{"num_ops": 2, "magnitude": 9}`` (magnitude 0..10).

    ``mstd`` (magnitude noise) and ``inc`` (increasing variants) are accepted and approximated as described in the
    module docstring; any other key is refused.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto_augment must be a RandAugment spec like {DEFAULT_AUTO_AUGMENT!r}, got {spec!r}")
    num_ops, magnitude = 2, 9
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|w|p)([0-9.]+)", part)
        if match is None:
            raise ValueError(f"auto_augment {spec!r}: cannot parse {part!r} (known keys: m, n, mstd, inc)")
        key, value = match.groups()
        if key == "m":
            magnitude = int(float(value))
        elif key == "n":
            num_ops = int(value)
        elif key in ("w", "p", "mmax"):
            raise ValueError(f"auto_augment {spec!r}: key {key!r} is not supported by torchvision's RandAugment")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"auto_augment {spec!r}: magnitude must be in [0, 10], got {magnitude}")
    if num_ops < 1:
        raise ValueError(f"auto_augment {spec!r}: n (ops per image) must be >= 1, got {num_ops}")
    return {"num_ops": num_ops, "magnitude": magnitude}


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
    random_erasing: float = 0.25,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
) -> Callable[[Any], torch.Tensor]:
    """The fine-tuning augmentation: PIL image -> normalised float tensor (3, size, size)."""
    _check_size(image_size)
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing must be in [0, 1], got {random_erasing}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be in [0, 1], got {hflip}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    steps: list[Any] = [
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(hflip),
    ]
    if auto_augment:
        options = parse_rand_augment(auto_augment)
        fill = [round(255 * m) for m in mean]
        steps.append(
            T.RandAugment(
                num_ops=options["num_ops"],
                magnitude=options["magnitude"],
                num_magnitude_bins=11,
                interpolation=InterpolationMode.BILINEAR,
                fill=fill,
            )
        )
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing, value="random"))
    return T.Compose(steps)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = DEFAULT_CROP_PCT
) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform of an RGB PIL image: resize the shorter side to ``floor(size / crop_pct)`` (bicubic,
    antialiased), centre-crop ``size``, scale to [0, 1], normalise. It runs on the uint8 tensor, as the image
    processor a checkpoint saves (`modeling_mfm.build_image_processor`, torchvision backend) does, so that the
    scripts and the transformers pipelines see the same pixels (tested)."""
    _check_size(image_size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return _resize_and_crop(image_size, math.floor(image_size / crop_pct), mean, std)


class _CentreCrop:
    """A centre crop that rounds the offsets down, as transformers' image processors do (torchvision's
    ``CenterCrop`` rounds half to even: one pixel apart when the margin is odd)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return TF.crop(image, (height - self.size) // 2, (width - self.size) // 2, self.size, self.size)


def _resize_and_crop(
    image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Any], torch.Tensor]:
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            _CentreCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform_from_processor(processor: Any, crop_pct: float | None = None) -> Callable[[Any], torch.Tensor]:
    """`build_eval_transform` with the crop size, crop ratio, mean and std of a saved image processor (a
    ``BitImageProcessor`` as MFM checkpoints save, or a processor that only resizes to a square, as older ones did);
    ``crop_pct`` overrides the ratio (ImageNet-C images are already centre crops: 1.0)."""
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    image_size = crop.get("height") or size.get("height") or size.get("shortest_edge")
    if not image_size:
        raise ValueError(f"cannot read an image size from the processor's size {size} and crop_size {crop}")
    mean, std = list(processor.image_mean), list(processor.image_std)
    if crop_pct is not None:
        return build_eval_transform(int(image_size), mean, std, crop_pct)
    resize = size["shortest_edge"] if crop and size.get("shortest_edge") else image_size
    return _resize_and_crop(int(image_size), int(resize), mean, std)


# ---------------------------------------------------------------------------------------------------- datasets
@dataclass
class ClassificationData:
    """The two splits, their column names and the class names (index order)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    image_column: str
    label_column: str
    labels: list[str]
    unlisted: list[str] = field(default_factory=list)  # folder entries that could not be listed (image folders)
    test: datasets.Dataset | None = None  # evaluated once, at the end; labels in the training split's class order

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


def _list_folder(name: str, path: str) -> Any:
    try:
        listing = list_image_folder(path, by_class=True)
    except ValueError as error:
        raise ValueError(f"{name} {error}") from None
    listing.log_problems()
    return listing


def load_classification_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_split_name: str = "train",
    validation_split_name: str | None = None,
    validation_split_percentage: float = 10.0,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_size: int | None = None,
) -> ClassificationData:
    """Loads a labelled dataset from the Hub, image folders or local data files (see the module docstring).

    The validation split is, in order: ``validation_split_name`` if given; the folder ``validation_dir`` or the
    files ``validation_file``; the first of validation / val / valid / test that the dataset has; else a stratified
    slice of the training rows: ``validation_split_size`` rows, or ``validation_split_percentage`` % (drawn with
    ``seed``, `holdout.stratified_holdout`).
    """
    if sum(source is not None for source in (dataset_name, train_dir, train_file)) != 1:
        raise ValueError("give exactly one of dataset_name, train_dir and train_file")
    if validation_dir is not None and train_dir is None:
        raise ValueError("validation_dir needs train_dir (for a Hub dataset use validation_split_name)")
    if validation_file is not None and train_file is None:
        raise ValueError("validation_file needs train_file")
    if not 0.0 < validation_split_percentage < 100.0:
        raise ValueError(f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}")
    if validation_split_size is not None and validation_split_size < 1:
        raise ValueError(f"validation_split_size must be >= 1, got {validation_split_size}")
    files: dict[str, list[str]] = {}
    unlisted: list[str] = []
    if train_file is not None:
        splits, files = load_data_files(train_file, validation_file, cache_dir=cache_dir)
        train_split_name = "train"
    elif train_dir is not None:
        listings = {"train": _list_folder("train_dir", train_dir)}
        if validation_dir is not None:
            listings["validation"] = _list_folder("validation_dir", validation_dir)
        names = sorted(set().union(*(listing.class_names for listing in listings.values())))
        splits = {split: folder_dataset(listing, names) for split, listing in listings.items()}
        unlisted = [problem for listing in listings.values() for problem in listing.problems]
        train_split_name = "train"
    else:
        splits = datasets.load_dataset(
            dataset_name, dataset_config_name, cache_dir=cache_dir, revision=revision, token=token
        )
    if train_split_name not in splits:
        raise ValueError(f"the dataset has no split {train_split_name!r}; splits: {list(splits)}")
    train = splits[train_split_name]
    image_column = find_image_column(train.features, image_column_name)
    label_column = find_label_column(train.features, label_column_name)
    if files:  # CSV / JSON lines: image paths relative to the listing file's folder
        splits = {name: absolute_image_paths(split, image_column, files[name]) for name, split in splits.items()}
        train = splits["train"]

    if validation_split_name is not None:
        if validation_split_name not in splits:
            raise ValueError(f"validation_split_name {validation_split_name!r} not in the splits {list(splits)}")
        validation = splits[validation_split_name]
    else:
        found = next((name for name in VALIDATION_SPLIT_NAMES if name in splits and name != train_split_name), None)
        validation = splits[found] if found is not None else None

    train, validation, labels = _encode_labels(train, validation, label_column)
    if validation is None:
        size = held_out_size(len(train), validation_split_size, validation_split_percentage)
        train, validation = split_off_validation(train, label_column, size, seed)
    for name, split in (("train", train), ("validation", validation)):
        if len(split) == 0:
            raise ValueError(f"the {name} split has no rows")
        split_features = split.features
        if image_column not in split_features or label_column not in split_features:
            raise ValueError(f"the {name} split lacks the column {image_column!r} or {label_column!r}")
    train = _undecoded(train.select_columns([image_column, label_column]), image_column)
    validation = _undecoded(validation.select_columns([image_column, label_column]), image_column)
    return ClassificationData(train, validation, image_column, label_column, labels, unlisted)


def load_test_split(
    test_dir: str | None,
    test_file: str | None,
    labels: Sequence[str],
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The test images of an image folder or data files as columns ``image`` (undecoded) and ``label`` (the
    training split's class order, matched by class name); a test class the training data lacks is an error."""
    if test_dir is not None:
        listing = _list_folder("test_dir", test_dir)
        test = folder_dataset(listing)
        image_column, label_column = "image", "label"
    else:
        splits, files = load_data_files(test_file, cache_dir=cache_dir)
        test = splits["train"]
        image_column = find_image_column(test.features, image_column_name)
        label_column = find_label_column(test.features, label_column_name)
        test = absolute_image_paths(test, image_column, files["train"])
    feature = test.features[label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    index = {str(name): i for i, name in enumerate(labels)}
    found = sorted({str(names[v] if names else v) for v in test.unique(label_column)})
    unknown = [name for name in found if name not in index]
    if unknown:
        raise ValueError(f"the test split has classes the training data lacks: {unknown[:5]} (training classes: "
                         f"{list(labels)[:5]}...)")
    if len(test) == 0:
        raise ValueError("the test split has no rows")
    test = _undecoded(test, image_column).map(
        lambda row: {"target": index[str(names[row[label_column]] if names else row[label_column])]},
        remove_columns=[c for c in test.column_names if c != image_column], desc="test labels",
    )
    test = test.rename_columns({image_column: "image", "target": "label"}) if image_column != "image" else \
        test.rename_column("target", "label")
    return test.cast_column("label", datasets.ClassLabel(names=list(labels)))


def _undecoded(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _encode_labels(
    train: datasets.Dataset, validation: datasets.Dataset | None, column: str
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Makes the label column a ``ClassLabel`` shared by both splits; returns the class names."""
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        if validation is not None:
            other = validation.features[column]
            if isinstance(other, datasets.ClassLabel) and other.names != feature.names:
                raise ValueError(
                    f"the train and validation splits name their classes differently: {feature.names[:5]}... vs "
                    f"{other.names[:5]}..."
                )
        return train, validation, list(feature.names)
    values = set(train.unique(column))
    if validation is not None:
        values |= set(validation.unique(column))
    names = [str(v) for v in sorted(values)]
    class_label = datasets.ClassLabel(names=names)

    def cast(split: datasets.Dataset) -> datasets.Dataset:
        index = {v: i for i, v in enumerate(sorted(values))}
        split = split.map(lambda row: {column: index[row[column]]}, desc="encoding labels")
        return split.cast_column(column, class_label)

    return cast(train), (cast(validation) if validation is not None else None), names


class ClassificationDataset(Dataset):
    """``{"pixel_values": float (3, S, S), "labels": int64, "skipped": int, "valid": bool}`` rows from a split of
    `ClassificationData`.

    Args:
        dataset: rows with an undecoded image column and an integer label column.
        transform: PIL image -> tensor.
        replace_unreadable: replace an unreadable image by the next readable row (training: batches keep their
            size, ``skipped`` counts the replacements); when False the row comes back with ``valid = False`` and a
            blank image, for the evaluation to leave out (``skipped`` 1).
        seed: base of the per-sample augmentation seeds ``(seed, epoch, index)``; None uses the global RNG.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        label_column: str,
        transform: Callable[[Any], torch.Tensor],
        replace_unreadable: bool = False,
        seed: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.replace_unreadable = replace_unreadable
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    def _transform(self, image: Any, index: int) -> torch.Tensor:
        if self.seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index))
            return self.transform(image)

    def _describe(self, index: int, value: Any) -> str:
        if isinstance(value, dict) and value.get("path"):
            return f"{value['path']} (row {index})"
        return f"row {index}"

    def blank(self) -> torch.Tensor:
        """What the transform makes of a black image: the stand-in of an unreadable evaluation image."""
        if self._blank is None:
            self._blank = self._transform(Image.new("RGB", (8, 8)), 0)
        return self._blank

    def __getitem__(self, index: int) -> dict[str, Any]:
        attempts = MAX_CONSECUTIVE_FAILURES if self.replace_unreadable else 1
        for attempt in range(attempts):
            row = self.dataset[(index + attempt) % len(self.dataset)]
            value = row[self.image_column]
            try:
                with open_image(value) as image:
                    pixel_values = self._transform(to_rgb(image), index)
            except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files (bombs included)
                logger.warning("skipping unreadable image %s: %s: %s", self._describe(index + attempt, value),
                               type(error).__name__, error)
                continue
            return {"pixel_values": pixel_values, "labels": int(row[self.label_column]), "skipped": attempt,
                    "valid": True}
        if not self.replace_unreadable:
            return {"pixel_values": self.blank(), "labels": int(row[self.label_column]), "skipped": 1, "valid": False}
        raise ValueError(f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row from row {index}: is the data broken?")


def collate_classification(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks rows into ``{"pixel_values": (B, 3, S, S), "labels": (B,), "valid": (B,) bool, "skipped": scalar}``."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": torch.tensor([s["labels"] for s in samples], dtype=torch.long),
        "valid": torch.tensor([s.get("valid", True) for s in samples], dtype=torch.bool),
        "skipped": torch.tensor(sum(int(s["skipped"]) for s in samples), dtype=torch.long),
    }
