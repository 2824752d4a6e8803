"""The MFM pre-training run: set-up from the arguments, the Accelerate training loop, and the final outputs.

`run_pretraining(args, config_overrides)` is what ``run_scripts/run_pretrain.py`` calls. Accelerate owns the
runtime (devices, processes, mixed precision, gradient accumulation, trackers, checkpoint state); this module wires
the parts of `modeling_mfm.training` together:

* set-up errors (bad arguments, missing data, unknown preset...) raise `PretrainingArgumentError` before training;
* the loop never waits for the device except every ``logging_steps`` steps and at checkpoints: losses, grad norms,
  skipped-image counts and the non-finite watch are accumulated on the device;
* every micro-batch's forward runs under a seed derived from its global index (`randomness`), and samples are
  augmented from (seed, epoch, index) (`data`), so a resumed run repeats the uninterrupted one and N processes
  match one process with N accumulation steps;
* a non-finite loss stops the run with `NonFiniteLossError` before the next checkpoint could store broken weights
  (`step_statistics`);
* the output folder belongs to this run (`run_folder`: a lock, the resume rule, the settings check), and the lr is a
  function of the step (`schedules`), so a checkpoint holds no pickled object.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    TorchDynamoPlugin,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..conversion.hub import check_repo_id, publish_folder
from ..conversion.model_card import render_model_card
from .arguments import (
    DEMO_MODEL_OVERRIDES,
    OFFICIAL_DEFAULTS,
    PretrainingArguments,
    is_demo_run,
    parse_backbone_overrides,
    resolve_defaults,
)
from .checkpointing import save_checkpoint
from .cli import ScriptError
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
from .disk_faults import write_faults
from .model_factory import (
    build_config,
    build_model,
    cudnn_autotuning,
    enable_activation_checkpointing,
    keep_residual_stream_in_bf16,
    preferred_memory_format,
)
from .monitoring import describe_hardware, peak_memory_bytes, precision_in_effect
from .optim import build_optimizer, scale_learning_rate
from .randomness import derive_seed, global_micro_batch_index, seeded_device_rng
from .run_folder import (
    check_settings,
    claim_output_dir,
    config_settings,
    describe_settings_changes,
    find_resume_checkpoint,
    trajectory_settings,
)
from .schedules import LearningRateSchedule
from .step_statistics import NonFiniteLossError, StepStatistics
from .trackers import JSONLinesTracker
from .transforms import DEFAULT_CROP_RATIO, PretrainTransform, normalize_on_device
from .visualization import predict_fixed_batch, reconstruction_grid, save_png

__all__ = [
    "NonFiniteLossError",
    "PretrainingArgumentError",
    "PretrainingResult",
    "default_num_workers",
    "dynamo_plugin",
    "run_pretraining",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
LOGS_FOLDER = "logs"
METRICS_FILE = "metrics.jsonl"
PICTURES_FOLDER = "reconstructions"
FINAL_PICTURE = "reconstruction.png"
OFFICIAL_EPOCHS, OFFICIAL_WARMUP_EPOCHS = OFFICIAL_DEFAULTS["num_train_epochs"], OFFICIAL_DEFAULTS["warmup_epochs"]
MODEL_SEED_TAG = 1  # randomness domains: 0 = data (see data.py), 1 = the model's corruption draws

# Arguments that change how a run is carried out, logged or saved, but not its trajectory; and arguments compared
# through what they determine (the model configuration, the total batch, the schedule). Every other argument is
# part of the settings a resume must keep (see run_folder).
RUN_ONLY_ARGUMENTS = frozenset({
    "output_dir", "logging_steps", "checkpointing_steps", "save_every_epoch", "checkpoints_total_limit",
    "resume_from_checkpoint", "overwrite_output_dir", "allow_changed_settings", "visualization_steps",
    "num_visualization_images", "report_to", "project_name", "push_to_hub", "hub_model_id", "hub_token",
    "hub_private_repo", "hub_local_dir", "dataloader_num_workers", "dataloader_prefetch_factor", "cache_dir",
    "cpu_threads", "torch_compile", "torch_compile_backend", "torch_compile_mode", "gradient_checkpointing",
    "cudnn_benchmark", "max_nonfinite_retries",
    "model", "config_file", "backbone_overrides", "per_device_train_batch_size", "gradient_accumulation_steps",
    "num_train_epochs", "max_train_steps", "warmup_epochs", "warmup_steps", "warmup_ratio", "base_learning_rate",
    "warmup_lr", "min_lr", "mixed_precision",
})


class PretrainingArgumentError(ScriptError):
    """The run cannot start: an argument, the data or the model configuration is invalid (exit code 2)."""


@dataclass
class PretrainingResult:
    output_dir: str
    steps: int
    final_loss: float | None
    skipped_images: int
    train_seconds: float
    picture: str | None
    pushed_to: str | None


@dataclass
class _Setup:
    """Everything `run_pretraining` builds before the loop."""

    args: PretrainingArguments
    config: Any
    demo: bool
    data_description: str
    dataset: Any
    streaming: bool
    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    total_batch_size: int
    peak_lr: float
    num_workers: int
    schedule: LearningRateSchedule
    unlisted: list[str]  # image-folder entries that could not be listed


# ---------------------------------------------------------------------------------------------------- set-up
def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# DataLoader workers per process by default: all the cores a process has but one (which runs the training loop), at
# most MAX_DEFAULT_WORKERS with an accelerator (enough PIL workers for the fastest step) and at most
# MAX_DEFAULT_CPU_WORKERS when the CPU also runs the step (it needs far fewer images than one worker makes).
MAX_DEFAULT_WORKERS = 32
MAX_DEFAULT_CPU_WORKERS = 8


def default_num_workers(local_processes: int, device: torch.device | str, cores: int | None = None) -> int:
    """The ``--dataloader_num_workers`` default for ``local_processes`` training processes on this host."""
    cores = _available_cores() if cores is None else cores
    cap = MAX_DEFAULT_CPU_WORKERS if torch.device(device).type == "cpu" else MAX_DEFAULT_WORKERS
    return max(0, min(cap, cores // max(1, local_processes) - 1))


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate_arguments(args: PretrainingArguments) -> None:
    sources = [f"--{name}" for name in ("dataset_name", "train_dir", "train_file") if getattr(args, name)]
    if len(sources) > 1:
        raise ValueError(f"give one data source, not {' and '.join(sources)}")
    if args.streaming and (is_demo_run(args) or args.train_file):
        raise ValueError("--streaming needs --dataset_name or --train_dir")
    if args.dataset_on_device and (is_demo_run(args) or args.streaming or args.decode_on_device):
        raise ValueError("--dataset_on_device needs a dataset that is not streamed (--dataset_name, --train_dir or "
                         "--train_file) and replaces --decode_on_device")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (a stream has no known length)")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps",
                 "base_learning_rate", "logging_steps", "num_visualization_images", "max_train_samples",
                 "dataloader_prefetch_factor", "checkpoints_total_limit"):
        _check_positive(name, getattr(args, name))
    if args.warmup_ratio is not None and not 0.0 <= args.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {args.warmup_ratio}")
    for name in ("warmup_steps", "warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "max_grad_norm",
                 "checkpointing_steps", "visualization_steps", "dataloader_num_workers", "shuffle_buffer_size",
                 "max_nonfinite_retries", "adam_epsilon", "cpu_threads"):
        _check_positive(name, getattr(args, name), allow_zero=True)
    if not 0.0 < args.crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {args.crop_min_scale}")
    if args.push_to_hub:
        check_repo_id(args.hub_model_id)
    if args.report_to == "wandb" and not is_wandb_available():
        raise ValueError("--report_to wandb needs the wandb package (pip install wandb)")
    if args.report_to == "tensorboard" and not is_tensorboard_available():
        raise ValueError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)")


def _build_dataset(args: PretrainingArguments, config: Any, accelerator: Accelerator, demo: bool):
    """-> (dataset, description, streaming, entries of an image folder that could not be listed)."""
    transform = PretrainTransform(
        config.image_size, scale=(args.crop_min_scale, 1.0), ratio=DEFAULT_CROP_RATIO, jpeg_draft=args.jpeg_draft
    )
    if args.decode_on_device:
        transform = DeviceDecodeTransform(transform)
    if demo:
        source = sample_photo_source(short_side=4 * config.image_size)
        # enough passes over the few photos that an "epoch" spans many steps
        repeats = max(1, math.ceil(50 * args.per_device_train_batch_size / len(source)))
        dataset = PretrainingDataset(source, transform, seed=args.seed, repeats=repeats)
        return dataset, f"{len(source)} photos bundled with scikit-image (random crops)", False, []
    if args.dataset_name:
        description = args.dataset_name
    elif args.train_dir:
        description = f"image folder {os.path.basename(os.path.normpath(args.train_dir))}"
    else:
        description = f"files {os.path.basename(args.train_file)}"
    if args.streaming:
        stream, column, unlisted = load_image_dataset(
            args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split, args.image_column_name,
            streaming=True, cache_dir=args.cache_dir, token=args.hub_token,
        )
        if args.max_train_samples:
            stream = stream.take(args.max_train_samples)
        stream = prepare_stream(stream, args.seed, args.shuffle_buffer_size, accelerator.process_index,
                                accelerator.num_processes)
        dataset = StreamingPretrainingDataset(stream, column, transform, seed=args.seed, rank=accelerator.process_index)
        return dataset, f"{description} (streamed)", True, unlisted
    with accelerator.main_process_first():  # the first process builds the datasets cache, the others reuse it
        hf_dataset, column, unlisted = load_image_dataset(
            args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split, args.image_column_name,
            streaming=False, cache_dir=args.cache_dir, token=args.hub_token, train_file=args.train_file,
            validation_split_size=args.validation_split_size,
            validation_split_percentage=args.validation_split_percentage,
            validation_split_seed=args.seed if args.validation_split_seed is None else args.validation_split_seed,
            label_column_name=args.label_column_name,
        )
    if args.max_train_samples:
        hf_dataset = hf_dataset.select(range(min(args.max_train_samples, len(hf_dataset))))
    if args.dataset_on_device:
        workers = args.dataloader_num_workers
        if workers is None:
            workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
                                          accelerator.device)
        images = load_device_images(hf_dataset, column, config.image_size, accelerator.device, num_workers=workers)
        left_out = f", {images.skipped} unreadable left out" if images.skipped else ""
        return images, f"{description} ({len(images)} images on the device{left_out})", False, unlisted
    dataset = PretrainingDataset(HFImageSource(hf_dataset, column), transform, seed=args.seed)
    return dataset, f"{description} ({len(dataset)} images)", False, unlisted


def _setup(args: PretrainingArguments, overrides: dict[str, Any], accelerator: Accelerator) -> _Setup:
    demo = is_demo_run(args)
    backbone_overrides = parse_backbone_overrides(args.backbone_overrides)
    if demo and args.model == "mfm-vit-tiny" and not args.config_file and not args.model_name_or_path:
        demo_backbone = DEMO_MODEL_OVERRIDES["backbone_overrides"]
        overrides = {**{k: v for k, v in DEMO_MODEL_OVERRIDES.items() if k != "backbone_overrides"}, **overrides}
        backbone_overrides = {**demo_backbone, **backbone_overrides}
    config = build_config(args.model, args.config_file, args.model_name_or_path, overrides, backbone_overrides)
    if config.image_size != 224 and "mask_radius" not in overrides and config.mask_radius == 16:
        logger.warning(
            "mask_radius 16 is tuned for 224x224 inputs; at %d px the same ratio is --mask_radius %.1f",
            config.image_size, 16 * config.image_size / 224,
        )
    if args.bf16_residual_stream and not config.is_vit:
        raise ValueError(
            f"--bf16_residual_stream is for ViT encoders (beit, vit), not {config.backbone_config.model_type}"
        )
    if args.bf16_residual_stream and accelerator.mixed_precision != "bf16":
        raise ValueError(
            f"--bf16_residual_stream needs --mixed_precision bf16 (this run: {accelerator.mixed_precision})"
        )
    dataset, description, streaming, unlisted = _build_dataset(args, config, accelerator, demo)

    processes = accelerator.num_processes
    total_batch = args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
    steps_per_epoch = None
    if not streaming:
        steps_per_epoch = len(dataset) // (args.per_device_train_batch_size * processes) // (
            args.gradient_accumulation_steps
        )
        if steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(dataset)} images, fewer than one optimizer step needs (per-device batch "
                f"{args.per_device_train_batch_size} x {processes} processes x {args.gradient_accumulation_steps} "
                f"accumulation steps = {total_batch})"
            )
    if args.max_train_steps is not None:
        total_steps = args.max_train_steps
    else:
        total_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    if args.warmup_steps is not None:
        warmup_steps = args.warmup_steps
    elif args.warmup_ratio is not None:
        warmup_steps = round(args.warmup_ratio * total_steps)
    elif args.max_train_steps is not None or steps_per_epoch is None:
        warmup_steps = round(total_steps * OFFICIAL_WARMUP_EPOCHS / OFFICIAL_EPOCHS)
        if args.warmup_epochs is not None and args.num_train_epochs is not None:
            warmup_steps = round(total_steps * args.warmup_epochs / args.num_train_epochs)
    else:
        warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed the training steps ({total_steps})")
    num_workers = args.dataloader_num_workers
    if num_workers is None:
        num_workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", processes)), accelerator.device)
    if streaming:
        num_workers = min(num_workers, max(1, dataset.dataset.num_shards))
    peak_lr = scale_learning_rate(args.base_learning_rate, total_batch)
    schedule = LearningRateSchedule(
        peak_lr, total_steps, warmup_steps, warmup_lr=scale_learning_rate(args.warmup_lr, total_batch),
        min_lr=scale_learning_rate(args.min_lr, total_batch),
    )
    return _Setup(
        args=args,
        config=config,
        demo=demo,
        data_description=description,
        dataset=dataset,
        streaming=streaming,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        total_batch_size=total_batch,
        peak_lr=peak_lr,
        num_workers=num_workers,
        schedule=schedule,
        unlisted=unlisted,
    )


def _trajectory_settings(setup: _Setup, precision: str) -> dict[str, Any]:
    """What a resume must keep: see `RUN_ONLY_ARGUMENTS`."""
    return trajectory_settings(
        setup.args, RUN_ONLY_ARGUMENTS, total_batch_size=setup.total_batch_size, mixed_precision=precision,
        schedule=dataclasses.asdict(setup.schedule), model=config_settings(setup.config),
    )


def _make_dataloader(setup: _Setup, pin_memory: bool) -> DataLoader:
    args = setup.args
    workers = setup.num_workers
    kwargs: dict[str, Any] = {
        "batch_size": args.per_device_train_batch_size,
        "num_workers": workers,
        "pin_memory": pin_memory,
        "collate_fn": collate_encoded_batches if args.decode_on_device else collate_pixel_batches,
        "drop_last": True,
    }
    if workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
    if setup.streaming:
        return DataLoader(setup.dataset, **kwargs)
    sampler = EpochShuffleSampler(len(setup.dataset), seed=args.seed, shuffle=True)
    return DataLoader(setup.dataset, sampler=sampler, **kwargs)


def _fixed_batch(setup: _Setup, count: int) -> torch.Tensor:
    """The first ``count`` samples of epoch 0 (the same at every step and after a resume)."""
    if isinstance(setup.dataset, DeviceImages):  # the first stored images, whole
        return setup.dataset.images[:count].cpu()
    if setup.streaming:
        images = []
        for sample in setup.dataset:
            images.append(sample["pixel_values"])
            if len(images) == count:
                break
    else:
        images = [setup.dataset[(0, i)]["pixel_values"] for i in range(min(count, len(setup.dataset)))]
    if setup.args.decode_on_device:  # the pictures' few images are decoded on the CPU, once
        batch = collate_encoded_batches([{"pixel_values": image, "skipped": 0} for image in images])
        return decode_batch(batch, setup.config.image_size, "cpu")[0]
    return torch.stack(images)


def _trackers(args: PretrainingArguments, logging_dir: str) -> list:
    trackers: list = [JSONLinesTracker(os.path.join(logging_dir, METRICS_FILE))]
    if args.report_to in ("tensorboard", "all") and is_tensorboard_available():
        trackers.append("tensorboard")
    if args.report_to in ("wandb", "all") and is_wandb_available():
        trackers.append("wandb")
    return trackers


def _hyperparameters(setup: _Setup, accelerator: Accelerator) -> dict[str, Any]:
    values = {k: v for k, v in dataclasses.asdict(setup.args).items() if k != "hub_token"}
    values.update(
        total_batch_size=setup.total_batch_size, peak_lr=setup.peak_lr, total_steps=setup.total_steps,
        warmup_steps=setup.warmup_steps, num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, data=setup.data_description,
    )
    # trackers take scalars and strings only
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------- the run
def dynamo_plugin(args: PretrainingArguments) -> TorchDynamoPlugin | None:
    """Accelerate's torch.compile settings for ``--torch_compile`` (backend and mode), None without it."""
    if not args.torch_compile:
        return None
    return TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)


