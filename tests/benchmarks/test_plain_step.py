"""The plain float32 baseline of the benchmark computes the package's loss, only formulated differently; and the
benchmark times it."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate.state import AcceleratorState
from plain_step import (
    plain_config,
    plain_keep_masks,
    plain_model,
    plain_pretraining_loss,
    plain_training_step,
)
from step_benchmark import benchmark_training_step

from modeling_mfm import MFMForPreTraining
from modeling_mfm.frequency import low_pass_mask


@pytest.mark.parametrize("backbone", ["beit", "resnet"])
@pytest.mark.parametrize("loss_on", ["masked", "all"])
def test_plain_loss_equals_the_models_loss_on_the_same_masks(tiny_config_factory, backbone, loss_on):
    config = tiny_config_factory(backbone, loss_on=loss_on, with_matrix=True)
    torch.manual_seed(0)
    model = MFMForPreTraining(config).train()
    plain = plain_model(config).train()
    plain.load_state_dict(model.state_dict())
    images = torch.rand(4, 3, 32, 32)
    keep = plain_keep_masks(config, 4, random.Random(3))
    mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std).view(1, -1, 1, 1)
    ours = model(pixel_values=(images - mean) / std, frequency_mask=keep).loss
    theirs = plain_pretraining_loss(plain, images, keep)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    if backbone == "beit":
        assert plain.config._attn_implementation == "eager" and model.config._attn_implementation != "eager"


def test_plain_masks_are_low_or_high_pass_per_image(tiny_config_factory):
    config = tiny_config_factory("beit", low_pass_probability=0.3)
    low = low_pass_mask(32, 32, config.mask_radius, config.mask_outer_radius).long()
    keep = plain_keep_masks(config, 400, random.Random(0))
    is_low = (keep == low).flatten(1).all(1)
    is_high = (keep == 1 - low).flatten(1).all(1)
    assert bool((is_low | is_high).all()) and keep.shape == (400, 32, 32)
    assert 0.22 < is_low.float().mean().item() < 0.38


def test_plain_baseline_alternates_with_the_fast_step_in_its_own_precision(tiny_config_factory):
    with pytest.raises(ValueError, match="frequency-masking"):
        plain_config(tiny_config_factory("beit", corruption="denoise", loss_on="all"))
    with pytest.raises(ValueError, match="frequency-masking"):
        benchmark_training_step(tiny_config_factory("beit", corruption="denoise", loss_on="all"), batch_size=2,
                                plain_baseline=True)
    try:  # the fast step in bf16 autocast, the baseline in float32, in one process
        result = benchmark_training_step(tiny_config_factory("resnet"), batch_size=2, steps=3, warmup_steps=1,
                                         cpu=True, mixed_precision="bf16", plain_baseline=True)
    finally:
        AcceleratorState._reset_state(True)
    plain = result["plain_baseline"]
    assert result["mixed_precision"] == "bf16" and result["channels_last"]
    assert plain["img_per_s"] > 0 and plain["speedup"] == pytest.approx(plain["fast_img_per_s"] / plain["img_per_s"])
    assert torch.isfinite(torch.tensor(plain["final_loss"]))


def test_plain_training_step_trains_in_float32_from_the_benchmarks_initial_weights(tiny_config_factory):
    config = tiny_config_factory("beit")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    step = plain_training_step(config, images)
    torch.manual_seed(0)
    reference = MFMForPreTraining(config)  # the weights the fast step of the benchmark starts from
    keep = plain_keep_masks(config, 4, random.Random(0))  # the first masks the step draws
    mean = torch.tensor(config.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std).view(1, -1, 1, 1)
    expected = reference(pixel_values=(images.float() / 255 - mean) / std, frequency_mask=keep).loss
    first = step()
    assert first.dtype == torch.float32
    torch.testing.assert_close(first, expected.detach(), rtol=1e-5, atol=1e-6)
    losses = [step() for _ in range(5)]
    assert all(torch.isfinite(loss) for loss in losses) and losses[-1] != first  # the weights moved
