"""Fine-tuning an MFM encoder for image classification with Accelerate: the paper's recipe, evaluated every epoch.

`finetune` tells the run top to bottom: data (`classification_data`) and model (`model_loading`), AdamW over
layer-wise lr-decay groups (`layer_decay`), linear warmup + cosine per optimizer step (`schedules`), Mixup/CutMix
with label smoothing and the soft-target cross-entropy (`mixup`), top-1 / top-5 on the validation set after every
epoch (`evaluate_classifier`), the best model saved with ``save_pretrained`` in ``output_dir``, resumable
checkpoints in ``output_dir/checkpoints``, the metrics in ``logs/metrics.jsonl`` and ``--report_to``'s trackers
(`trackers`), a model card with a ``model-index`` of the best results, and an optional push to the Hub.

Learning rates follow the official linear scaling: ``lr = base_learning_rate * total_batch / 512`` (and the same
for ``warmup_lr`` and ``min_lr``), with ``total_batch = per-device batch * processes * accumulation steps``.

Evaluation counts every validation sample exactly once whatever the number of processes: the validation loader is
prepared by Accelerate (which pads the last batches so that all processes step together) and the per-sample results
go through ``accelerator.gather_for_metrics``, which drops the padding. An unreadable validation image is left out
and counted (``num_unreadable``); an unreadable training image is replaced by the next readable one and counted.

The output folder belongs to the run and a resume keeps the run's settings (`run_folder`); the lr is a function of
the step (`schedules`), so checkpoints hold no pickled object.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...fast_paths import apply_fast_paths
from ...modeling_mfm import build_image_processor
from ...publishing.folder_layout import CHECKPOINTS_FOLDER, LOGS_FOLDER, MODEL_CARD_FILE, RESULTS_FILE
from ...publishing.hub import check_repo_id, publish_folder
from ...publishing.model_card import render_model_card
from ..data.classification_data import (
    ClassificationDataArguments,
    ClassificationDataset,
    build_eval_transform,
    build_train_transform,
    collate_classification,
)
from ..data.device_dataset import DeviceBatches, cache_in_memory, load_device_images
from ..data.mixup import MixupCutmix, soft_target_cross_entropy
from ..evaluation.classification_metrics import TopKAccuracy, top_k_indices
from ..models.model_factory import cudnn_autotuning, enable_activation_checkpointing, preferred_memory_format
from ..models.model_loading import load_classifier
from ..optim.layer_decay import layer_decay_adamw
from ..optim.optimizer import FUSED_ADAMW_DEVICES, clip_to_max_grad_norm, describe_clipping, scale_learning_rate
from ..optim.schedules import LearningRateSchedule
from ..run.checkpointing import TrainerState, save_checkpoint
from ..run.disk_faults import write_faults, write_json
from ..run.randomness import derive_seed, seeded_device_rng
from ..run.run_folder import (
    RunFolderArguments,
    config_settings,
    describe_settings_changes,
    hold_output_dir,
    resume_run,
    trajectory_settings,
)
from ..run.step_statistics import RunningSums
from ..run.trackers import build_trackers, check_report_to, start_trackers

logger = get_logger(__name__)  # logs on the main process only

__all__ = ["RECIPES", "FinetuneArguments", "evaluate_classifier", "finetune"]

# The recipe-dependent defaults. "vit": the official MFM ViT fine-tuning (configs/vit_base/finetune_*.yaml).
# "resnet": the official ResNet-50 fine-tuning used timm's "ResNet Strikes Back" A3-style schedule (100 epochs, lr 8e-3
# at batch 2048, weight decay 0.02, mixup 0.1, cutmix 1.0, rand-m6, test crop 0.95); here with AdamW instead of LAMB
# and softmax cross-entropy instead of binary cross-entropy.
RECIPES: dict[str, dict[str, Any]] = {
    "vit": {
        "num_train_epochs": 100, "base_learning_rate": 2e-3, "warmup_epochs": 5, "warmup_lr": 2.5e-7, "min_lr": 2.5e-7,
        "weight_decay": 0.05, "layer_decay": 0.8, "drop_path_rate": 0.1, "auto_augment": "rand-m9-mstd0.5-inc1",
        "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "crop_pct": 0.875,
        "max_grad_norm": 0.0,
    },
    "resnet": {
        "num_train_epochs": 100, "base_learning_rate": 2e-3, "warmup_epochs": 5, "warmup_lr": 2.5e-5, "min_lr": 2.5e-7,
        "weight_decay": 0.02, "layer_decay": 1.0, "drop_path_rate": 0.05, "auto_augment": "rand-m6-mstd0.5-inc1",
        "random_erasing": 0.0, "mixup": 0.1, "cutmix": 1.0, "label_smoothing": 0.1, "crop_pct": 0.95,
        "max_grad_norm": 0.0,
    },
}


# Arguments that change how a run is carried out, logged or saved, but not its training (see run_folder); every
# other argument is a setting a resume must keep.
RUN_ONLY_ARGUMENTS = frozenset({
    "output_dir", "logging_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "allow_changed_settings", "stop_after_steps", "eval_only", "report_to", "project_name",
    "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_local_dir", "dataloader_num_workers",
    "cache_dir",
    "cudnn_benchmark", "gradient_checkpointing", "per_device_eval_batch_size", "mixed_precision",
})


@dataclass(kw_only=True)
class FinetuneArguments(ClassificationDataArguments, RunFolderArguments):
    """Everything `finetune` needs; ``None`` fields take the value of ``recipe`` (see `RECIPES`). The command line of
    ``run_scripts/run_finetune.py`` is generated from these fields (``HfArgumentParser``)."""

    # model
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "MFM checkpoint or native encoder (folder or Hub id) to fine-tune."}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "Preset name (see MFMConfig.available_presets()) to train from a random initialisation "
                          "instead, e.g. mfm-vit-tiny."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'JSON object of MFMConfig fields overriding the preset, as in run_pretrain.py, e.g. '
                          '\'{"image_size": 32, "backbone_overrides": {"patch_size": 4}}\'.'},
    )
    recipe: str = field(default="vit", metadata={"help": "Defaults to use: 'vit' (official ViT) or 'resnet'."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth (vit recipe: 0.1)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    fast_paths: bool = field(
        default=True,
        metadata={"help": "Apply modeling_mfm.fast_paths (the same function, faster); --no_fast_paths runs the "
                          "stock model."},
    )
    cudnn_benchmark: bool = field(
        default=True,
        metadata={"help": "On CUDA, let cuDNN time its convolution algorithms per input shape and keep the fastest "
                          "(torch.backends.cudnn.benchmark); --no_cudnn_benchmark keeps its heuristic choice."},
    )
    # optimisation (data fields: ClassificationDataArguments)
    num_train_epochs: int | None = field(default=None, metadata={"help": "Epochs (vit recipe: 100)."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides num_train_epochs when set."}
    )
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch per process (official: 128)."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "lr = base_learning_rate * total_batch / 512 (vit recipe: 2e-3)."}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Absolute peak lr (skips the scaling)."})
    warmup_epochs: float | None = field(default=None, metadata={"help": "Linear warmup epochs (vit recipe: 5)."})
    warmup_lr: float | None = field(default=None, metadata={"help": "Warmup start lr before scaling (2.5e-7)."})
    min_lr: float | None = field(default=None, metadata={"help": "Final cosine lr before scaling (2.5e-7)."})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (0.05)."})
    layer_decay: float | None = field(default=None, metadata={"help": "Layer-wise lr decay (vit: 0.8)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "Gradient clipping norm (0 = no clipping; both recipes: 0, as the official fine-tuning)."},
    )
    # augmentation
    crop_min_scale: float = field(
        default=0.08, metadata={"help": "Smallest crop area fraction of RandomResizedCrop (official 0.08)."}
    )
    dataset_on_device: bool = field(
        default=False,
        metadata={"help": "Small images: decode the training images once onto the device and crop, flip, normalise "
                          "and erase there (no RandAugment: needs --auto_augment none); the validation images are "
                          "transformed once and kept in memory (see modeling_mfm.training.data.device_dataset)."},
    )
    auto_augment: str | None = field(
        default=None, metadata={"help": "RandAugment spec (vit: rand-m9-mstd0.5-inc1); 'none' disables."}
    )
    random_erasing: float | None = field(default=None, metadata={"help": "Random erasing probability (0.25)."})
    mixup: float | None = field(default=None, metadata={"help": "Mixup alpha (0.8; 0 disables)."})
    cutmix: float | None = field(default=None, metadata={"help": "CutMix alpha (1.0; 0 disables)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of Mixup."})
    label_smoothing: float | None = field(default=None, metadata={"help": "Label smoothing (0.1)."})
    crop_pct: float | None = field(default=None, metadata={"help": "Evaluation centre-crop fraction (0.875)."})
    # runtime
    output_dir: str = field(default="mfm-finetuned", metadata={"help": "Where the model, logs, checkpoints go."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no / fp16 / bf16 (default: accelerate's)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Also checkpoint every N optimizer steps (always at each epoch end)."}
    )
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints."})
    stop_after_steps: int | None = field(
        default=None,
        metadata={"help": "Stop this invocation after N optimizer steps in total, with a checkpoint (for "
                          "time-limited jobs; the same command continues the run)."},
    )
    eval_only: bool = field(default=False, metadata={"help": "Only evaluate model_name_or_path on the validation set."})
    report_to: Literal["tensorboard", "wandb", "all", "none"] = field(
        default="none", metadata={"help": "Experiment trackers (metrics also go to logs/metrics.jsonl)."}
    )
    project_name: str = field(default="mfm-finetune", metadata={"help": "Tracker project name."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "'user/name' of the Hub repository."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_local_dir: str | None = field(
        default=None, metadata={"help": "Dry run of --push_to_hub: publish into this local folder instead."}
    )

    def resolved(self) -> FinetuneArguments:
        """A copy with the recipe defaults filled in and every value checked."""
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        values = asdict(self)
        for name, default in RECIPES[self.recipe].items():
            if values[name] is None:
                values[name] = default
        if isinstance(values["auto_augment"], str) and values["auto_augment"].lower() == "none":
            values["auto_augment"] = None
        args = FinetuneArguments(**values)
        args._check()
        return args

    def check(self) -> None:
        """Raises ValueError for a value `finetune` would refuse (the command line checks it at parse time)."""
        self.resolved()

    def _check(self) -> None:
        if (self.model_name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of --model_name_or_path and --preset")
        if self.eval_only and self.model_name_or_path is None:
            raise ValueError("--eval_only needs --model_name_or_path")
        self.check_data_source()
        positive = {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_train_epochs": self.num_train_epochs,
            "logging_steps": self.logging_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("max_train_steps", "checkpointing_steps", "stop_after_steps", "max_train_samples",
                     "max_eval_samples", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {value}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if self.dataset_on_device and self.auto_augment:
            raise ValueError("--dataset_on_device has no RandAugment (a per-image CPU transform); pass --auto_augment "
                             "none")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.adam_epsilon < 0:
            raise ValueError(f"adam_epsilon must be >= 0, got {self.adam_epsilon}")
        if self.push_to_hub:
            check_repo_id(self.hub_model_id)
        check_report_to(self.report_to)


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the readable images of the validation set, each
    sample counted once across processes (``num_samples``; ``num_unreadable`` images were left out). ``dataloader``
    must have gone through ``accelerator.prepare``; batches may carry ``valid`` (`ClassificationDataset`)."""
    model.eval()
    metric = TopKAccuracy(keep_in_memory=True)
    loss_sum, count, unreadable, k = 0.0, 0, 0, None
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        k = min(5, logits.shape[1])
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        valid = batch.get("valid", torch.ones_like(batch["labels"], dtype=torch.bool))
        ranked, labels, losses, valid = accelerator.gather_for_metrics(
            (top_k_indices(logits, k), batch["labels"], losses, valid)
        )
        unreadable += int((~valid).sum())
        ranked, labels, losses = ranked[valid], labels[valid], losses[valid]
        metric.add_batch(predictions=ranked.cpu().tolist(), references=labels.cpu().tolist())
        loss_sum += float(losses.sum())
        count += int(labels.numel())
    if k is None:
        raise ValueError("the validation set is empty")
    if count == 0:
        raise ValueError(f"none of the {unreadable} validation images could be read")
    scores = metric.compute(k=sorted({1, k}))
    results = {"top1": 100.0 * scores["top1"], f"top{k}": 100.0 * scores[f"top{k}"]}
    results.update({"loss": loss_sum / count, "num_samples": count, "num_unreadable": unreadable})
    return results


