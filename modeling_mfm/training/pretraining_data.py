"""The data side of pre-training: the dataset the arguments name, its loader, and the micro-batches of a run.

`load_pretraining_data` reads the source (the embedded demo's photos, a Hub dataset, an image folder or data files;
streamed, or decoded once onto the device); `training_loader` batches it (`DeviceBatches` on the device, else a
DataLoader whose sampler shuffles per epoch); `prepare_for_training` hands model, optimizer and loader to Accelerate
as each path needs; `micro_batches` yields the micro-batches of a range of optimizer steps, pass after pass, so that a
resumed run reads exactly what the uninterrupted one would have read.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from .arguments import PretrainingArguments, is_demo_run
from .classification_data import load_classification_dataset
from .data import (
    EpochShuffleSampler,
    HFImageSource,
    PretrainingDataset,
    StreamingPretrainingDataset,
    collate_pixel_batches,
    load_image_dataset,
    prepare_stream,
    sample_photo_source,
)
from .device_dataset import DeviceBatches, DeviceImages, load_device_images
from .device_decoding import DeviceDecodeTransform, collate_encoded_batches, decode_batch
from .holdout import stratified_subset
from .representation_monitor import MonitorImages
from .transforms import DEFAULT_CROP_RATIO, PretrainTransform

__all__ = [
    "PretrainingData",
    "available_cores",
    "batch_images",
    "default_num_workers",
    "fixed_batch",
    "load_monitor_images",
    "load_pretraining_data",
    "local_processes",
    "micro_batches",
    "prepare_for_training",
    "training_loader",
]

# DataLoader workers per process by default: all the cores a process has but one (which runs the training loop), at
# most MAX_DEFAULT_WORKERS with an accelerator and at most MAX_DEFAULT_CPU_WORKERS when the CPU also runs the step
# (it needs far fewer images than one worker makes).
MAX_DEFAULT_WORKERS = 32
MAX_DEFAULT_CPU_WORKERS = 8


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes(accelerator: Any) -> int:
    """Training processes on this host."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def default_num_workers(local_processes: int, device: torch.device | str, cores: int | None = None) -> int:
    """The ``--dataloader_num_workers`` default for ``local_processes`` training processes on this host."""
    cores = available_cores() if cores is None else cores
    cap = MAX_DEFAULT_CPU_WORKERS if torch.device(device).type == "cpu" else MAX_DEFAULT_WORKERS
    return max(0, min(cap, cores // max(1, local_processes) - 1))


@dataclass
class PretrainingData:
    dataset: PretrainingDataset | StreamingPretrainingDataset | DeviceImages
    description: str  # for the logs and the model card
    num_workers: int  # DataLoader workers per process
    unlisted: list[str]  # image-folder entries that could not be listed

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, StreamingPretrainingDataset)


def _source_name(args: PretrainingArguments) -> str:
    if args.dataset_name:
        return args.dataset_name
    if args.train_dir:
        return f"image folder {os.path.basename(os.path.normpath(args.train_dir))}"
    return f"files {os.path.basename(args.train_file)}"


def load_pretraining_data(args: PretrainingArguments, config: Any, accelerator: Any) -> PretrainingData:
    """The training images the arguments name, with their random crops (see `data` and `device_dataset`)."""
    workers = args.dataloader_num_workers
    if workers is None:
        workers = default_num_workers(local_processes(accelerator), accelerator.device)
    transform = PretrainTransform(
        config.image_size, scale=(args.crop_min_scale, 1.0), ratio=DEFAULT_CROP_RATIO, jpeg_draft=args.jpeg_draft
    )
    if args.decode_on_device:
        transform = DeviceDecodeTransform(transform)
    if is_demo_run(args):
        source = sample_photo_source(short_side=4 * config.image_size)
        # enough passes over the few photos that an "epoch" spans many steps
        repeats = max(1, math.ceil(50 * args.per_device_train_batch_size / len(source)))
        dataset = PretrainingDataset(source, transform, seed=args.seed, repeats=repeats)
        return PretrainingData(dataset, f"{len(source)} photos bundled with scikit-image (random crops)", workers, [])
    source = dict(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                  train_dir=args.train_dir, split=args.train_split, image_column_name=args.image_column_name,
                  cache_dir=args.cache_dir, token=args.hub_token)
    if args.streaming:
        stream, column, unlisted = load_image_dataset(**source, streaming=True)
        if args.max_train_samples:
            stream = stream.take(args.max_train_samples)
        stream = prepare_stream(stream, args.seed, args.shuffle_buffer_size, accelerator.process_index,
                                accelerator.num_processes)
        dataset = StreamingPretrainingDataset(stream, column, transform, seed=args.seed, rank=accelerator.process_index)
        workers = min(workers, max(1, stream.num_shards))
        return PretrainingData(dataset, f"{_source_name(args)} (streamed)", workers, unlisted)
    with accelerator.main_process_first():  # the first process builds the datasets cache, the others reuse it
        rows, column, unlisted = load_image_dataset(
            **source, streaming=False, train_file=args.train_file, validation_split_size=args.validation_split_size,
            validation_split_percentage=args.validation_split_percentage,
            validation_split_seed=args.seed if args.validation_split_seed is None else args.validation_split_seed,
            label_column_name=args.label_column_name,
        )
    if args.max_train_samples:
        rows = rows.select(range(min(args.max_train_samples, len(rows))))
    if args.dataset_on_device:
        images = load_device_images(rows, column, config.image_size, accelerator.device, num_workers=workers)
        left_out = f", {images.skipped} unreadable left out" if images.skipped else ""
        return PretrainingData(images, f"{_source_name(args)} ({len(images)} images on the device{left_out})",
                               workers, unlisted)
    dataset = PretrainingDataset(HFImageSource(rows, column), transform, seed=args.seed)
    return PretrainingData(dataset, f"{_source_name(args)} ({len(dataset)} images)", workers, unlisted)


def load_monitor_images(args: PretrainingArguments, image_size: int, device: torch.device | str) -> MonitorImages:
    """The labelled images of the representation monitor, decoded onto ``device``: a stratified bank of
    ``monitor_bank_size`` training rows and ``monitor_eval_size`` rows of the held-out slice that the run leaves out
    (the same slice as fine-tuning's, `holdout`; a Hub dataset's own validation or test split where it has one)."""
    if is_demo_run(args) or args.streaming:
        raise ValueError("--monitor_steps needs labelled data that is not streamed (--dataset_name, --train_dir or "
                         "--train_file with a label column)")
    if args.validation_split_size is None and args.validation_split_percentage is None:
        raise ValueError("--monitor_steps measures on the held-out slice: give --validation_split_size or "
                         "--validation_split_percentage")
    seed = args.seed if args.validation_split_seed is None else args.validation_split_seed
    data = load_classification_dataset(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_dir=args.train_dir,
        train_split_name=args.train_split, validation_split_percentage=args.validation_split_percentage or 10.0,
        validation_split_size=args.validation_split_size, image_column_name=args.image_column_name,
        label_column_name=args.label_column_name, seed=seed, cache_dir=args.cache_dir, token=args.hub_token,
        train_file=args.train_file,
    )
    decoded = []
    for rows, size in ((data.train, args.monitor_bank_size), (data.validation, args.monitor_eval_size)):
        rows = stratified_subset(rows, data.label_column, size, seed)
        decoded.append(load_device_images(rows, data.image_column, image_size, device, label_column=data.label_column))
    bank, queries = decoded
    return MonitorImages(bank.images, bank.labels, queries.images, queries.labels, num_classes=len(data.labels))


def training_loader(args: PretrainingArguments, data: PretrainingData, accelerator: Any) -> DeviceBatches | DataLoader:
    """This process's batches: made on the device (`DeviceBatches`), or by DataLoader workers."""
    if isinstance(data.dataset, DeviceImages):
        return DeviceBatches(
            data.dataset, args.per_device_train_batch_size, args.seed, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, scale=(args.crop_min_scale, 1.0), ratio=DEFAULT_CROP_RATIO,
        )
    options: dict[str, Any] = {
        "batch_size": args.per_device_train_batch_size,
        "num_workers": data.num_workers,
        "pin_memory": accelerator.device.type == "cuda",
        "collate_fn": collate_encoded_batches if args.decode_on_device else collate_pixel_batches,
        "drop_last": True,
    }
    if data.num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=args.dataloader_prefetch_factor)
    if data.streaming:
        return DataLoader(data.dataset, **options)
    return DataLoader(data.dataset, sampler=EpochShuffleSampler(len(data.dataset), seed=args.seed), **options)


