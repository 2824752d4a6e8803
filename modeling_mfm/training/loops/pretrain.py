"""MFM pre-training with Accelerate, told top to bottom in `run_pretraining` (what ``run_scripts/run_pretrain.py``
calls); the parts live in `data.pretraining_data`, `models.model_factory`, `optim.optimizer`, `optim.schedules` and
`evaluation.visualization`.

The guarantees of docs/reliability.md, and where they come from:

* set-up errors (bad arguments, missing data, a folder in use, a resume that would change the run...) raise
  `PretrainingArgumentError` before training;
* the step never waits for the device: losses, grad norms, skipped-image counts and the non-finite watch stay on the
  device until a log step or a checkpoint (`run.step_statistics`); a non-finite loss stops the run with
  `NonFiniteLossError` before a checkpoint could store broken weights;
* every micro-batch's forward runs under a seed derived from its global index (`run.randomness`) and samples are
  augmented from (seed, epoch, index), so a resumed run repeats the uninterrupted one and N processes match one
  process with N accumulation steps;
* the output folder belongs to the run (`run.run_folder`) and the lr is a function of the step (`optim.schedules`), so a
  checkpoint holds no pickled object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm

from ...cli import ScriptError
from ...configuration_mfm import OFFICIAL_IMAGE_SIZE, OFFICIAL_MASK_RADIUS, official_mask_radius
from ...publishing.folder_layout import (
    CHECKPOINTS_FOLDER,
    LOGS_FOLDER,
    MODEL_CARD_FILE,
    PICTURES_FOLDER,
    RECONSTRUCTION_PICTURE,
)
from ...publishing.hub import check_repo_id, publish_folder
from ...publishing.model_card import render_model_card
from ..data.pretraining_data import (
    PretrainingData,
    available_cores,
    batch_images,
    fixed_batch,
    load_monitor_images,
    load_pretraining_data,
    local_processes,
    micro_batches,
    prepare_for_training,
    training_loader,
)
from ..data.transforms import normalize_on_device
from ..evaluation.representation_monitor import RepresentationMonitor, describe_measurement, summarize_measurements
from ..evaluation.visualization import reconstruction_picture, save_png
from ..models.model_factory import (
    build_config,
    build_model,
    cudnn_autotuning,
    enable_activation_checkpointing,
    preferred_memory_format,
)
from ..optim.optimizer import build_optimizer, describe_clipping, scale_learning_rate
from ..optim.schedules import LearningRateSchedule
from ..run.checkpointing import TrainerState, save_checkpoint
from ..run.disk_faults import WriteFailedError, write_faults
from ..run.monitoring import describe_hardware, peak_memory_bytes
from ..run.randomness import derive_seed, global_micro_batch_index, seeded_device_rng
from ..run.run_folder import (
    config_settings,
    describe_settings_changes,
    hold_output_dir,
    resume_run,
    trajectory_settings,
)
from ..run.step_statistics import NonFiniteLossError, StepStatistics
from ..run.trackers import METRICS_FILE, build_trackers, check_report_to, read_metrics, start_trackers
from .pretraining_arguments import (
    DEMO_MODEL_OVERRIDES,
    OFFICIAL_DEFAULTS,
    PretrainingArguments,
    is_demo_run,
    parse_backbone_overrides,
    parse_config_overrides,
    resolve_defaults,
)

__all__ = [
    "NonFiniteLossError",
    "PretrainingArgumentError",
    "PretrainingResult",
    "dynamo_plugin",
    "run_pretraining",
]

logger = logging.getLogger(__name__)

OFFICIAL_EPOCHS, OFFICIAL_WARMUP_EPOCHS = OFFICIAL_DEFAULTS["num_train_epochs"], OFFICIAL_DEFAULTS["warmup_epochs"]
MODEL_SEED_TAG = 1  # randomness domains: 0 = data (see sources.py), 1 = the model's corruption draws

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
    "monitor_steps", "monitor_bank_size", "monitor_eval_size", "monitor_gain_size", "knn_k", "knn_temperature",
    "preset", "config_file", "config_overrides", "backbone_overrides", "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs", "max_train_steps", "warmup_epochs", "warmup_steps", "warmup_ratio", "base_learning_rate",
    "warmup_lr", "min_lr", "mixed_precision",
})


class PretrainingArgumentError(ScriptError):
    """The run cannot start: an argument, the data, the output folder or the model configuration is invalid (exit
    code 2)."""


@dataclass
class PretrainingResult:
    output_dir: str
    steps: int
    final_loss: float | None
    skipped_images: int
    train_seconds: float
    picture: str | None
    pushed_to: str | None


@dataclass(frozen=True)
class _Plan:
    """The run's numbers, derived from the arguments and the data."""

    total_batch_size: int
    steps_per_epoch: int | None  # None: a stream
    total_steps: int
    schedule: LearningRateSchedule