# ---------------------------------------------------------------------------------------------------- the run
def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes (or, with ``eval_only``, evaluates) and returns the results written to ``output_dir``."""
    args = args.resolved()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=build_trackers(args.report_to, output_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_FOLDER)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    with (
        hold_output_dir(accelerator, output_dir) as precision,
        cudnn_autotuning(args.cudnn_benchmark, accelerator.device),
    ):
        set_seed(args.seed)
        with accelerator.main_process_first():
            data = args.load_datasets(args.seed)
        model = load_classifier(
            model_name_or_path=args.model_name_or_path, preset=args.preset, num_labels=len(data.labels),
            id2label=data.id2label, drop_path_rate=args.drop_path_rate, cache_dir=args.cache_dir,
            config_overrides=json.loads(args.config_overrides) if args.config_overrides else None,
        )
        config = model.config
        if args.fast_paths:
            apply_fast_paths(model)
        model.to(memory_format=preferred_memory_format(config, accelerator.device))  # CNNs: channels_last
        eval_set, eval_loader = _eval_loader(args, data.validation, data, config)
        if args.eval_only:
            return _evaluate_only(args, data, config, model, eval_loader, accelerator)
        if accelerator.is_main_process:  # the saved model's processor: this run's evaluation transform
            build_image_processor(config, crop_pct=args.crop_pct).save_pretrained(output_dir)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        train_set, train_loader = _train_loader(args, data, config, accelerator)

        # ---- optimizer, Accelerate, the schedule, resume
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        lr, lr_ratio = _peak_lr(args, total_batch)
        optimizer = layer_decay_adamw(model, lr, args.weight_decay, args.layer_decay,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                      fused=accelerator.device.type in FUSED_ADAMW_DEVICES)
        if args.dataset_on_device:  # batches are made on the device, this process's share only
            model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
            # whole optimizer steps per epoch: nothing marks the end of these batches for Accelerate's accumulation
            batches_per_epoch = len(train_loader) // args.gradient_accumulation_steps * args.gradient_accumulation_steps
        else:
            model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader,
                                                                              eval_loader)
            batches_per_epoch = len(train_loader)
        if batches_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(train_set)} images) is smaller than one global batch "
                f"({args.per_device_train_batch_size} x {accelerator.num_processes} processes)"
            )
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        schedule = _schedule(args, lr, lr_ratio, total_steps, steps_per_epoch)
        mixer = MixupCutmix(
            len(data.labels), mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, switch_prob=args.mixup_switch_prob,
            prob=args.mixup_prob, label_smoothing=args.label_smoothing,
        ) if (args.mixup > 0 or args.cutmix > 0) and len(data.labels) > 1 else None

        state = TrainerState()
        resume_run(accelerator, args, state, trajectory_settings(
            args, RUN_ONLY_ARGUMENTS, num_processes=accelerator.num_processes, mixed_precision=precision,
            schedule=asdict(schedule), model=config_settings(config),
        ))
        schedule.apply(optimizer, state.step)
        start_trackers(accelerator, args.project_name, args, total_steps=total_steps, lr=lr)
        logger.info(
            "fine-tuning on %d images (%d classes), validating on %d; %d epochs, %d optimizer steps, total batch %d, "
            "peak lr %.3g", len(train_set), len(data.labels), len(eval_set), num_epochs, total_steps, total_batch, lr,
        )

        # ---- the loop: epochs of optimizer steps, an evaluation and a checkpoint after each
        progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                        desc="fine-tuning")
        sums = RunningSums(accelerator.device)
        stop_at = min(total_steps, args.stop_after_steps or total_steps)
        for epoch in range(state.epoch, num_epochs):
            state.epoch = epoch
            model.train()
            for index, batch in _epoch_batches(args, train_loader, accelerator, epoch, state.batches_in_epoch,
                                               batches_per_epoch):
                # the batch's random draws (mixup, drop path) are keyed by (seed, epoch, batch, process), so a
                # resumed run repeats them exactly
                key = derive_seed(args.seed, epoch, index, accelerator.process_index)
                with accelerator.accumulate(model), seeded_device_rng(accelerator.device, key):
                    loss = _training_loss(model, batch, mixer, key, args.label_smoothing)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"non-finite training loss {loss.item()} at step {state.step}")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        clip_to_max_grad_norm(accelerator, model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                sums.add(loss, batch["skipped"])
                state.batches_in_epoch = index + 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                schedule.apply(optimizer, state.step)
                progress.update(1)
                if state.step % args.logging_steps == 0 or state.step == total_steps:
                    loss_value, head_lr = sums.mean_loss(accelerator), max(g["lr"] for g in optimizer.param_groups)
                    state.skipped_images += sums.skipped_images(accelerator)
                    accelerator.log({"train/loss": loss_value, "train/lr": head_lr, "train/epoch": epoch,
                                     "train/skipped_images": state.skipped_images}, step=state.step)
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{head_lr:.3g}")
                if args.checkpointing_steps and state.step % args.checkpointing_steps == 0 and (
                    state.batches_in_epoch < batches_per_epoch  # the end of the epoch checkpoints anyway
                ):
                    _checkpoint(accelerator, args, state, sums)
                if state.step >= stop_at:
                    break
            if state.batches_in_epoch < batches_per_epoch and state.step < total_steps:
                _checkpoint(accelerator, args, state, sums)  # stopped by --stop_after_steps in the middle of the epoch
                break

            metrics = evaluate_classifier(model, eval_loader, accelerator)
            state.history.append({"epoch": epoch + 1, "step": state.step, **metrics})
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
            logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
            if not state.best or metrics["top1"] > state.best["metrics"]["top1"]:
                state.best = {"epoch": epoch + 1, "step": state.step, "metrics": metrics}
                accelerator.wait_for_everyone()
                with write_faults(output_dir, "the best model"):
                    accelerator.unwrap_model(model).save_pretrained(
                        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
                    )
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            _checkpoint(accelerator, args, state, sums)
            if state.step >= stop_at:
                break
        progress.close()
        state.skipped_images += sums.skipped_images(accelerator)

        # ---- the outputs: results (the test split's once, at the end), the model card of a finished run, the push
        results = _results(state, total_steps, data)
        if data.test is not None and results["completed"]:
            results["test"] = _test_final_and_best(args, data, config, model, accelerator)
        if accelerator.is_main_process:
            if state.skipped_images or data.unlisted:
                logger.warning("skipped %d unreadable training images; %d folder entries could not be listed",
                               state.skipped_images, len(data.unlisted))
            write_json(output_dir / RESULTS_FILE, results, sort_keys=True)
            if results["completed"] and state.best:
                details = _training_details(args, config, state, data, schedule, num_epochs, total_batch, precision)
                with write_faults(output_dir, "the model card"):
                    (output_dir / MODEL_CARD_FILE).write_text(_model_card(args, config, state.best, details,
                                                                          results.get("test")),
                                                              encoding="utf-8")
                if args.push_to_hub:
                    url = publish_folder(
                        output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                        commit_message="Upload fine-tuned MFM model", local_dir=args.hub_local_dir,
                    )
                    logger.info("pushed to %s", url)
        accelerator.wait_for_everyone()
        return results


# ---------------------------------------------------------------------------------------------------- helpers
def _eval_loader(args: FinetuneArguments, rows: Any, data: Any, config: Any) -> tuple[Any, DataLoader]:
    """The evaluation rows (validation or test) with the evaluation transform, and their loader."""
    transform = build_eval_transform(config.image_size, config.image_mean, config.image_std, args.crop_pct)
    eval_set = ClassificationDataset(rows, data.image_column, data.label_column, transform)
    workers = args.dataloader_num_workers
    if args.dataset_on_device:  # the evaluation transform draws nothing: run it once, not every epoch
        eval_set, workers = cache_in_memory(eval_set, num_workers=args.dataloader_num_workers), 0
    return eval_set, DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, shuffle=False,
                                num_workers=workers, collate_fn=collate_classification)


def _train_loader(args: FinetuneArguments, data: Any, config: Any, accelerator: Accelerator
                  ) -> tuple[ClassificationDataset, DataLoader | DeviceBatches]:
    """The training set and its batches: augmented by DataLoader workers, or made on the device
    (``dataset_on_device``)."""
    rows, mean, std = data.train, config.image_mean, config.image_std
    train_set = ClassificationDataset(
        rows, data.image_column, data.label_column,
        build_train_transform(config.image_size, mean, std, args.auto_augment, args.random_erasing,
                              scale=(args.crop_min_scale, 1.0)),
        replace_unreadable=True, seed=args.seed,
    )
    if not args.dataset_on_device:
        return train_set, DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
                                     drop_last=True, num_workers=args.dataloader_num_workers,
                                     collate_fn=collate_classification)
    images = load_device_images(rows, data.image_column, config.image_size, accelerator.device,
                                label_column=data.label_column, num_workers=args.dataloader_num_workers)
    return train_set, DeviceBatches(
        images, args.per_device_train_batch_size, args.seed, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, scale=(args.crop_min_scale, 1.0), mean=mean, std=std,
        random_erasing=args.random_erasing,
    )


def _peak_lr(args: FinetuneArguments, total_batch: int) -> tuple[float, float]:
    """The peak lr (``learning_rate``, else ``base_learning_rate * total_batch / 512``) and its ratio to the base lr,
    which ``warmup_lr`` and ``min_lr`` are scaled by."""
    if args.learning_rate is not None:
        return args.learning_rate, args.learning_rate / args.base_learning_rate
    return scale_learning_rate(args.base_learning_rate, total_batch), total_batch / 512


def _schedule(args: FinetuneArguments, lr: float, lr_ratio: float, total_steps: int, steps_per_epoch: int
              ) -> LearningRateSchedule:
    """Warmup, then cosine, per optimizer step."""
    warmup_steps = min(round(args.warmup_epochs * steps_per_epoch), total_steps)
    return LearningRateSchedule(lr, total_steps, warmup_steps, args.warmup_lr * lr_ratio, args.min_lr * lr_ratio)


def _epoch_batches(args: FinetuneArguments, loader: Any, accelerator: Accelerator, epoch: int, start: int,
                   stop: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, batch) for the epoch's batches ``start`` to ``stop`` (a resumed epoch skips what was done)."""
    if args.dataset_on_device:
        return enumerate(loader.iterate(epoch, start=start, stop=stop), start=start)
    loader.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)  # the augmentations are keyed by (seed, epoch, sample)
    return enumerate(accelerator.skip_first_batches(loader, start) if start else loader, start=start)