def run_pretraining(args: PretrainingArguments, config_overrides: dict[str, Any] | None = None) -> PretrainingResult:
    """Pre-trains an MFMForPreTraining as the arguments say and writes the model, its card and pictures."""
    args = resolve_defaults(args)
    try:
        _validate_arguments(args)
    except ValueError as error:
        raise PretrainingArgumentError(str(error)) from error
    logging_dir = os.path.join(args.output_dir, LOGS_FOLDER)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args, logging_dir),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # batches come from pinned memory on CUDA: copy them to the device without blocking
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_plugin=dynamo_plugin(args),
    )
    if accelerator.device.type == "cpu" and args.cpu_threads is not None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = args.cpu_threads or max(1, _available_cores() // local_processes)
        torch.set_num_threads(threads)
        accelerator.print(f"training on the CPU with {threads} thread(s) per process")
    try:
        try:
            precision_in_effect(accelerator)
            lock = claim_output_dir(args.output_dir, accelerator)  # before anything is written there
        except ValueError as error:
            raise PretrainingArgumentError(str(error)) from error
        with lock, cudnn_autotuning(args.cudnn_benchmark, accelerator.device):
            run = _PretrainingRun(args, config_overrides or {}, accelerator)
            run.train()
            return run.write_outputs()
    finally:
        accelerator.end_training()


class _PretrainingRun:
    """One invocation: set-up (the constructor), the loop (`train`) and the outputs (`write_outputs`)."""

    def __init__(self, args: PretrainingArguments, overrides: dict[str, Any], accelerator: Accelerator) -> None:
        self.args = args
        self.accelerator = accelerator
        self.checkpoint_root = os.path.join(args.output_dir, CHECKPOINTS_FOLDER)
        # anything wrong here is the user's input, reported without a traceback by the script
        self.precision = precision_in_effect(accelerator)
        try:
            self.setup = _setup(args, overrides, accelerator)
            self.settings = _trajectory_settings(self.setup, self.precision)
            checkpoint, trainer_state = find_resume_checkpoint(
                args.resume_from_checkpoint, args.output_dir, accelerator, args.overwrite_output_dir,
                CHECKPOINTS_FOLDER, LOGS_FOLDER,
            )
            self.settings_changes: list[dict[str, Any]] = []
            if checkpoint is not None:
                self.settings_changes = list(trainer_state.get("settings_changes", []))
                changes = check_settings(checkpoint, trainer_state, self.settings, args.allow_changed_settings)
                if changes:
                    self.settings_changes.append({"step": int(trainer_state["step"]), "changes": changes})
        except (ValueError, OSError) as error:  # OSError: a model or dataset that cannot be found or read
            raise PretrainingArgumentError(str(error)) from error
        self._prepare()
        self.completed_steps, self.skipped_total = 0, 0
        self.last_checkpoint = checkpoint
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            self.completed_steps = int(trainer_state["step"])
            self.skipped_total = int(trainer_state.get("skipped_images", 0))
            accelerator.print(f"resumed from {checkpoint} at step {self.completed_steps}")
        self.setup.schedule.apply(self.optimizer, self.completed_steps)
        self.steps_at_start = self.completed_steps
        self.last_loss: float | None = None
        self.train_seconds = 0.0
        accelerator.init_trackers(args.project_name, config=_hyperparameters(self.setup, accelerator))
        # FSDP forwards need every process; otherwise the main process draws the pictures alone
        self.use_fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.fixed_images = None
        if accelerator.is_main_process or self.use_fsdp:
            self.fixed_images = _fixed_batch(self.setup, args.num_visualization_images)
        self.picture: str | None = None

    # ---- set-up
    def _prepare(self) -> None:
        args, setup, accelerator = self.args, self.setup, self.accelerator
        device = accelerator.device
        set_seed(args.seed)  # identical initialisation on every process
        model = build_model(setup.config, args.model_name_or_path, fast_paths=args.fast_paths)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if args.bf16_residual_stream:
            keep_residual_stream_in_bf16(model)
        model.to(device, memory_format=preferred_memory_format(setup.config, device))
        optimizer = build_optimizer(
            model, setup.peak_lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        pin_memory = device.type == "cuda"
        if args.dataset_on_device:  # batches are made on the device: nothing for Accelerate to shard or move
            dataloader = DeviceBatches(
                setup.dataset, args.per_device_train_batch_size, args.seed, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, scale=(args.crop_min_scale, 1.0), ratio=DEFAULT_CROP_RATIO,
            )
            model, optimizer = accelerator.prepare(model, optimizer)
        elif setup.streaming:
            dataloader = _make_dataloader(setup, pin_memory)
            # already split across processes by split_dataset_by_node: only move batches to the device
            model, optimizer = accelerator.prepare(model, optimizer)
            dataloader = prepare_data_loader(
                dataloader, device=device, num_processes=1, process_index=0, put_on_device=True,
                dispatch_batches=False, non_blocking=pin_memory,
            )
        else:
            dataloader = _make_dataloader(setup, pin_memory)
            model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
        self.model, self.optimizer, self.dataloader = model, optimizer, dataloader

    # ---- pictures, logs, checkpoints
    def visualize(self, step: int) -> None:
        """Saves (and logs to the trackers) the reconstruction picture of the fixed batch at ``step``."""
        accelerator = self.accelerator
        if self.fixed_images is None:
            return
        model = self.model if self.use_fsdp else accelerator.unwrap_model(self.model, keep_torch_compile=False)
        prediction = predict_fixed_batch(model, self.fixed_images, seed=self.args.seed)
        if not accelerator.is_main_process:
            return
        picture = reconstruction_grid(
            prediction["original"], prediction["corrupted"], prediction["reconstruction"],
            prediction["frequency_mask"], prediction["row_labels"],
            title=f"step {step} - loss on this batch {prediction['loss']:.4f}",
        )
        self.picture = os.path.join(self.args.output_dir, FINAL_PICTURE)
        with write_faults(self.args.output_dir, "the reconstruction pictures"):
            save_png(picture, os.path.join(self.args.output_dir, PICTURES_FOLDER, f"step-{step:07d}.png"))
            save_png(picture, self.picture)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"reconstruction": picture[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"reconstruction": [picture]}, step=step)

    def log(self, statistics: StepStatistics, lr: float, window_seconds: float, window_steps: int) -> None:
        statistics.check_finite(self.accelerator, self.last_checkpoint)
        values = statistics.collect(self.accelerator)
        self.skipped_total += values["skipped"]
        self.last_loss = values["loss"]
        setup, step = self.setup, self.completed_steps
        metrics = {
            "loss": values["loss"],
            "lr": lr,
            "grad_norm": values["grad_norm"],
            "img_per_s": window_steps * setup.total_batch_size / max(window_seconds, 1e-9),
            "peak_memory_mib": peak_memory_bytes(self.accelerator.device) / 2**20,
            "skipped_images": self.skipped_total,
            "epoch": step / setup.steps_per_epoch if setup.steps_per_epoch else 0.0,
        }
        self.accelerator.log(metrics, step=step)
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{metrics['img_per_s']:.1f}")

    def checkpoint(self, statistics: StepStatistics) -> None:
        statistics.check_finite(self.accelerator, self.last_checkpoint)  # never store weights a NaN has reached
        state = {
            "skipped_images": self.skipped_total + statistics.pending_skipped(self.accelerator),
            "settings": self.settings,
            "settings_changes": self.settings_changes,
        }
        self.last_checkpoint = save_checkpoint(
            self.accelerator, self.checkpoint_root, self.completed_steps, state, keep=self.args.checkpoints_total_limit
        )

    # ---- the loop
    def _epoch_loader(self, epoch: int) -> tuple[Any, int]:
        """The loader of this pass over the data (skipping what a resumed run already consumed) and its number of
        optimizer steps."""
        setup, accumulation = self.setup, self.args.gradient_accumulation_steps
        if setup.streaming:
            done = self.completed_steps * accumulation
            loader = self.accelerator.skip_first_batches(self.dataloader, done) if done else self.dataloader
            return loader, setup.total_steps - self.completed_steps
        step_in_epoch = self.completed_steps - epoch * setup.steps_per_epoch
        steps = min(setup.steps_per_epoch - step_in_epoch, setup.total_steps - self.completed_steps)
        done = step_in_epoch * accumulation
        if self.args.dataset_on_device:
            return self.dataloader.iterate(epoch, start=done), steps
        self.dataloader.set_epoch(epoch)
        loader = self.accelerator.skip_first_batches(self.dataloader, done) if done else self.dataloader
        return loader, steps

    def train(self) -> None:
        args, setup, accelerator = self.args, self.setup, self.accelerator
        model, optimizer, schedule = self.model, self.optimizer, setup.schedule
        device = accelerator.device
        accumulation = args.gradient_accumulation_steps
        config = setup.config
        mean = torch.tensor(config.image_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(config.image_std, device=device).view(1, -1, 1, 1)
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        patience = args.max_nonfinite_retries
        if patience is None:
            patience = 20 if accelerator.mixed_precision == "fp16" else 0
        statistics = StepStatistics(device, patience)
        self.progress = tqdm(total=setup.total_steps, initial=self.completed_steps, desc="pre-training",
                             disable=not accelerator.is_local_main_process)
        if self.completed_steps == 0:
            self.visualize(0)
        model.train()
        start = window_start = time.perf_counter()
        window_steps, lr = 0, optimizer.param_groups[0]["lr"]
        epoch = self.completed_steps // setup.steps_per_epoch if setup.steps_per_epoch else 0
        try:
            while self.completed_steps < setup.total_steps:
                loader, steps_this_pass = self._epoch_loader(epoch)
                micro_batches = 0
                for batch in loader:
                    # the forward's random draws (masks, degradations) depend on the global micro-batch index only
                    batch_seed = derive_seed(args.seed, MODEL_SEED_TAG, global_micro_batch_index(
                        self.completed_steps, micro_batches % accumulation, accumulation,
                        accelerator.process_index, accelerator.num_processes,
                    ))
                    micro_batches += 1
                    with accelerator.accumulate(model):
                        if args.decode_on_device:
                            images, undecodable = decode_batch(batch, config.image_size, device)
                            batch["skipped"] = batch["skipped"] + undecodable
                        else:
                            images = batch["pixel_values"]
                        pixel_values = normalize_on_device(images, mean, std)
                        with seeded_device_rng(device, batch_seed):
                            loss = model(pixel_values=pixel_values, return_dict=True).loss
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            statistics.add_grad_norm(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    statistics.add_micro_batch(loss, batch["skipped"], self.completed_steps)
                    if not accelerator.sync_gradients:
                        continue
                    lr = optimizer.param_groups[0]["lr"]  # the lr this step used
                    self.completed_steps += 1
                    schedule.apply(optimizer, self.completed_steps)
                    window_steps += 1
                    self.progress.update(1)
                    step = self.completed_steps
                    last_step = step >= setup.total_steps
                    end_of_pass = micro_batches >= steps_this_pass * accumulation
                    if step % args.logging_steps == 0 or last_step:
                        self.log(statistics, lr, time.perf_counter() - window_start, window_steps)
                        window_start, window_steps = time.perf_counter(), 0
                    if args.visualization_steps and step % args.visualization_steps == 0 and not last_step:
                        self.visualize(step)
                    if last_step or (args.checkpointing_steps and step % args.checkpointing_steps == 0) or (
                        args.save_every_epoch and end_of_pass and not setup.streaming
                    ):
                        self.checkpoint(statistics)
                    if end_of_pass:
                        break
                else:
                    if setup.streaming:
                        raise RuntimeError("the data stream ended before --max_train_steps; is the dataset empty?")
                epoch += 1
        finally:
            self.progress.close()  # before any error message, so that it starts on a line of its own
        self.train_seconds = time.perf_counter() - start
        statistics.check_finite(accelerator, self.last_checkpoint)

    # ---- outputs
    def write_outputs(self) -> PretrainingResult:
        """The final model (save_pretrained, with its image processor), the picture, the model card and the push."""
        args, accelerator = self.args, self.accelerator
        accelerator.wait_for_everyone()
        if self.completed_steps > 0:
            self.visualize(self.completed_steps)
        unwrapped = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # a compiled model's state dict names its weights "_orig_mod.<name>": save them under their own names
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(self.model).items()}
        with write_faults(args.output_dir, "the final model"):
            unwrapped.save_pretrained(
                args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                state_dict=state_dict,
            )
        pushed = None
        if accelerator.is_main_process:
            if self.skipped_total:
                logger.warning("skipped %d unreadable images in total", self.skipped_total)
            if self.setup.unlisted:
                logger.warning("%d entries of the image folder could not be listed (see the warning at the start)",
                               len(self.setup.unlisted))
            card = render_model_card(
                args.hub_model_id or f"local/{os.path.basename(os.path.normpath(args.output_dir))}",
                unwrapped.config,
                task="pretraining",
                datasets=[args.dataset_name] if args.dataset_name else None,
                training_details=self._training_details(),
                images=[FINAL_PICTURE] if self.picture else None,
            )
            with write_faults(args.output_dir, "the model card"), open(
                os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8"
            ) as f:
                f.write(card)
            if args.push_to_hub:
                pushed = publish_folder(
                    args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                    commit_message=f"MFM pre-training, step {self.completed_steps}", local_dir=args.hub_local_dir,
                )
        accelerator.wait_for_everyone()
        if self.completed_steps == self.steps_at_start:
            accelerator.print(f"training was already complete at step {self.completed_steps}; outputs re-written")
        return PretrainingResult(
            output_dir=args.output_dir,
            steps=self.completed_steps,
            final_loss=self.last_loss,
            skipped_images=self.skipped_total,
            train_seconds=self.train_seconds,
            picture=self.picture,
            pushed_to=pushed,
        )

    def _training_details(self) -> dict[str, Any]:
        args, setup, accelerator = self.args, self.setup, self.accelerator
        steps = self.completed_steps
        details: dict[str, Any] = {
            "data": setup.data_description,
            "pretext": setup.config.corruption,
            "image size": setup.config.image_size,
            "optimizer steps": steps,
            "epochs": round(steps / setup.steps_per_epoch, 2) if setup.steps_per_epoch else "n/a (streamed)",
            "total batch size": setup.total_batch_size,
            "peak learning rate": setup.peak_lr,
            "schedule": f"linear warmup {setup.warmup_steps} steps, then cosine to {args.min_lr:g} x batch / 512",
            "optimizer": f"AdamW betas ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
            "gradient clipping": args.max_grad_norm,
            "mixed precision": self.precision,
            "final loss": round(self.last_loss, 5) if self.last_loss is not None else "n/a",
            "hardware": describe_hardware(accelerator.device, accelerator.num_processes),
            "training time (this invocation)": f"{self.train_seconds / 60:.1f} min",
            "skipped images": self.skipped_total,
        }
        if setup.unlisted:
            details["folder entries that could not be listed"] = len(setup.unlisted)
        if self.settings_changes:
            details["settings changed on resume (--allow_changed_settings)"] = describe_settings_changes(
                self.settings_changes
            )
        return details