# ---------------------------------------------------------------------------------------------------- the run
def run_pretraining(args: PretrainingArguments, config_overrides: dict[str, Any] | None = None) -> PretrainingResult:
    """Pre-trains an MFMForPreTraining as the arguments say and writes the model, its card and pictures."""
    args = resolve_defaults(args)
    with _refused():
        _check_arguments(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=build_trackers(args.report_to, args.output_dir),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, LOGS_FOLDER)),
        # batches come from pinned memory on CUDA: copy them to the device without blocking
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_plugin=dynamo_plugin(args),
    )
    _use_cpu_threads(accelerator, args.cpu_threads)
    with (
        hold_output_dir(accelerator, args.output_dir) as precision,
        cudnn_autotuning(args.cudnn_benchmark, accelerator.device),
    ):
        # ---- data and model: anything wrong in the _refused() blocks is the user's input (exit status 2)
        with _refused():
            config = _model_config(args, config_overrides or {}, accelerator)
            data = load_pretraining_data(args, config, accelerator)
            plan = _plan(args, data, accelerator)
            monitor = _monitor(args, config, accelerator)
        set_seed(args.seed)  # the same initialisation on every process
        model = build_model(config, args.model_name_or_path, fast_paths=args.fast_paths,
                            bf16_residual_stream=args.bf16_residual_stream)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        model.to(accelerator.device, memory_format=preferred_memory_format(config, accelerator.device))
        optimizer = build_optimizer(model, plan.schedule.peak_lr, weight_decay=args.weight_decay,
                                    betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        model, optimizer, loader = prepare_for_training(accelerator, model, optimizer,
                                                        training_loader(args, data, accelerator))
        state = TrainerState()
        with _refused():
            last_checkpoint = resume_run(accelerator, args, state, _settings(args, config, plan, precision))
        plan.schedule.apply(optimizer, state.step)
        start_trackers(accelerator, args.project_name, args, total_batch_size=plan.total_batch_size,
                       peak_lr=plan.schedule.peak_lr, total_steps=plan.total_steps,
                       warmup_steps=plan.schedule.warmup_steps, num_processes=accelerator.num_processes,
                       mixed_precision=accelerator.mixed_precision, data=data.description)

        # ---- the loop: micro-batches, an optimizer step every `accumulation`; logs, pictures, checkpoints
        # FSDP forwards need every process; otherwise the main process draws the pictures alone
        use_fsdp = accelerator.distributed_type == DistributedType.FSDP
        pictures = None
        if accelerator.is_main_process or use_fsdp:
            pictures = fixed_batch(data, config.image_size, args.num_visualization_images, args.decode_on_device)
        picture = _save_picture(accelerator, model, pictures, 0, args) if state.step == 0 else None
        progress = tqdm(total=plan.total_steps, initial=state.step, desc="pre-training",
                        disable=not accelerator.is_local_main_process)
        if state.step == 0:
            _measure(accelerator, monitor, model, state.step, progress)
        statistics = StepStatistics(accelerator.device, _nonfinite_patience(args, accelerator))
        mean = torch.tensor(config.image_mean, device=accelerator.device).view(1, -1, 1, 1)
        std = torch.tensor(config.image_std, device=accelerator.device).view(1, -1, 1, 1)
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        accumulation = args.gradient_accumulation_steps
        steps_at_start, last_loss = state.step, None
        start = window_start = time.perf_counter()
        window_steps, lr = 0, optimizer.param_groups[0]["lr"]
        model.train()
        try:
            batches = micro_batches(loader, accelerator, state.step, plan.total_steps, plan.steps_per_epoch,
                                    accumulation)
            for micro, (batch, end_of_pass) in enumerate(batches):
                # the forward's random draws (masks, degradations) depend on the global micro-batch index only
                batch_seed = derive_seed(args.seed, MODEL_SEED_TAG, global_micro_batch_index(
                    state.step, micro % accumulation, accumulation, accelerator.process_index,
                    accelerator.num_processes))
                with accelerator.accumulate(model):
                    images, skipped = batch_images(batch, config.image_size, accelerator.device, args.decode_on_device)
                    with seeded_device_rng(accelerator.device, batch_seed):
                        loss = model(pixel_values=normalize_on_device(images, mean, std), return_dict=True).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        statistics.add_grad_norm(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                statistics.add_micro_batch(loss, skipped, state.step)
                if not accelerator.sync_gradients:
                    continue
                lr = optimizer.param_groups[0]["lr"]  # the lr this step used
                state.step += 1
                plan.schedule.apply(optimizer, state.step)
                progress.update(1)
                window_steps += 1
                last_step = state.step >= plan.total_steps
                if state.step % args.logging_steps == 0 or last_step:
                    last_loss = _log(accelerator, statistics, state, plan, lr, time.perf_counter() - window_start,
                                     window_steps, progress, last_checkpoint)
                    window_start, window_steps = time.perf_counter(), 0
                if monitor is not None and (state.step % args.monitor_steps == 0 or last_step):
                    _measure(accelerator, monitor, model, state.step, progress)
                if args.visualization_steps and state.step % args.visualization_steps == 0 and not last_step:
                    picture = _save_picture(accelerator, model, pictures, state.step, args) or picture
                if last_step or (args.checkpointing_steps and state.step % args.checkpointing_steps == 0) or (
                    args.save_every_epoch and end_of_pass
                ):
                    last_checkpoint = _checkpoint(accelerator, statistics, state, args, last_checkpoint)
        finally:
            progress.close()  # before any error message, so that it starts on a line of its own
        train_seconds = time.perf_counter() - start
        statistics.check_finite(accelerator, last_checkpoint)

        # ---- the outputs: the model, its picture and card, the push
        accelerator.wait_for_everyone()
        if state.step > 0:
            picture = _save_picture(accelerator, model, pictures, state.step, args) or picture
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        # a compiled model's state dict names its weights "_orig_mod.<name>": save them under their own names
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(model).items()}
        with write_faults(args.output_dir, "the final model"):
            unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                      save_function=accelerator.save, state_dict=state_dict)
        pushed = None
        if accelerator.is_main_process:
            if state.skipped_images:
                logger.warning("skipped %d unreadable images in total", state.skipped_images)
            if data.unlisted:
                logger.warning("%d entries of the image folder could not be listed (see the warning at the start)",
                               len(data.unlisted))
            details = _training_details(args, config, data, plan, state, precision, last_loss, train_seconds,
                                       accelerator)
            card = render_model_card(
                args.hub_model_id or f"local/{os.path.basename(os.path.normpath(args.output_dir))}",
                unwrapped.config, task="pretraining", datasets=[args.dataset_name] if args.dataset_name else None,
                training_details=details, images=[RECONSTRUCTION_PICTURE] if picture else None,
            )
            with write_faults(args.output_dir, "the model card"):
                Path(args.output_dir, MODEL_CARD_FILE).write_text(card, encoding="utf-8")
            if args.push_to_hub:
                pushed = publish_folder(
                    args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                    commit_message=f"MFM pre-training, step {state.step}", local_dir=args.hub_local_dir,
                )
        accelerator.wait_for_everyone()
        if state.step == steps_at_start:
            accelerator.print(f"training was already complete at step {state.step}; outputs re-written")
        return PretrainingResult(args.output_dir, state.step, last_loss, state.skipped_images, train_seconds, picture,
                                 pushed)