def _training_loss(model: Any, batch: dict[str, Any], mixer: MixupCutmix | None, key: int,
                   label_smoothing: float) -> torch.Tensor:
    """Mixup / CutMix (drawn from ``key``) with the soft-target cross-entropy, or cross-entropy with label
    smoothing."""
    images, labels = batch["pixel_values"], batch["labels"]
    if mixer is None:
        return F.cross_entropy(model(pixel_values=images).logits.float(), labels, label_smoothing=label_smoothing)
    mixer.rng = np.random.default_rng(key)
    images, targets = mixer(images, labels)
    return soft_target_cross_entropy(model(pixel_values=images).logits, targets)


def _checkpoint(accelerator: Accelerator, args: FinetuneArguments, state: TrainerState, sums: RunningSums) -> None:
    state.skipped_images += sums.skipped_images(accelerator)
    save_checkpoint(accelerator, Path(args.output_dir) / CHECKPOINTS_FOLDER, state.step, asdict(state),
                    keep=args.checkpoints_total_limit)


def _evaluate_test(args: FinetuneArguments, data: Any, config: Any, model: Any, accelerator: Accelerator
                   ) -> dict[str, float]:
    """Top-1 / top-5 of ``model`` (prepared) on the test split."""
    _, test_loader = _eval_loader(args, data.test, data, config)
    return evaluate_classifier(model, accelerator.prepare(test_loader), accelerator)