def prepare_for_training(accelerator: Any, model: Any, optimizer: Any, loader: Any) -> tuple[Any, Any, Any]:
    """``accelerator.prepare`` for each kind of loader: device batches need nothing, a stream is already split across
    processes (``split_dataset_by_node``) and only moves to the device, a DataLoader is sharded by Accelerate."""
    if isinstance(loader, DeviceBatches):
        return (*accelerator.prepare(model, optimizer), loader)
    if isinstance(loader.dataset, StreamingPretrainingDataset):
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, prepare_data_loader(
            loader, device=accelerator.device, num_processes=1, process_index=0, put_on_device=True,
            dispatch_batches=False, non_blocking=loader.pin_memory,
        )
    return accelerator.prepare(model, optimizer, loader)


def micro_batches(
    loader: Any, accelerator: Any, start_step: int, total_steps: int, steps_per_epoch: int | None, accumulation: int
) -> Iterator[tuple[dict[str, Any], bool]]:
    """The micro-batches of optimizer steps ``start_step`` to ``total_steps``, each with whether it ends a pass over
    the data (``steps_per_epoch`` whole steps; None: a stream, one endless pass). What the first ``start_step`` steps
    read is skipped, so a resumed run reads what the uninterrupted one would."""
    left = (total_steps - start_step) * accumulation
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch) if steps_per_epoch else (0, start_step)
    while left > 0:
        done = step_in_epoch * accumulation
        if isinstance(loader, DeviceBatches):
            batches = loader.iterate(epoch, start=done)
        else:
            if steps_per_epoch:
                loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, done) if done else loader
        in_pass = steps_per_epoch * accumulation - done if steps_per_epoch else math.inf
        count = 0
        for count, batch in enumerate(itertools.islice(batches, min(in_pass, left)), start=1):
            yield batch, count == in_pass
        if steps_per_epoch is None and count < left:
            raise RuntimeError("the data stream ended before --max_train_steps; is the dataset empty?")
        left -= count
        epoch, step_in_epoch = epoch + 1, 0


def batch_images(batch: dict[str, Any], image_size: int, device: torch.device, decode_on_device: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's uint8 images on the device and its count of skipped images (with ``--decode_on_device`` its JPEGs
    are decoded here, and one that fails counts as skipped)."""
    if not decode_on_device:
        return batch["pixel_values"], batch["skipped"]
    images, undecodable = decode_batch(batch, image_size, device)
    return images, batch["skipped"] + undecodable


def fixed_batch(data: PretrainingData, image_size: int, count: int, decode_on_device: bool) -> torch.Tensor:
    """The first ``count`` samples of epoch 0, the same at every step and after a resume (for the pictures)."""
    if isinstance(data.dataset, DeviceImages):  # the first stored images, whole
        return data.dataset.images[:count].cpu()
    if data.streaming:
        images = [sample["pixel_values"] for sample in itertools.islice(data.dataset, count)]
    else:
        images = [data.dataset[(0, i)]["pixel_values"] for i in range(min(count, len(data.dataset)))]
    if decode_on_device:  # the pictures' few images are decoded on the CPU, once
        batch = collate_encoded_batches([{"pixel_values": image, "skipped": 0} for image in images])
        return decode_batch(batch, image_size, "cpu")[0]
    return torch.stack(images)
