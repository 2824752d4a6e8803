"""Datasets kept on the training device (--dataset_on_device): decoding once, resampling as the PIL path does, batches
keyed by (seed, epoch, batch), process shards, no host synchronisation, and bit-exact resumes of the real loops."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from sync_probe import SynchronisationProbe

from modeling_mfm.training.data.device_dataset import (
    DeviceBatches,
    DeviceImages,
    load_device_images,
    random_erasing_batch,
    resized_crop_batch,
    sample_crop_boxes,
    sample_erasing_boxes,
)
from modeling_mfm.training.data.transforms import resized_crop
from modeling_mfm.training.loops.finetune import FinetuneArguments, finetune
from modeling_mfm.training.loops.pretrain import run_pretraining
from modeling_mfm.training.loops.pretraining_arguments import parse_arguments
from modeling_mfm.training.run.trackers import read_metrics

BACKBONE = ('{"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, '
            '"intermediate_size": 64}')


def parquet_file(path, rows: int = 48, classes: int = 3, seed: int = 0):
    """``rows`` 32x32 JPEGs in ``classes`` colours, and one unreadable row (an Image column with broken bytes)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(rows):
        colour = np.array([(60, 60, 200), (60, 200, 60), (200, 60, 60)][i % classes])
        buffer = io.BytesIO()
        Image.fromarray(np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(i % classes)
    images.append({"bytes": b"\xff\xd8\xff\xe0" + bytes(100), "path": None})
    labels.append(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return path


def random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------- pieces
def test_resampling_is_the_antialiased_bicubic_of_the_crop():
    generator = torch.Generator().manual_seed(0)
    for height, width, scale in ((32, 32, (0.08, 1.0)), (64, 48, (0.2, 1.0))):  # upscaled and downscaled crops
        images = torch.randint(0, 256, (24, 3, height, width), generator=generator, dtype=torch.uint8)
        top, left, crop_h, crop_w = sample_crop_boxes(24, height, width, generator, scale)
        flip = torch.arange(24) % 2 == 0
        out = resized_crop_batch(images, top, left, crop_h, crop_w, flip, 32)
        for i in range(24):
            t, l, h, w = (int(v[i]) for v in (top, left, crop_h, crop_w))
            region = images[i:i + 1, :, t:t + h, l:l + w].float()
            expected = F.interpolate(region, size=(32, 32), mode="bicubic", antialias=True)[0]
            expected = expected.flip(-1) if flip[i] else expected
            assert (out[i].float() - expected.round().clamp(0, 255)).abs().max() <= 1
            # the PIL path's uint8 kernel clips between its two passes: a few levels apart at strong edges only
            pil_path = resized_crop(images[i], t, l, h, w, 32)
            pil_path = pil_path.flip(-1) if flip[i] else pil_path
            assert (out[i].int() - pil_path.int()).abs().float().mean() < 1.0


def test_crop_boxes_follow_torchvision_distribution():
    """Same bounds and integer boxes as torchvision's RandomResizedCrop, and the same distribution (compared by the
    mean and spread of area and aspect ratio over 4,000 draws; on a 32x48 image many large tries do not fit)."""
    from torchvision.transforms import RandomResizedCrop

    generator = torch.Generator().manual_seed(0)
    top, left, height, width = sample_crop_boxes(4000, 32, 48, generator, (0.2, 1.0))
    assert ((top >= 0) & (left >= 0) & (top + height <= 32) & (left + width <= 48)).all()
    assert (height == height.round()).all() and (width == width.round()).all()
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 48)
    reference = torch.tensor([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
                             dtype=torch.float32)
    ref_top, ref_left, ref_height, ref_width = reference.unbind(1)
    for ours, theirs in ((height * width, ref_height * ref_width), (width / height, ref_width / ref_height),
                         (top, ref_top), (left, ref_left)):
        assert float(ours.mean()) == pytest.approx(float(theirs.mean()), rel=0.05)
        assert float(ours.std()) == pytest.approx(float(theirs.std()), rel=0.1)


def test_random_erasing_erases_about_the_given_share_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(2000, 3, 32, 32)
    boxes = sample_erasing_boxes(2000, 32, 32, 0.25, generator)
    noise = torch.ones_like(images)
    erased = random_erasing_batch(images, *boxes, noise)
    share = erased.flatten(1).amax(1)
    assert 0.2 < share.mean() < 0.3
    fraction = erased[share > 0].mean(dim=(1, 2, 3))
    assert fraction.min() >= 0.015 and fraction.max() <= 0.34  # area 2 % - 1/3 of the image


def test_load_device_images_skips_unreadable_rows_and_resizes(tmp_path):
    dataset = datasets.load_dataset("parquet", data_files=str(parquet_file(tmp_path / "d.parquet", rows=6)),
                                    split="train", cache_dir=str(tmp_path / "cache"))
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    data = load_device_images(dataset, "image", 16, "cpu", label_column="label")
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8 and data.skipped == 1
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.images[0, 2].float().mean() > data.images[0, 0].float().mean() + 80  # the first one is blue


def test_batches_are_keyed_by_seed_epoch_and_batch_and_sharded_like_accelerate():
    data = DeviceImages(random_images(40), torch.arange(40) % 4)
    single = DeviceBatches(data, batch_size=4, seed=7, mean=[0.5] * 3, std=[0.25] * 3, random_erasing=0.5)
    assert len(single) == 10
    epoch0 = list(single.iterate(0))
    rows_seen = torch.cat([b["labels"] for b in epoch0])
    assert sorted(rows_seen.tolist()) == sorted((torch.arange(40) % 4).tolist())  # every row once
    # a resumed iteration and a fresh object repeat the batches exactly; the next epoch differs
    again = DeviceBatches(data, batch_size=4, seed=7, mean=[0.5] * 3, std=[0.25] * 3, random_erasing=0.5)
    for a, b in zip(epoch0[3:], again.iterate(0, start=3)):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(single.batch(1, 0)["pixel_values"], epoch0[0]["pixel_values"])
    assert not torch.equal(DeviceBatches(data, 4, seed=8).batch(0, 0)["pixel_values"],
                           DeviceBatches(data, 4, seed=7).batch(0, 0)["pixel_values"])
    # process p of 2 takes global batches p, p + 2, ...
    shards = [DeviceBatches(data, 4, seed=7, process_index=p, num_processes=2, mean=[0.5] * 3, std=[0.25] * 3,
                            random_erasing=0.5) for p in (0, 1)]
    assert len(shards[0]) == 5
    interleaved = [shards[i % 2].batch(0, i // 2) for i in range(10)]
    for a, b in zip(epoch0, interleaved):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    uint8 = DeviceBatches(data, 4, seed=7).batch(0, 0)["pixel_values"]
    assert uint8.dtype == torch.uint8 and uint8.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="make no batch"):
        DeviceBatches(data, batch_size=32, seed=0, num_processes=2)


def test_a_batch_never_waits_for_the_device():
    data = DeviceImages(random_images(16), torch.arange(16))
    batches = DeviceBatches(data, 8, seed=0, mean=[0.5] * 3, std=[0.25] * 3, random_erasing=0.5)
    batches.order(0)
    with SynchronisationProbe() as probe:
        batches.batch(0, 1)
    assert probe.seen == []


def test_resampling_and_erasing_compile_whole():
    generator = torch.Generator().manual_seed(0)
    images = random_images(4)
    boxes = sample_crop_boxes(4, 32, 32, generator)
    flip = torch.tensor([True, False, True, False])
    compiled = torch.compile(resized_crop_batch, backend="eager", fullgraph=True)
    assert torch.equal(compiled(images, *boxes, flip, 32), resized_crop_batch(images, *boxes, flip, 32))
    erasing = sample_erasing_boxes(4, 32, 32, 1.0, generator)
    noise = torch.randn(4, 3, 32, 32, generator=generator)
    compiled = torch.compile(random_erasing_batch, backend="eager", fullgraph=True)
    pixels = images.float()
    assert torch.equal(compiled(pixels, *erasing, noise), random_erasing_batch(pixels, *erasing, noise))


# ---------------------------------------------------------------------------------------------------- the loops
@pytest.fixture
def reset_accelerate():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def pretrain(argv: list[str]):
    args, overrides = parse_arguments(argv)
    try:
        return run_pretraining(args, overrides)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.slow
def test_pretraining_on_the_device_resumes_bit_exactly(tmp_path, reset_accelerate):
    """6 steps (batch 8 of the 40 rows a slice of 9 leaves, one unreadable: 4 steps an epoch, so the resume crosses
    into epoch 1), checkpoints every 2 steps; the run resumed from step 2 ends with the same weights and losses."""
    files = parquet_file(tmp_path / "train.parquet")

    def argv(output):
        return ["--preset", "mfm-vit-tiny", "--image_size", "32", "--mask_radius", "4", "--backbone_overrides",
                BACKBONE, "--train_file", str(files), "--validation_split_size", "9", "--dataset_on_device",
                "--output_dir", str(output), "--per_device_train_batch_size", "8", "--max_train_steps", "6",
                "--warmup_steps", "1", "--base_learning_rate", "0.05", "--logging_steps", "1", "--report_to", "none",
                "--checkpointing_steps", "2", "--checkpoints_total_limit", "5", "--visualization_steps", "0",
                "--dataloader_num_workers", "0", "--cache_dir", str(tmp_path / "cache")]

    full = pretrain(argv(tmp_path / "full"))
    card = (tmp_path / "full" / "README.md").read_text()
    assert full.steps == 6 and "39 images on the device, 1 unreadable left out" in card
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "full" / "logs" / "metrics.jsonl")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)

    resumed_dir = tmp_path / "resumed"
    pretrain(argv(resumed_dir))
    for step in (4, 6):  # back to the checkpoint of step 2, as if killed then
        shutil.rmtree(resumed_dir / "checkpoints" / f"checkpoint-{step}")
    (resumed_dir / "model.safetensors").unlink()
    pretrain(argv(resumed_dir))
    records = {r["step"]: r["train/loss"] for r in read_metrics(resumed_dir / "logs" / "metrics.jsonl")}
    assert [records[step] for step in range(1, 7)] == losses
    expected, actual = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.slow
def test_finetuning_on_the_device_resumes_bit_exactly_and_refuses_randaugment(tmp_path, reset_accelerate):
    files = parquet_file(tmp_path / "train.parquet")

    def arguments(output, **extra):
        return FinetuneArguments(
            preset="mfm-vit-tiny", config_overrides=f'{{"image_size": 32, "backbone_overrides": {BACKBONE}}}',
            train_file=str(files), validation_split_size=9, output_dir=str(output), dataset_on_device=True,
            auto_augment="none", crop_pct=1.0, per_device_train_batch_size=8, per_device_eval_batch_size=16,
            num_train_epochs=2, warmup_epochs=1, dataloader_num_workers=0, logging_steps=1,
            cache_dir=str(tmp_path / "cache"),
            **extra)

    def run(args):
        try:
            return finetune(args)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    full = run(arguments(tmp_path / "full"))
    assert full["completed"] and full["global_step"] == 8 and full["history"][0]["num_samples"] == 9
    run(arguments(tmp_path / "split", stop_after_steps=3))
    resumed = run(arguments(tmp_path / "split", resume_from_checkpoint="latest"))
    assert resumed["history"] == full["history"]
    expected = load_file(tmp_path / "full" / "checkpoints" / "checkpoint-8" / "model.safetensors")
    actual = load_file(tmp_path / "split" / "checkpoints" / "checkpoint-8" / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    with pytest.raises(ValueError, match="--auto_augment none"):
        FinetuneArguments(preset="mfm-vit-tiny", train_file="x", dataset_on_device=True).resolved()


@pytest.mark.slow
def test_two_processes_on_the_device_equal_one_process_with_accumulation(tmp_path):
    """Each process takes its shard of the permutation: 2 processes x batch 4 follow 1 process x 2 micro-batches."""
    from reliability_fixtures import REPO, launch_cpu

    files = parquet_file(tmp_path / "train.parquet")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")

    def run(output, launcher, *extra):
        argv = ["--preset", "mfm-vit-tiny", "--image_size", "32", "--mask_radius", "4", "--backbone_overrides",
                BACKBONE, "--train_file", str(files), "--dataset_on_device", "--output_dir", str(output),
                "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--warmup_steps", "1",
                "--base_learning_rate", "0.05", "--logging_steps", "1", "--report_to", "none", "--visualization_steps",
                "0", "--dataloader_num_workers", "0", "--cache_dir", str(tmp_path / "cache"), *extra]
        command = launcher + [str(REPO / "run_scripts" / "run_pretrain.py"), *argv]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return {r["step"]: r["train/loss"] for r in read_metrics(output / "logs" / "metrics.jsonl")}

    two = run(tmp_path / "two", launch_cpu(2))
    one = run(tmp_path / "one", [sys.executable], "--gradient_accumulation_steps", "2")
    assert sorted(two) == [1, 2, 3] and two == pytest.approx(one, rel=1e-4)
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-5), name