def _test_final_and_best(args: FinetuneArguments, data: Any, config: Any, model: Any, accelerator: Accelerator
                         ) -> dict[str, dict[str, float]]:
    """The test split, evaluated once: the final model, then the best epoch's (chosen on the validation split and
    saved in ``output_dir``), whose weights the model then keeps."""
    results = {"final": _evaluate_test(args, data, config, model, accelerator)}
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    best = type(unwrapped).from_pretrained(args.output_dir).state_dict()
    unwrapped.load_state_dict(best)
    results["best"] = _evaluate_test(args, data, config, model, accelerator)
    logger.info("test split: final model top-1 %.2f, best epoch's top-1 %.2f", results["final"]["top1"],
                results["best"]["top1"])
    return results


def _evaluate_only(args: FinetuneArguments, data: Any, config: Any, model: Any, eval_loader: DataLoader,
                   accelerator: Accelerator) -> dict[str, Any]:
    model, eval_loader = accelerator.prepare(model, eval_loader)
    metrics = evaluate_classifier(model, eval_loader, accelerator)
    logger.info("evaluation of %s: %s", args.model_name_or_path, metrics)
    results = {"eval_" + k: v for k, v in metrics.items()}
    if data.test is not None:
        results.update({"test_" + k: v for k, v in _evaluate_test(args, data, config, model, accelerator).items()})
    results["eval_unlisted_entries"] = len(data.unlisted)
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "eval_results.json", results, sort_keys=True)
    return results


