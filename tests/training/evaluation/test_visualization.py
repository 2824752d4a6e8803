"""Reconstruction pictures and the indexed randomness of the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_mfm import MFMForPreTraining, filter_frequencies, low_pass_mask
from modeling_mfm.training.evaluation.visualization import (
    combine_bands,
    log_magnitude_spectrum,
    predict_fixed_batch,
    reconstruction_grid,
    save_png,
    view_masks,
)
from modeling_mfm.training.run.randomness import derive_seed, global_micro_batch_index, seeded_device_rng


def test_log_magnitude_spectrum_of_a_constant_image():
    images = torch.full((1, 3, 8, 8), 0.5)
    spectrum = log_magnitude_spectrum(images)
    assert spectrum.shape == (1, 8, 8)
    assert spectrum[0, 4, 4].item() == pytest.approx(np.log1p(0.5 * 64))  # DC at the centre after fftshift
    spectrum[0, 4, 4] = 0
    assert spectrum.abs().max().item() < 1e-5


def test_combine_bands_restores_the_image_from_its_two_bands():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 16, 16)
    keep = low_pass_mask(16, 16, 4).expand(2, 16, 16)
    # kept band from the image itself, removed band from the image too: the image comes back
    assert torch.allclose(combine_bands(image, image, keep), image, atol=1e-5)
    # a prediction of zeros adds nothing: the result is the image filtered by the mask
    assert torch.allclose(combine_bands(image, torch.zeros_like(image), keep), filter_frequencies(image, keep),
                          atol=1e-5)


def _pixels_near(picture: np.ndarray, colour: tuple[int, int, int], tolerance: int = 8) -> int:
    return int((np.abs(picture.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_reconstruction_grid_shows_each_image_in_its_column_and_the_png_keeps_it(tmp_path):
    def solid(colour):
        return torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(2, 3, 16, 16).clone()

    original, corrupted, reconstruction = solid((1.0, 0.0, 0.0)), solid((0.0, 1.0, 0.0)), solid((0.0, 0.0, 1.0))
    keep = torch.stack([low_pass_mask(16, 16, 4), 1 - low_pass_mask(16, 16, 4)])
    with_mask = reconstruction_grid(original, corrupted, reconstruction, keep, ["low-pass", "high-pass"], title="t")
    without = reconstruction_grid(original, corrupted, reconstruction)
    assert with_mask.dtype == np.uint8 and with_mask.ndim == 3 and with_mask.shape[2] == 3
    assert with_mask.shape[1] > without.shape[1]  # one more column: kept band + predicted band
    # each panel is drawn: pure red, green and blue areas of at least two 16x16 images each (scaled up by the dpi),
    # and each colour lies left of the next (original | corrupted | reconstruction)
    columns = {}
    for name, colour in (("original", (255, 0, 0)), ("corrupted", (0, 255, 0)), ("reconstruction", (0, 0, 255))):
        assert _pixels_near(without, colour) >= 2 * 16 * 16, name
        columns[name] = np.nonzero((np.abs(without.astype(int) - colour).max(axis=-1) <= 8).any(axis=0))[0].mean()
    assert columns["original"] < columns["corrupted"] < columns["reconstruction"]
    with pytest.raises(ValueError, match="frequency_mask"):
        reconstruction_grid(original, corrupted, reconstruction, keep[:1])
    save_png(with_mask, tmp_path / "pics" / "grid.png")
    from PIL import Image

    with Image.open(tmp_path / "pics" / "grid.png") as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), with_mask)  # lossless


def test_predict_fixed_batch_is_reproducible_and_side_effect_free(tiny_config_factory):
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config_factory("beit")).train()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    rng_before = torch.get_rng_state()
    first = predict_fixed_batch(model, images, seed=3)
    second = predict_fixed_batch(model, images, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training
    assert first["row_labels"] == ["low-pass", "high-pass", "low-pass", "high-pass"]
    assert torch.equal(first["reconstruction"], second["reconstruction"])
    mask = first["frequency_mask"]
    assert torch.equal(mask[0], low_pass_mask(32, 32, 4)) and torch.equal(mask[1], 1 - low_pass_mask(32, 32, 4))
    assert torch.allclose(first["original"], images.float() / 255, atol=1e-5)
    assert 0.0 <= first["corrupted"].min() and first["corrupted"].max() <= 1.0
    views = view_masks(model, 32, 32, torch.device("cpu"))  # the monitor's views: the same masks
    assert torch.equal(mask[0], views["low_pass"]) and torch.equal(mask[1], views["high_pass"])


def test_predict_fixed_batch_normalises_with_the_models_own_mean_and_std(tiny_config_factory):
    model = MFMForPreTraining(tiny_config_factory("beit", image_mean=[0.2, 0.5, 0.8], image_std=[0.1, 0.3, 0.6]))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    prediction = predict_fixed_batch(model, images)
    assert torch.allclose(prediction["original"], images.float() / 255, atol=1e-6)
    corrupted, _ = model.corrupt(model.normalize(images.float() / 255), prediction["frequency_mask"])
    assert torch.allclose(prediction["corrupted"], model.unnormalize(corrupted).clamp(0, 1), atol=1e-6)


def test_global_micro_batch_index_maps_processes_onto_accumulation():
    # 1 process x 2 accumulation steps reads global batches 0, 1, 2, 3 ...; 2 processes x 1 step read the same
    one = [global_micro_batch_index(step, a, 2, 0, 1) for step in range(2) for a in range(2)]
    two = [global_micro_batch_index(step, 0, 1, p, 2) for step in range(2) for p in range(2)]
    assert one == two == [0, 1, 2, 3]
    assert global_micro_batch_index(3, 1, 2, 1, 4) == (3 * 2 + 1) * 4 + 1
    with pytest.raises(ValueError, match="accumulation_index"):
        global_micro_batch_index(0, 2, 2, 0, 1)
    with pytest.raises(ValueError, match="process_index"):
        global_micro_batch_index(0, 0, 1, 2, 2)


def test_seeded_device_rng_is_local_and_repeatable():
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    torch.manual_seed(123)
    outside = torch.rand(3)
    torch.manual_seed(123)
    with seeded_device_rng(torch.device("cpu"), 7):
        a = torch.rand(3)
    after = torch.rand(3)
    with seeded_device_rng(torch.device("cpu"), 7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(after, outside)  # the surrounding stream is untouched
