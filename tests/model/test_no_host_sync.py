"""The training step never makes the host wait for the device: no operator in it reads a tensor's value back
(``.item()``, ``bool()``, ``float()``, ``torch.equal``) or has an output size that depends on the data (boolean-mask
indexing, ``nonzero``, ``unique``). On an accelerator each of these is a synchronisation; on the CPU the same
operators show up in the dispatcher, so the test runs anywhere."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from sync_probe import SynchronisationProbe

from modeling_mfm.training.data.device_decoding import DeviceDecodeTransform, collate_encoded_batches, decode_batch
from modeling_mfm.training.data.transforms import PretrainTransform, normalize_on_device
from modeling_mfm.training.models.model_factory import build_model
from modeling_mfm.training.run.step_statistics import StepStatistics


def test_the_probe_sees_reads_and_data_dependent_shapes():
    x = torch.randn(8)
    with SynchronisationProbe() as probe:
        x.sum().item()
        _ = x[x > 0]
        x[x < 0] = 0.0
        _ = torch.nonzero(x)
    assert probe.seen == ["_local_scalar_dense", "index with a boolean mask", "index_put_ with a boolean mask",
                          "nonzero"]


@pytest.mark.parametrize("backbone", ["beit", "vit", "resnet", "convnext"])
@pytest.mark.parametrize("corruption,fast_paths", [
    ("mfm", True), ("sr", True), ("deblur", True), ("denoise", True), ("mfm", False),  # with and without fast paths
])
def test_training_step_has_no_synchronisation(backbone, corruption, fast_paths):
    """Normalisation on the device, mask or degradation drawn on the device, forward, frequency loss, backward,
    gradient clipping and the step's statistics, as the pre-training loop runs them. (The optimizer is left out:
    on CUDA the loop uses fused AdamW, which keeps its step counts on the device; the CPU's AdamW does not.)"""
    extra = {} if corruption == "mfm" else {"corruption": corruption}
    config = tiny_config(backbone, **extra)
    model = build_model(config, fast_paths=fast_paths).train()  # as pre-training builds it
    statistics = StepStatistics(torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with SynchronisationProbe() as probe:
        pixel_values = normalize_on_device(images, config.image_mean, config.image_std)
        loss = model(pixel_values=pixel_values, return_dict=True).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        statistics.add_micro_batch(loss, torch.tensor(0), step=0)
        statistics.add_grad_norm(norm)
    assert probe.seen == []
    assert torch.isfinite(loss)  # (outside the probe: reading it is what logging does every N steps)


def test_device_decoding_has_no_synchronisation():
    """Decoding a batch on the device slices with crop boxes that travel as Python numbers, never read back."""
    rng = np.random.default_rng(0)
    transform = DeviceDecodeTransform(PretrainTransform(16))
    samples = []
    for seed in range(3):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
        crop = transform(Image.open(io.BytesIO(buffer.getvalue())), np.random.default_rng(seed))
        samples.append({"pixel_values": crop, "skipped": 0})
    samples.append({"pixel_values": torch.zeros(3, 16, 16, dtype=torch.uint8), "skipped": 1})  # a PIL fallback
    batch = collate_encoded_batches(samples)
    with SynchronisationProbe() as probe:
        pixels, undecodable = decode_batch(batch, 16, "cpu")
    assert probe.seen == [] and undecodable == 0 and pixels.shape == (4, 3, 16, 16)