def _results(state: TrainerState, total_steps: int, data: Any) -> dict[str, Any]:
    results: dict[str, Any] = {
        "completed": state.step >= total_steps,
        "global_step": state.step,
        "total_steps": total_steps,
        "history": state.history,
        "skipped_images": state.skipped_images,
        "unlisted_entries": len(data.unlisted),
    }
    if state.best:
        best = state.best
        results.update({"best_epoch": best["epoch"], **{f"best_{k}": v for k, v in best["metrics"].items()}})
    return results


def _training_details(args: FinetuneArguments, config: Any, state: TrainerState, data: Any,
                      schedule: LearningRateSchedule, num_epochs: int, total_batch: int, precision: str
                      ) -> dict[str, Any]:
    """The model card's table of what ran."""
    details = {
        "recipe": args.recipe, "epochs": num_epochs, "optimizer steps": schedule.total_steps,
        "total batch size": total_batch, "peak learning rate": schedule.peak_lr, "layer decay": args.layer_decay,
        "weight decay": args.weight_decay, "gradient clipping (max_grad_norm)": describe_clipping(args.max_grad_norm),
        "drop path": args.drop_path_rate if hasattr(config.backbone_config, "drop_path_rate") else "n/a",
        "warmup steps": schedule.warmup_steps, "mixup / cutmix": f"{args.mixup} / {args.cutmix}",
        "label smoothing": args.label_smoothing, "auto augment": args.auto_augment or "none",
        "crop scale": f"{args.crop_min_scale}-1", "dataset on device": args.dataset_on_device,
        "random erasing": args.random_erasing, "image size": config.image_size,
        "mixed precision": precision,
        "skipped unreadable training images": state.skipped_images,
    }
    if state.history:
        details["unreadable validation images"] = state.history[-1].get("num_unreadable", 0)
    if data.unlisted:
        details["folder entries that could not be listed"] = len(data.unlisted)
    if state.settings_changes:
        details["settings changed on resume (--allow_changed_settings)"] = describe_settings_changes(
            state.settings_changes
        )
    return details


