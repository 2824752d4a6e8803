"""Datasets for pre-training: loading, image-column detection, unreadable images, indexed randomness, streaming."""

from __future__ import annotations

import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modeling_mfm.training.data.sources import (
    SAMPLE_PHOTOS,
    EpochShuffleSampler,
    HFImageSource,
    InMemoryImageSource,
    PretrainingDataset,
    StreamingPretrainingDataset,
    collate_pixel_batches,
    find_image_column,
    load_image_dataset,
    open_image,
    prepare_stream,
    sample_photo_paths,
    sample_photo_source,
)
from modeling_mfm.training.data.transforms import PretrainTransform


def write_images(folder, count: int, corrupt: int = 0, start: int = 0) -> list[str]:
    """Random RGB JPEGs (and ``corrupt`` files that are not images) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = os.path.join(folder, f"img_{i:03d}.jpg")
        Image.fromarray((rng.random((24 + i % 5, 30, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    for i in range(corrupt):
        path = os.path.join(folder, f"broken_{i}.jpg")
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
        paths.append(path)
    return paths


@pytest.fixture
def transform():
    return PretrainTransform(16)


def test_find_image_column():
    features = datasets.Features({"label": datasets.Value("int64"), "picture": datasets.Image()})
    assert find_image_column(features) == "picture"
    assert find_image_column(datasets.Features({"img": datasets.Value("string")})) == "img"
    assert find_image_column(features, "picture") == "picture"
    with pytest.raises(ValueError, match=r"'photo' is not a column.*\['label', 'picture'\]"):
        find_image_column(features, "photo")
    with pytest.raises(ValueError, match="holds .*not images"):
        find_image_column(features, "label")
    with pytest.raises(ValueError, match="no image column"):
        find_image_column(datasets.Features({"text": datasets.Value("int32")}))


def test_load_image_folder_keeps_only_undecoded_images(tmp_path):
    folder = tmp_path / "train"
    write_images(folder / "cats", 3)
    write_images(folder / "dogs", 2, start=10)
    dataset, column, _ = load_image_dataset(train_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert column == "image" and dataset.column_names == ["image"] and len(dataset) == 5
    row = dataset[0]["image"]
    assert isinstance(row, dict) and row["path"].endswith(".jpg")  # decoding is ours
    with open_image(row) as image:
        assert image.size[1] >= 24


def test_load_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no image files"):
        load_image_dataset(train_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is not a directory"):
        load_image_dataset(train_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    write_images(tmp_path / "photos", 2)
    with pytest.raises(ValueError, match="lies inside train_dir"):
        load_image_dataset(train_dir=str(tmp_path / "photos"), cache_dir=str(tmp_path / "photos" / "cache"))
    dataset, _, _ = load_image_dataset(train_dir=str(tmp_path / "photos"), cache_dir=str(tmp_path / "photos-cache"))
    assert len(dataset) == 2  # a sibling folder whose name starts alike is fine


def test_load_dataset_by_path_with_named_column(tmp_path):
    # a dataset repository layout (parquet shards), loaded through the same code path as a Hub id
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    data = datasets.Dataset.from_dict({"photo": images, "label": [0, 1, 0, 1]})
    data = data.cast_column("photo", datasets.Image())
    (tmp_path / "repo" / "data").mkdir(parents=True)
    data.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    dataset, column, _ = load_image_dataset(dataset_name=str(tmp_path / "repo"), cache_dir=str(tmp_path / "cache"))
    assert column == "photo" and dataset.column_names == ["photo"]
    assert np.array_equal(np.asarray(open_image(dataset[2]["photo"])), np.asarray(images[2]))
    with pytest.raises(ValueError, match="'pixels' is not a column"):
        load_image_dataset(dataset_name=str(tmp_path / "repo"), image_column_name="pixels",
                           cache_dir=str(tmp_path / "cache"))


def test_unreadable_image_is_skipped_counted_and_replaced(tmp_path, transform, caplog):
    write_images(tmp_path / "imgs", 3, corrupt=1)
    dataset, column, _ = load_image_dataset(train_dir=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"))
    data = PretrainingDataset(HFImageSource(dataset, column), transform, seed=0)
    broken = next(i for i in range(len(dataset)) if "broken" in dataset[i][column]["path"])
    with caplog.at_level("WARNING"):
        sample = data[(0, broken)]
    assert sample["skipped"] == 1 and sample["pixel_values"].shape == (3, 16, 16)
    assert "skipping unreadable image" in caplog.text and "broken_0.jpg" in caplog.text
    # the replacement is the next readable image, augmented as that image
    following = (broken + 1) % len(data)
    assert torch.equal(sample["pixel_values"], data.load(0, following))
    counts = [data[(0, i)]["skipped"] for i in range(len(data))]
    assert sum(counts) == 1


def test_only_unreadable_images_raise(tmp_path, transform):
    write_images(tmp_path / "bad", 0, corrupt=2)
    dataset, column, _ = load_image_dataset(train_dir=str(tmp_path / "bad"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="unreadable images in a row"):
        PretrainingDataset(HFImageSource(dataset, column), transform, seed=0)[(0, 0)]


def test_samples_depend_on_seed_epoch_index_only(tmp_path, transform):
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    data = PretrainingDataset(InMemoryImageSource(images), transform, seed=5, repeats=2)
    assert len(data) == 16
    assert torch.equal(data[(1, 3)]["pixel_values"], data[(1, 3)]["pixel_values"])
    assert not torch.equal(data[(1, 3)]["pixel_values"], data[(2, 3)]["pixel_values"])
    # the same batches with 0 or 2 worker processes
    sampler = EpochShuffleSampler(len(data), seed=5)
    sampler.set_epoch(3)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate_pixel_batches)
        batches.append(torch.cat([b["pixel_values"] for b in loader]))
    assert torch.equal(batches[0], batches[1])


def test_epoch_shuffle_sampler():
    sampler = EpochShuffleSampler(10, seed=1)
    first = list(sampler)
    assert [e for e, _ in first] == [0] * 10 and sorted(i for _, i in first) == list(range(10))
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert [e for e, _ in second] == [1] * 10 and second != first
    assert [i for _, i in EpochShuffleSampler(4, seed=1, shuffle=False)] == [0, 1, 2, 3]


def test_collate():
    samples = [{"pixel_values": torch.full((3, 2, 2), i, dtype=torch.uint8), "skipped": i} for i in range(3)]
    batch = collate_pixel_batches(samples)
    assert batch["pixel_values"].shape == (3, 3, 2, 2) and batch["pixel_values"].dtype == torch.uint8
    assert batch["skipped"].item() == 3


def test_sample_photos_ship_with_scikit_image():
    paths = sample_photo_paths()
    assert len(paths) == len(SAMPLE_PHOTOS)  # all of them are in the wheel: the demo needs no download
    source = sample_photo_source(short_side=64)
    assert len(source) == len(paths)
    for i in range(len(source)):
        image = source.open(i)
        assert image.mode == "RGB" and min(image.size) <= 64


def test_streaming_split_by_node_and_skips(tmp_path, transform):
    write_images(tmp_path / "imgs", 6, corrupt=1)
    stream, column, _ = load_image_dataset(train_dir=str(tmp_path / "imgs"), streaming=True)
    seen = []
    for rank in (0, 1):
        part = prepare_stream(stream, seed=0, shuffle_buffer_size=0, rank=rank, world_size=2)
        seen.append({row[column]["path"] for row in part})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 7
    data = StreamingPretrainingDataset(prepare_stream(stream, 0, 4, 0, 1), column, transform, seed=0)
    iterator = iter(data)
    samples = [next(iterator) for _ in range(12)]  # cycles past the end of the 7-file stream
    assert all(s["pixel_values"].shape == (3, 16, 16) for s in samples)
    assert sum(s["skipped"] for s in samples[:6]) == 1  # one unreadable file per pass, counted on the next sample


def test_micro_batches_resume_where_the_uninterrupted_run_is_and_mark_the_pass_ends():
    """5 optimizer steps of 2 micro-batches, 2 steps a pass (a 5th batch per pass is left over): a run resumed at
    step 3 reads exactly the uninterrupted run's last 4 micro-batches, the passes reshuffled as they were."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from modeling_mfm.training.data.pretraining_data import micro_batches

    class Keys(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return torch.tensor(key)  # (epoch, index)

    try:
        accelerator = Accelerator(cpu=True)
        loader = accelerator.prepare(DataLoader(Keys(), batch_size=2, sampler=EpochShuffleSampler(10, seed=0),
                                                drop_last=True))
        full = [(b.tolist(), end) for b, end in micro_batches(loader, accelerator, 0, 5, 2, 2)]
        resumed = [(b.tolist(), end) for b, end in micro_batches(loader, accelerator, 3, 5, 2, 2)]
    finally:
        AcceleratorState._reset_state(True)
    assert len(full) == 10 and resumed == full[6:]
    assert [end for _, end in full] == [False, False, False, True] * 2 + [False, False]
    assert [{epoch for epoch, _ in batch} for batch, _ in full] == [{0}] * 4 + [{1}] * 4 + [{2}] * 2
