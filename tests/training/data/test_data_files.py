"""Local data files (--train_file / --validation_file: parquet, arrow, CSV, JSON lines) and the held-out validation
slice shared by pre-training, fine-tuning and the linear probe."""

from __future__ import annotations

import io
import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_mfm.training.data.classification_data import ClassificationDataArguments, load_classification_dataset
from modeling_mfm.training.data.data_files import load_data_files, resolve_data_files
from modeling_mfm.training.data.holdout import held_out_size, stratified_holdout
from modeling_mfm.training.data.sources import load_image_dataset, open_image

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})


def jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """36 rows (classes of 18, 12 and 6 rows): each image is a flat grey whose level is its row number, so that a
    row can be recognised after loading; written as two parquet shards, one arrow file, a CSV and a JSON-lines file
    (the last two list PNG files by relative path)."""
    root = tmp_path_factory.mktemp("files")
    labels = [0] * 18 + [1] * 12 + [2] * 6
    rows = {"image": [{"bytes": jpeg_bytes(10 + 5 * i), "path": None} for i in range(36)], "label": labels}
    dataset = datasets.Dataset.from_dict(rows, features=FEATURES)
    (root / "parquet").mkdir()
    dataset.select(range(20)).to_parquet(str(root / "parquet" / "train-00000-of-00002.parquet"))
    dataset.select(range(20, 36)).to_parquet(str(root / "parquet" / "train-00001-of-00002.parquet"))
    dataset.save_to_disk(str(root / "arrow"))
    (root / "listed" / "images").mkdir(parents=True)
    listing = []
    for i, label in enumerate(labels):
        Image.fromarray(np.full((8, 8, 3), 10 + 5 * i, dtype=np.uint8)).save(root / "listed" / "images" / f"{i}.png")
        listing.append({"image": f"images/{i}.png", "label": ["a", "b", "c"][label]})
    (root / "listed" / "train.csv").write_text(
        "image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in listing))
    (root / "listed" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listing))
    return root


def grey_levels(dataset: datasets.Dataset, column: str) -> list[int]:
    """The row numbers of the images (their grey level is 10 + 5 x row)."""
    levels = []
    for value in dataset[column]:
        with open_image(value) as image:
            levels.append(round((np.asarray(image.convert("RGB")).mean() - 10) / 5))
    return levels


# ---------------------------------------------------------------------------------------------------- the slice
def test_stratified_holdout_is_proportional_seeded_and_complete():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_holdout(labels, 10, seed=3)
    assert Counter(labels[held].tolist()) == {0: 5, 1: 3, 2: 2}
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))
    assert (stratified_holdout(labels, 10, seed=3)[1] == held).all()
    assert not (stratified_holdout(labels, 10, seed=4)[1] == held).all()
    # largest remainders: 7 rows of 3 classes of sizes 50 / 30 / 20 -> shares 3.5 / 2.1 / 1.4 -> 4 / 2 / 1
    assert Counter(labels[stratified_holdout(labels, 7, seed=0)[1]].tolist()) == {0: 4, 1: 2, 2: 1}
    # the rows depend on the label values' order only, not on how they are encoded
    names = np.array(["cat", "dog", "eel"])[labels]
    assert (stratified_holdout(names, 10, seed=3)[1] == held).all()
    with pytest.raises(ValueError, match="slice size"):
        stratified_holdout(labels, 100, seed=0)


def test_held_out_size():
    assert held_out_size(50000, size=5000) == 5000
    assert held_out_size(50000, percentage=10.0) == 5000
    assert held_out_size(10, size=3, percentage=50.0) == 3  # the size wins
    for kwargs, match in (({"size": 0}, ">= 1"), ({"size": 10}, "smaller than"), ({"percentage": 100.0}, "(0, 100)"),
                          ({}, "number of rows or a percentage")):
        with pytest.raises(ValueError, match=match):
            held_out_size(10, **kwargs)


# ---------------------------------------------------------------------------------------------------- the files
@pytest.mark.parametrize("pattern", ["parquet/*.parquet", "arrow/*.arrow", "listed/train.csv", "listed/train.jsonl"])
def test_every_file_type_gives_the_same_rows_and_slice(labelled, tmp_path, pattern):
    data = load_classification_dataset(train_file=str(labelled / pattern), validation_split_size=9, seed=1,
                                       cache_dir=str(tmp_path / "cache"))
    assert data.labels == ["a", "b", "c"]
    assert len(data.train) == 27 and len(data.validation) == 9
    validation = grey_levels(data.validation, data.image_column)
    assert Counter(data.validation[data.label_column]) == {0: 5, 1: 3, 2: 1}  # shares 4.5 / 3 / 1.5
    reference = load_classification_dataset(train_file=str(labelled / "parquet" / "*.parquet"),
                                            validation_split_size=9, seed=1, cache_dir=str(tmp_path / "cache"))
    assert validation == grey_levels(reference.validation, reference.image_column)
    assert sorted(validation + grey_levels(data.train, data.image_column)) == list(range(36))


def test_pretraining_leaves_out_exactly_the_finetuning_slice(labelled, tmp_path):
    """Same file, size and seed: pre-training trains on exactly the rows fine-tuning trains on."""
    files = str(labelled / "parquet" / "*.parquet")
    arguments = ClassificationDataArguments(train_file=files, validation_split_size=9, validation_split_seed=5,
                                            cache_dir=str(tmp_path / "cache"))
    finetuning = arguments.load_datasets(seed=123)  # the slice's own seed wins over the run's
    pretraining, column, _ = load_image_dataset(train_file=files, validation_split_size=9, validation_split_seed=5,
                                                cache_dir=str(tmp_path / "cache"))
    assert pretraining.column_names == [column] == ["image"]
    assert grey_levels(pretraining, column) == grey_levels(finetuning.train, finetuning.image_column)
    by_percentage, _, _ = load_image_dataset(train_file=files, validation_split_percentage=25.0,
                                             validation_split_seed=5, cache_dir=str(tmp_path / "cache"))
    assert grey_levels(by_percentage, column) == grey_levels(pretraining, column)  # 25 % of 36 = 9 rows
    everything, _, _ = load_image_dataset(train_file=files, cache_dir=str(tmp_path / "cache"))
    assert len(everything) == 36


def test_validation_file_and_errors(labelled, tmp_path):
    data = load_classification_dataset(train_file=str(labelled / "parquet" / "train-00000-of-00002.parquet"),
                                       validation_file=str(labelled / "parquet" / "train-00001-of-00002.parquet"),
                                       cache_dir=str(tmp_path / "cache"))
    assert (len(data.train), len(data.validation)) == (20, 16)
    assert resolve_data_files(str(labelled / "listed" / "*.csv")) == ([str(labelled / "listed" / "train.csv")], "csv")
    for pattern, match in ((str(labelled / "nothing-*.parquet"), "matches no file"),
                           (str(labelled / "listed" / "images" / "*.png"), "unsupported file type '.png'"),
                           (str(labelled / "listed" / "train.*"), "mixes file types"),
                           ("hf://datasets/x/y.parquet", "local file")):
        with pytest.raises(ValueError, match=match):
            resolve_data_files(pattern)
    with pytest.raises(ValueError, match="same file type"):
        load_data_files(str(labelled / "listed" / "train.csv"), str(labelled / "listed" / "train.jsonl"))
    with pytest.raises(ValueError, match="exactly one of"):
        load_classification_dataset(train_dir=str(labelled), train_file=str(labelled / "listed" / "train.csv"))
    with pytest.raises(ValueError, match="exactly one of --dataset_name, --train_dir and --train_file"):
        ClassificationDataArguments().check_data_source()