def _model_card(args: FinetuneArguments, config: Any, best: dict[str, Any], details: dict[str, Any],
                test: dict[str, dict[str, float]] | None = None) -> str:
    repo_id = args.hub_model_id or f"local/{Path(args.output_dir).resolve().name}"
    folder = Path(args.train_dir).resolve() if args.train_dir else None
    if args.train_file:  # <name>/train-*.parquet: the dataset is <name>
        folder = Path(args.train_file).resolve().parent
    if folder is not None and folder.name.lower() in ("train", "training"):
        folder = folder.parent  # <name>/train: the dataset is <name>
    dataset = args.dataset_name or folder.name
    results = []
    for key, name in (("top1", "top-1"), ("top5", "top-5")):
        if key in best.get("metrics", {}):
            results.append({"task": "image-classification", "dataset": dataset, "metric": "accuracy", "name": name,
                            "value": round(best["metrics"][key], 3), "split": "validation"})
        if test is not None and key in test["best"]:  # the folder holds the best epoch's model
            results.append({"task": "image-classification", "dataset": dataset, "metric": "accuracy", "name": name,
                            "value": round(test["best"][key], 3), "split": "test"})
    source = args.model_name_or_path
    base_model = source if source and not os.path.isdir(source) and source.count("/") == 1 else None
    return render_model_card(
        repo_id, config, task="classification", datasets=[args.dataset_name] if args.dataset_name else None,
        results=results, training_details=details, base_model=base_model,
    )
