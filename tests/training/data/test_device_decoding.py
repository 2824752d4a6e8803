"""Device JPEG decoding (``--decode_on_device``): the same crops as the PIL path, nearly the same pixels, mixed
batches, unreadable data skipped and counted. Runs on the CPU (torchvision's libjpeg decoder); on CUDA the same
code calls nvJPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modeling_mfm.training.data.device_decoding import (
    DeviceDecodeTransform,
    EncodedCrop,
    collate_encoded_batches,
    decode_batch,
)
from modeling_mfm.training.data.sources import (
    EpochShuffleSampler,
    HFImageSource,
    PretrainingDataset,
    load_image_dataset,
)
from modeling_mfm.training.data.transforms import PretrainTransform, sample_resized_crop


def smooth_photo(height: int, width: int, seed: int) -> Image.Image:
    """A smooth colour image (JPEG keeps it well, so the two decoders' differences stay small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y) + rng.uniform(0, 6))
                for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


def jpeg_file(image: Image.Image) -> Image.Image:
    """``image`` saved as a JPEG and reopened lazily, as the datasets hand it over."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def sample(transform, image: Image.Image, seed: int) -> dict:
    return {"pixel_values": transform(image, np.random.default_rng(seed)), "skipped": 0}


def test_worker_draws_the_pil_paths_crop_and_flip():
    pil = PretrainTransform(64, hflip_probability=0.5, jpeg_draft=False)
    transform = DeviceDecodeTransform(pil)
    flips = []
    for seed in range(40):
        crop = transform(jpeg_file(smooth_photo(90, 130, seed)), np.random.default_rng(seed))
        assert isinstance(crop, EncodedCrop) and crop.data[:2] == b"\xff\xd8"
        rng = np.random.default_rng(seed)
        assert (crop.top, crop.left, crop.height, crop.width) == sample_resized_crop(130, 90, rng, pil.scale, pil.ratio)
        assert crop.flip == (rng.random() < 0.5)
        flips.append(crop.flip)
    assert 8 < sum(flips) < 32  # both outcomes drawn


def test_decoded_batch_matches_the_pil_path_pixel_for_pixel_within_rounding():
    pil = PretrainTransform(48, jpeg_draft=False)
    transform = DeviceDecodeTransform(pil)
    photos = [smooth_photo(70 + 9 * i, 100 - 5 * i, i) for i in range(6)]
    samples = [sample(transform, jpeg_file(photo), seed) for seed, photo in enumerate(photos)]
    expected = torch.stack([pil(jpeg_file(photo), np.random.default_rng(seed)) for seed, photo in enumerate(photos)])
    pixels, undecodable = decode_batch(collate_encoded_batches(samples), 48, "cpu")
    assert undecodable == 0 and pixels.dtype == torch.uint8 and pixels.shape == (6, 3, 48, 48)
    difference = (pixels.float() - expected.float()).abs()
    # two JPEG decoders (PIL's libjpeg and torchvision's) and one resampler (`resized_crop`): the same picture up to
    # the decoders' rounding
    assert difference.mean() < 0.1 and difference.amax() <= 3
    assert difference.mean(dim=(1, 2, 3)).max() < 1.5  # every image, so no crop or flip differs


def test_mixed_batches_keep_their_order_and_fall_back_to_pil():
    pil = PretrainTransform(32, jpeg_draft=False)
    transform = DeviceDecodeTransform(pil)
    rgb = smooth_photo(50, 60, 1)
    png = io.BytesIO()
    rgb.save(png, "PNG")
    grey_jpeg = jpeg_file(smooth_photo(50, 60, 2).convert("L"))
    opened = [jpeg_file(rgb), Image.open(io.BytesIO(png.getvalue())), grey_jpeg, rgb, jpeg_file(smooth_photo(40, 70, 3))]
    samples = [sample(transform, image, seed) for seed, image in enumerate(opened)]
    kinds = [isinstance(s["pixel_values"], EncodedCrop) for s in samples]
    assert kinds == [True, False, False, False, True]  # PNG, greyscale JPEG and a decoded image take the PIL path
    batch = collate_encoded_batches(samples)
    assert batch["jpeg_positions"] == [0, 4] and batch["decoded_positions"] == [1, 2, 3]
    pixels, undecodable = decode_batch(batch, 32, "cpu")
    assert undecodable == 0
    for position in (1, 2, 3):  # the fallbacks are exactly the PIL path's output
        assert torch.equal(pixels[position], samples[position]["pixel_values"])
    reference = pil(jpeg_file(rgb), np.random.default_rng(0))
    assert (pixels[0].float() - reference.float()).abs().mean() < 1.0


def test_undecodable_jpeg_is_replaced_and_counted(caplog):
    transform = DeviceDecodeTransform(PretrainTransform(32, jpeg_draft=False))
    good = jpeg_file(smooth_photo(50, 60, 4))
    buffer = io.BytesIO()
    smooth_photo(50, 60, 5).save(buffer, "JPEG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))  # header reads fine
    samples = [sample(transform, good, 0), sample(transform, truncated, 1)]
    assert all(isinstance(s["pixel_values"], EncodedCrop) for s in samples)
    pixels, undecodable = decode_batch(collate_encoded_batches(samples), 32, "cpu")
    assert undecodable == 1 and "undecodable JPEG" in caplog.text
    assert torch.equal(pixels[1], pixels[0])  # the batch keeps its size

    only_bad = collate_encoded_batches([samples[1]])
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        decode_batch(only_bad, 32, "cpu")


def test_header_that_disagrees_with_the_data_is_an_error_not_a_silent_crop():
    good = jpeg_file(smooth_photo(40, 40, 6))
    crop = DeviceDecodeTransform(PretrainTransform(16))(good, np.random.default_rng(0))
    lying = EncodedCrop(crop.data, 30, 30, 20, 20, False)  # a box outside the 40x40 image
    batch = collate_encoded_batches([{"pixel_values": lying, "skipped": 0}, {"pixel_values": crop, "skipped": 0}])
    pixels, undecodable = decode_batch(batch, 16, "cpu")
    assert undecodable == 1 and torch.equal(pixels[0], pixels[1])


def test_dataloader_with_workers_ships_encoded_samples(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        smooth_photo(60 + i, 80, i).save(folder / f"{i}.jpg", quality=90)
    dataset, column, _ = load_image_dataset(train_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    pil = PretrainTransform(24, jpeg_draft=False)
    encoded = PretrainingDataset(HFImageSource(dataset, column), DeviceDecodeTransform(pil), seed=3)
    plain = PretrainingDataset(HFImageSource(dataset, column), pil, seed=3)
    loader = DataLoader(encoded, batch_size=3, sampler=EpochShuffleSampler(6, seed=3), num_workers=2,
                        collate_fn=collate_encoded_batches)
    keys = list(EpochShuffleSampler(6, seed=3))
    for b, batch in enumerate(loader):
        assert len(batch["jpeg_crops"]) == 3 and int(batch["skipped"]) == 0
        pixels, _ = decode_batch(batch, 24, "cpu")
        expected = torch.stack([plain[key]["pixel_values"] for key in keys[3 * b : 3 * b + 3]])
        assert (pixels.float() - expected.float()).abs().mean() < 1.0


def corrupted_reads(decode, iterations: int = 30, images: int = 16) -> int:
    """How many reductions read memory that ``decode`` overwrote while they were still queued: each round fills
    tensors of the decoder's output size with a known value, queues a long kernel and then one sum per tensor, frees
    the tensors (the caching allocator may hand their blocks on at once: later work on the same stream is ordered),
    decodes, and compares the sums with the value written."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = [torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8) for _ in range(images)]
    corrupted = 0
    for _ in range(iterations):
        filled = [torch.full((3, 256, 256), 7, dtype=torch.uint8, device="cuda") for _ in range(images)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of queued work before the reductions
        sums = [tensor.sum(dtype=torch.int64) for tensor in filled]
        del filled
        decoded = decode(data, "cuda")
        torch.cuda.synchronize()
        corrupted += sum(int(value) != 7 * 3 * 256 * 256 for value in sums)
        del decoded
    return corrupted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_cuda_decoding_never_overwrites_memory_queued_kernels_still_read():
    from modeling_mfm.training.data.device_decoding import decode_jpegs

    assert corrupted_reads(decode_jpegs) == 0
