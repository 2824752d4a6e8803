"""The pre-training augmentation: crop distribution, equality with torchvision, JPEG draft decoding, colour modes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from modeling_mfm.training.data.transforms import (
    PretrainTransform,
    _box_in_decoded_pixels,
    normalize_on_device,
    resized_crop,
    sample_resized_crop,
    to_rgb,
)


def _jpeg(array: np.ndarray, quality: int = 95) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def test_crop_distribution_matches_torchvision():
    width, height, draws = 300, 200, 4000
    rng = np.random.default_rng(0)
    ours = np.array([sample_resized_crop(width, height, rng, scale=(0.2, 1.0)) for _ in range(draws)])
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)])
    for boxes in (ours, theirs):  # every box lies inside the image
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area_ours = ours[:, 2] * ours[:, 3] / (width * height)
    area_theirs = theirs[:, 2] * theirs[:, 3] / (width * height)
    ratio_ours = np.log(ours[:, 3] / ours[:, 2])
    ratio_theirs = np.log(theirs[:, 3] / theirs[:, 2])
    # same distribution: quantiles agree within sampling noise
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area_ours, q) - np.quantile(area_theirs, q)) < 0.03
        assert abs(np.quantile(ratio_ours, q) - np.quantile(ratio_theirs, q)) < 0.03
    assert 0.19 <= area_ours.min() and area_ours.max() <= 1.0  # 0.2 up to the rounding of the box sides


def test_crop_fallback_is_torchvision_centre_crop():
    # a 1000x10 strip: no random box with ratio in [3/4, 4/3] and area >= 20% fits, both fall back to the centre
    rng = np.random.default_rng(0)
    ours = sample_resized_crop(1000, 10, rng)
    theirs = RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), [0.2, 1.0], [3 / 4, 4 / 3])
    assert ours == tuple(theirs) == (0, 493, 10, 13)


def test_crop_rejects_bad_ranges():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="scale"):
        sample_resized_crop(10, 10, rng, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        sample_resized_crop(10, 10, rng, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="size"):
        PretrainTransform(0)


def test_transform_equals_torchvision_resized_crop_for_the_same_box():
    rng = np.random.default_rng(1)
    array = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    transform = PretrainTransform(32, hflip_probability=0.0, jpeg_draft=False)
    out = transform(image, np.random.default_rng(7))
    top, left, h, w = sample_resized_crop(160, 120, np.random.default_rng(7))
    expected = TF.pil_to_tensor(TF.resized_crop(image, top, left, h, w, [32, 32], InterpolationMode.BICUBIC))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    # the same crop-then-resize, by torch's uint8 kernel instead of PIL's: at most one level of rounding, even on
    # noise (the worst case for the order in which the two passes clip overshoots)
    diff = (out.int() - expected.int()).abs()
    assert diff.max() <= 1
    assert diff.float().mean() < 0.02


def test_flip_probability_one_mirrors():
    rng = np.random.default_rng(2)
    image = Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8))
    plain = PretrainTransform(16, hflip_probability=0.0, jpeg_draft=False)(image, np.random.default_rng(3))
    flipped = PretrainTransform(16, hflip_probability=1.0, jpeg_draft=False)(image, np.random.default_rng(3))
    assert torch.equal(flipped, plain.flip(-1))


def test_jpeg_draft_decodes_smaller_and_keeps_the_crop_geometry():
    width, height, size = 1024, 768, 32
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    gradient = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).round().astype(np.uint8)
    transform = PretrainTransform(size, hflip_probability=0.0, jpeg_draft=True)
    full = PretrainTransform(size, hflip_probability=0.0, jpeg_draft=False)
    for seed in range(5):
        image = _jpeg(gradient)
        drafted = transform(image, np.random.default_rng(seed))
        reference = full(_jpeg(gradient), np.random.default_rng(seed))
        top, left, h, w = sample_resized_crop(width, height, np.random.default_rng(seed))
        if min(w, h) >= 2 * size:  # the decode was reduced
            assert image.size[0] < width
        # independent expectation: the gradient's value at each output pixel centre
        u = (np.arange(size) + 0.5) / size
        expected_r = (left + u * w) / (width - 1) * 255
        expected_g = (top + u * h) / (height - 1) * 255
        assert np.abs(drafted[0, size // 2].numpy() - expected_r).max() < 4
        assert np.abs(drafted[1, :, size // 2].numpy() - expected_g).max() < 4
        assert (drafted.int() - reference.int()).abs().max() <= 4


def test_crop_box_maps_to_the_nearest_reduced_pixel_and_stays_inside():
    assert _box_in_decoded_pixels((10, 20, 30, 40), (100, 80), (100, 80)) == (10, 20, 30, 40)  # not reduced
    assert _box_in_decoded_pixels((16, 40, 480, 640), (1024, 768), (128, 96)) == (2, 5, 60, 80)  # 1/8, exact
    assert _box_in_decoded_pixels((13, 21, 102, 51), (400, 300), (100, 75)) == (3, 5, 26, 13)  # 1/4, rounded
    # a box of a few pixels at the bottom-right corner still maps to one pixel inside the reduced image
    assert _box_in_decoded_pixels((797, 997, 3, 3), (1000, 800), (125, 100)) == (99, 124, 1, 1)


def test_resized_crop_upscales_downscales_and_checks_its_input():
    ramp = torch.arange(64, dtype=torch.uint8).repeat(3, 64, 1) * 4  # (3, 64, 64), value 4 * column
    assert resized_crop(ramp, 0, 0, 64, 64, 64).equal(ramp)  # same size: untouched
    down = resized_crop(ramp, 0, 0, 64, 64, 16)[0, 0].int()
    assert ((down - (torch.arange(16) * 16 + 6)).abs() <= 1).all()  # mean of each 4-column group: 4 * (4k + 1.5)
    up = resized_crop(ramp, 8, 8, 4, 4, 32)
    assert up.shape == (3, 32, 32) and up.dtype == torch.uint8 and 28 <= up.min() and up.max() <= 48
    with pytest.raises(ValueError, match="uint8"):
        resized_crop(ramp.float(), 0, 0, 8, 8, 4)


def test_to_rgb_modes():
    grey16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert np.asarray(to_rgb(grey16))[0, :, 0].tolist() == [0, 128, 255]
    grey32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(grey32))[0, :, 1].tolist() == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(floats))[0, :, 2].tolist() == [0, 128, 255]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8), mode="RGBA")
    assert np.asarray(to_rgb(rgba))[0].tolist() == [[255, 255, 255], [10, 20, 30]]  # transparent -> background
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert to_rgb(Image.new("L", (3, 3), 7)).mode == "RGB"
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [200, 100, 50]


def test_normalize_on_device_matches_torchvision():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    expected = torch.stack([TF.normalize(TF.convert_image_dtype(im, torch.float32), mean, std) for im in images])
    assert torch.allclose(normalize_on_device(images, mean, std), expected, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(images.float(), mean, std)


def test_transform_is_a_function_of_the_generator():
    image = Image.fromarray((np.random.default_rng(4).random((50, 70, 3)) * 255).astype(np.uint8))
    transform = PretrainTransform(24)
    a = transform(image, np.random.default_rng([1, 2, 3]))
    b = transform(image, np.random.default_rng([1, 2, 3]))
    c = transform(image, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert math.isclose(a.float().mean().item(), b.float().mean().item())


def _jpeg_file(folder, array: np.ndarray, mode: str | None = None) -> str:
    path = str(folder / f"image_{mode or 'rgb'}.jpg")
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, quality=90)
    return path


@pytest.mark.parametrize("mode", [None, "L"])
def test_full_size_jpegs_skip_pil_and_give_its_pixels(tmp_path, mode):
    path = _jpeg_file(tmp_path, (np.random.default_rng(5).random((61, 83, 3)) * 255).astype(np.uint8), mode)
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    box = (5, 7, 40, 50)  # downscaled less than 2x: no draft, a full-size decode
    with Image.open(path) as image:
        pixels, decoded_box = PretrainTransform(32, jpeg_draft=True).decode(image, box)
        assert image.tile, "PIL decoded the image: the libjpeg-turbo path was not taken"
    assert image.fp is None  # the with-block closed the file PIL had opened
    assert decoded_box == box
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 61, 83)
    assert torch.equal(pixels.permute(1, 2, 0), expected)
    assert pixels.permute(1, 2, 0).is_contiguous()  # height x width x 3 memory, as PIL's


def test_cmyk_and_loaded_jpegs_are_decoded_by_pil(tmp_path):
    array = (np.random.default_rng(6).random((40, 48, 3)) * 255).astype(np.uint8)
    transform = PretrainTransform(32, jpeg_draft=True)
    for path in (_jpeg_file(tmp_path, array, "CMYK"), _jpeg_file(tmp_path, array)):
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
        with Image.open(path) as image:
            if image.mode == "RGB":
                image.load()  # an image already in memory is not decoded again
            pixels, _ = transform.decode(image, (0, 0, 40, 48))
            assert not image.tile
        assert torch.equal(pixels.permute(1, 2, 0), expected)


def test_truncated_full_size_jpeg_raises_oserror():
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(7).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    with pytest.raises(OSError, match="cannot decode the JPEG: .*truncated"):
        PretrainTransform(48).decode(truncated, (0, 0, 64, 64))  # no draft: the libjpeg-turbo path