# ---------------------------------------------------------------------------------------------------- set-up
@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """Whatever goes wrong in the block is the user's input (an argument, the data, the folder): one line, exit
    status 2 (`PretrainingArgumentError`). OSError: a model or dataset that cannot be found or read."""
    try:
        yield
    except WriteFailedError:
        raise
    except (ValueError, OSError) as error:
        raise PretrainingArgumentError(str(error)) from error


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_arguments(args: PretrainingArguments) -> None:
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
    check_report_to(args.report_to)


def dynamo_plugin(args: PretrainingArguments) -> TorchDynamoPlugin | None:
    """Accelerate's torch.compile settings for ``--torch_compile`` (backend and mode), None without it."""
    if not args.torch_compile:
        return None
    return TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)


def _use_cpu_threads(accelerator: Accelerator, cpu_threads: int | None) -> None:
    """``--cpu_threads`` when training on the CPU (0: the available cores divided by the local processes)."""
    if accelerator.device.type == "cpu" and cpu_threads is not None:
        threads = cpu_threads or max(1, available_cores() // local_processes(accelerator))
        torch.set_num_threads(threads)
        accelerator.print(f"training on the CPU with {threads} thread(s) per process")


def _model_config(args: PretrainingArguments, overrides: dict[str, Any], accelerator: Accelerator) -> Any:
    """The MFMConfig of the run: a preset, a config file or a checkpoint's, with the command line's overrides (and
    the embedded demo's small model). What wins: the per-field flags (``overrides``) and ``--backbone_overrides``,
    then ``--config_overrides``, then the demo's model."""
    given = parse_config_overrides(args.config_overrides)
    backbone_overrides = {**given.pop("backbone_overrides", {}), **parse_backbone_overrides(args.backbone_overrides)}
    overrides = {**given, **overrides}
    if is_demo_run(args) and args.preset == "mfm-vit-tiny" and not args.config_file and not args.model_name_or_path:
        overrides = {**{k: v for k, v in DEMO_MODEL_OVERRIDES.items() if k != "backbone_overrides"}, **overrides}
        backbone_overrides = {**DEMO_MODEL_OVERRIDES["backbone_overrides"], **backbone_overrides}
    config = build_config(args.preset, args.config_file, args.model_name_or_path, overrides, backbone_overrides)
    if (config.image_size != OFFICIAL_IMAGE_SIZE and "mask_radius" not in overrides
            and config.mask_radius == OFFICIAL_MASK_RADIUS):
        logger.warning("mask_radius %d is tuned for %dx%d inputs; at %d px the same ratio is --mask_radius %.1f",
                       OFFICIAL_MASK_RADIUS, OFFICIAL_IMAGE_SIZE, OFFICIAL_IMAGE_SIZE, config.image_size,
                       official_mask_radius(config.image_size))
    if args.bf16_residual_stream and not config.is_vit:
        raise ValueError(
            f"--bf16_residual_stream is for ViT encoders (beit, vit), not {config.backbone_config.model_type}"
        )
    if args.bf16_residual_stream and accelerator.mixed_precision != "bf16":
        raise ValueError(
            f"--bf16_residual_stream needs --mixed_precision bf16 (this run: {accelerator.mixed_precision})"
        )
    return config


def _plan(args: PretrainingArguments, data: PretrainingData, accelerator: Accelerator) -> _Plan:
    """Total batch, optimizer steps per epoch and in all, and the lr schedule (learning rates scaled by batch / 512)."""
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    total_batch = args.per_device_train_batch_size * processes * accumulation
    steps_per_epoch = None
    if not data.streaming:
        steps_per_epoch = len(data.dataset) // (args.per_device_train_batch_size * processes) // accumulation
        if steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(data.dataset)} images, fewer than one optimizer step needs (per-device batch "
                f"{args.per_device_train_batch_size} x {processes} processes x {accumulation} accumulation steps = "
                f"{total_batch})"
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
    scaled = {name: scale_learning_rate(getattr(args, name), total_batch)
              for name in ("base_learning_rate", "warmup_lr", "min_lr")}
    schedule = LearningRateSchedule(scaled["base_learning_rate"], total_steps, warmup_steps,
                                    warmup_lr=scaled["warmup_lr"], min_lr=scaled["min_lr"])
    return _Plan(total_batch, steps_per_epoch, total_steps, schedule)


def _settings(args: PretrainingArguments, config: Any, plan: _Plan, precision: str) -> dict[str, Any]:
    """What a resume must keep: see `RUN_ONLY_ARGUMENTS`."""
    return trajectory_settings(
        args, RUN_ONLY_ARGUMENTS, total_batch_size=plan.total_batch_size, mixed_precision=precision,
        schedule=dataclasses.asdict(plan.schedule), model=config_settings(config),
    )


def _monitor(args: PretrainingArguments, config: Any, accelerator: Accelerator) -> RepresentationMonitor | None:
    """The representation monitor of ``--monitor_steps`` (None when off); it runs on the main process."""
    if not args.monitor_steps:
        return None
    args.check_monitor()
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("--monitor_steps runs the encoder on the main process alone, which FSDP's sharded weights "
                         "do not allow; evaluate the saved checkpoints with run_linear_probe.py instead")
    if not accelerator.is_main_process:
        return None
    images = load_monitor_images(args, config.image_size, accelerator.device)
    logger.info("monitor: kNN of %d held-out images on a bank of %d training images every %d steps",
                len(images.query_images), len(images.bank_images), args.monitor_steps)
    return RepresentationMonitor(images, k=args.knn_k, temperature=args.knn_temperature,
                                 gain_size=args.monitor_gain_size)


def _nonfinite_patience(args: PretrainingArguments, accelerator: Accelerator) -> int:
    if args.max_nonfinite_retries is not None:
        return args.max_nonfinite_retries
    return 20 if accelerator.mixed_precision == "fp16" else 0


# ---------------------------------------------------------------------------------------------------- the loop
def _log(accelerator: Accelerator, statistics: StepStatistics, state: TrainerState, plan: _Plan, lr: float,
         seconds: float, steps: int, progress: tqdm, last_checkpoint: Path | None) -> float:
    """Logs the window's metrics (the one read of the device's statistics) and returns its mean loss."""
    statistics.check_finite(accelerator, last_checkpoint)
    values = statistics.collect(accelerator)
    state.skipped_images += values["skipped"]
    metrics = {
        "train/loss": values["loss"],
        "train/lr": lr,
        "train/grad_norm": values["grad_norm"],
        "train/img_per_s": steps * plan.total_batch_size / max(seconds, 1e-9),
        "train/peak_memory_mib": peak_memory_bytes(accelerator.device) / 2**20,
        "train/skipped_images": state.skipped_images,
        "train/epoch": state.step / plan.steps_per_epoch if plan.steps_per_epoch else 0.0,
    }
    accelerator.log(metrics, step=state.step)
    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{metrics['train/img_per_s']:.1f}")
    return values["loss"]


def _checkpoint(accelerator: Accelerator, statistics: StepStatistics, state: TrainerState,
                args: PretrainingArguments, last_checkpoint: Path | None) -> Path:
    statistics.check_finite(accelerator, last_checkpoint)  # never store weights a NaN has reached
    skipped = state.skipped_images + statistics.pending_skipped(accelerator)
    return save_checkpoint(accelerator, os.path.join(args.output_dir, CHECKPOINTS_FOLDER), state.step,
                           dataclasses.asdict(dataclasses.replace(state, skipped_images=skipped)),
                           keep=args.checkpoints_total_limit)


def _measure(accelerator: Accelerator, monitor: RepresentationMonitor | None, model: Any, step: int,
             progress: tqdm) -> None:
    """One measurement of the monitor (main process), logged to the trackers (``eval/<name>``, as fine-tuning's
    evaluations) and shown under the progress bar."""
    if monitor is None:
        return
    with accelerator.autocast():
        values = monitor.measure(accelerator.unwrap_model(model, keep_torch_compile=False))
    accelerator.log({f"eval/{name}": value for name, value in values.items()}, step=step)
    progress.write(describe_measurement(step, values))


def _save_picture(accelerator: Accelerator, model: Any, images: torch.Tensor | None, step: int,
                  args: PretrainingArguments) -> str | None:
    """Saves (and logs to the trackers) the reconstruction picture of the fixed batch at ``step``; returns its path
    on the main process."""
    if images is None:
        return None
    if accelerator.distributed_type != DistributedType.FSDP:
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
    picture = reconstruction_picture(model, images, seed=args.seed,  # every process runs it (FSDP)
                                     title=f"step {step} - loss on this batch {{loss:.4f}}")
    if not accelerator.is_main_process:
        return None
    path = os.path.join(args.output_dir, RECONSTRUCTION_PICTURE)
    with write_faults(args.output_dir, "the reconstruction pictures"):
        save_png(picture, os.path.join(args.output_dir, PICTURES_FOLDER, f"step-{step:07d}.png"))
        save_png(picture, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"reconstruction": picture[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"reconstruction": [picture]}, step=step)
    return path


# ---------------------------------------------------------------------------------------------------- outputs
def _training_details(args: PretrainingArguments, config: Any, data: PretrainingData, plan: _Plan,
                      state: TrainerState, precision: str, last_loss: float | None, seconds: float,
                      accelerator: Accelerator) -> dict[str, Any]:
    """The model card's table of what ran."""
    details: dict[str, Any] = {
        "data": data.description,
        "pretext": config.corruption,
        "image size": config.image_size,
        "optimizer steps": state.step,
        "epochs": round(state.step / plan.steps_per_epoch, 2) if plan.steps_per_epoch else "n/a (streamed)",
        "total batch size": plan.total_batch_size,
        "peak learning rate": plan.schedule.peak_lr,
        "schedule": f"linear warmup {plan.schedule.warmup_steps} steps, then cosine to {args.min_lr:g} x batch / 512",
        "optimizer": f"AdamW betas ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
        "gradient clipping (max_grad_norm)": describe_clipping(args.max_grad_norm),
        "mixed precision": precision,
        "final loss": round(last_loss, 5) if last_loss is not None else "n/a",
        "hardware": describe_hardware(accelerator.device, accelerator.num_processes),
        "training time (this invocation)": f"{seconds / 60:.1f} min",
        "skipped images": state.skipped_images,
    }
    metrics_file = Path(args.output_dir, LOGS_FOLDER, METRICS_FILE)
    if args.monitor_steps and metrics_file.is_file():
        details.update(summarize_measurements(read_metrics(metrics_file, upgrade=True)))
    if data.unlisted:
        details["folder entries that could not be listed"] = len(data.unlisted)
    if state.settings_changes:
        details["settings changed on resume (--allow_changed_settings)"] = describe_settings_changes(
            state.settings_changes
        )
    return details
