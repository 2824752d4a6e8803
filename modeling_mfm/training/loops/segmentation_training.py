"""Training UperNet on an MFM encoder for semantic segmentation on ADE20K-format folders, with Accelerate.

Data layout (the ADEChallengeData2016 release): ``<data_dir>/images/<split>/<name>.jpg`` and
``<data_dir>/annotations/<split>/<name>.png`` (one class index per pixel), splits ``training`` and ``validation``.
With ``reduce_labels`` (ADE20K's convention) annotation 0 ("other") becomes the ignored value 255 and class k
becomes k - 1, giving 150 classes.

The recipe follows BEiT's ADE20K fine-tuning (which MFM's paper uses): UperNet with an auxiliary FCN head (weight
0.4), AdamW with layer-wise lr decay 0.65 and weight decay 0.05, linear warmup (1500 steps) then linear decay to 0
(mmsegmentation's poly schedule with power 1, `schedules.LearningRateSchedule`),
160k steps of batch 16, 512x512 crops of images randomly rescaled by 0.5-2.0 (shorter side relative to the crop) and
flipped. Evaluation resizes the shorter side to the crop size and predicts with a sliding window (crop size, stride
2/3 of it, logits averaged), as mmsegmentation's "slide" mode; the metric is mean IoU over the classes present in
prediction or ground truth, accumulated as one confusion matrix over the whole validation set (each image counted
once across processes).

An unreadable image or annotation (or one whose labels are out of range) never stops the run: training replaces the
pair by the next readable one, evaluation leaves it out; both are logged and counted, as are the folder entries that
could not be listed. The output folder belongs to the run and a resume keeps its settings (`run_folder`).
`train_segmentation` tells the run top to bottom; the metrics go to ``logs/metrics.jsonl`` and ``--report_to``'s
trackers, and ``--push_to_hub`` publishes the best model with a card of its scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from ...publishing.folder_layout import CHECKPOINTS_FOLDER, LOGS_FOLDER, RESULTS_FILE
from ...publishing.hub import check_repo_id, publish_folder
from ...publishing.model_card import render_segmentation_card
from ..data.image_folders import list_image_folder, local_path
from ..data.sources import MAX_CONSECUTIVE_FAILURES, open_image
from ..data.transforms import to_rgb
from ..models.model_loading import build_mfm_config
from ..optim.layer_decay import layer_decay_adamw
from ..optim.optimizer import clip_to_max_grad_norm, describe_clipping
from ..optim.schedules import LearningRateSchedule
from ..run.checkpointing import TrainerState, save_checkpoint
from ..run.disk_faults import write_faults, write_json
from ..run.run_folder import RunFolderArguments, config_settings, hold_output_dir, resume_run, trajectory_settings
from ..run.step_statistics import RunningSums
from ..run.trackers import build_trackers, check_report_to, start_trackers
from .segmentation_model import segmentation_image_processor, upernet_from_mfm

logger = get_logger(__name__)
data_logger = logging.getLogger(__name__)  # DataLoader workers log without Accelerate's state

__all__ = [
    "ADE20KFolder",
    "SegmentationArguments",
    "confusion_matrix",
    "iou_from_confusion",
    "sliding_window_logits",
    "train_segmentation",
]

IGNORE_INDEX = 255

# Arguments that change how a run is carried out, logged or saved, but not its training (see run_folder).
RUN_ONLY_ARGUMENTS = frozenset({
    "output_dir", "eval_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "allow_changed_settings", "dataloader_num_workers", "logging_steps", "mixed_precision",
    "report_to", "project_name", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_local_dir",
})


@dataclass
class SegmentationArguments(RunFolderArguments):
    """Options of ``run_scripts/run_segmentation.py`` (the command line is generated from these fields)."""

    model_name_or_path: str = field(metadata={"help": "MFM checkpoint or native encoder to put under UperNet."})
    data_dir: str = field(metadata={"help": "ADE20K-format root: images/<split>/*.jpg, annotations/<split>/*.png."})
    output_dir: str = field(default="mfm-upernet", metadata={"help": "Where the model, results, checkpoints go."})
    num_labels: int = field(default=150, metadata={"help": "Classes after label reduction (ADE20K: 150)."})
    reduce_labels: bool = field(default=True, metadata={"help": "0 -> ignored, k -> k - 1 (ADE20K convention)."})
    train_split: str = field(default="training", metadata={"help": "Training split folder name."})
    validation_split: str = field(default="validation", metadata={"help": "Validation split folder name."})
    crop_size: int = field(default=512, metadata={"help": "Training crop and sliding-window size."})
    max_train_steps: int = field(default=160000, metadata={"help": "Optimizer steps (BEiT: 160k)."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Batch per process (BEiT: 2 x 8 GPUs)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the head."})
    layer_decay: float = field(default=0.65, metadata={"help": "Layer-wise lr decay of the encoder."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0 = no clipping)."})
    warmup_steps: int = field(default=1500, metadata={"help": "Linear warmup steps."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the encoder."})
    hidden_size: int = field(default=512, metadata={"help": "UperNet channels."})
    eval_steps: int = field(default=16000, metadata={"help": "Evaluate (and keep the best model) every N steps."})
    checkpointing_steps: int = field(default=4000, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "Keep the newest N checkpoints."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation images."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes."})
    logging_steps: int = field(default=50, metadata={"help": "Log the loss every N steps."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no / fp16 / bf16 (default: accelerate's)."}
    )
    report_to: Literal["tensorboard", "wandb", "all", "none"] = field(
        default="none", metadata={"help": "Experiment trackers (metrics also go to logs/metrics.jsonl)."}
    )
    project_name: str = field(default="mfm-segmentation", metadata={"help": "Tracker project name."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the best model to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "'user/name' of the Hub repository."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_local_dir: str | None = field(
        default=None, metadata={"help": "Dry run of --push_to_hub: publish into this local folder instead."}
    )

    def check(self) -> None:
        for name in ("num_labels", "crop_size", "max_train_steps", "per_device_train_batch_size", "eval_steps",
                     "checkpointing_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.adam_epsilon < 0:
            raise ValueError(f"adam_epsilon must be >= 0, got {self.adam_epsilon}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_train_steps:
            raise ValueError(f"warmup_steps must be in [0, max_train_steps], got {self.warmup_steps}")
        if self.push_to_hub:
            check_repo_id(self.hub_model_id)
        check_report_to(self.report_to)


# ---------------------------------------------------------------------------------------------------- data
class ADE20KFolder(Dataset):
    """(image, annotation) pairs of one split; returns ``{"pixel_values": (3, H, W), "labels": (H, W) int64,
    "skipped": int, "valid": bool}``.

    ``replace_unreadable``: a pair that cannot be read is replaced by the next readable one (training, ``skipped``
    counts the replacements); otherwise it comes back blank with ``valid = False`` (evaluation leaves it out).
    `problems` names the entries that could not be listed or paired.
    """

    def __init__(self, data_dir: str, split: str, transform: Any, num_labels: int, reduce_labels: bool = True,
                 replace_unreadable: bool = False) -> None:
        images = Path(data_dir) / "images" / split
        annotations = Path(data_dir) / "annotations" / split
        for folder in (images, annotations):
            if not folder.is_dir():
                raise ValueError(f"{folder} is missing (ADE20K layout: images/<split>, annotations/<split>)")
        image_listing, mask_listing = list_image_folder(images), list_image_folder(annotations)
        masks = {}
        for stored in mask_listing.files:
            path = Path(local_path(stored))
            if path.suffix.lower() == ".png":
                masks[path.stem] = path
        self.problems = image_listing.problems + mask_listing.problems
        self.pairs = []
        for stored in image_listing.files:
            path = Path(local_path(stored))
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            if path.stem in masks:
                self.pairs.append((path, masks[path.stem]))
            else:
                self.problems.append(f"{stored}: no annotation {path.stem}.png")
        if not self.pairs:
            raise ValueError(f"no image with a matching annotation in {images} / {annotations}")
        self.transform = transform
        self.num_labels = num_labels
        self.reduce_labels = reduce_labels
        self.replace_unreadable = replace_unreadable

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, image_path: Path, mask_path: Path) -> dict[str, torch.Tensor]:
        with open_image(image_path) as opened:
            image = to_rgb(opened)
            image.load()  # decode before the file closes
        with open_image(mask_path) as mask:
            labels = torch.from_numpy(np.array(mask, dtype=np.int64))
        if labels.dim() != 2:
            raise ValueError(f"{mask_path} must hold one class index per pixel (a single-channel PNG)")
        if self.reduce_labels:
            labels = torch.where(labels == 0, IGNORE_INDEX, labels - 1)
        out_of_range = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_labels))
        if out_of_range.any():
            raise ValueError(f"{mask_path} has labels outside [0, {self.num_labels}) (after reduction)")
        return self._transform(tv_tensors.Image(T.functional.pil_to_tensor(image)), tv_tensors.Mask(labels))

    def _transform(self, image: tv_tensors.Image, labels: tv_tensors.Mask) -> dict[str, torch.Tensor]:
        pixel_values, labels = self.transform(image, labels)
        return {"pixel_values": pixel_values, "labels": labels.as_subclass(torch.Tensor).long()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        attempts = MAX_CONSECUTIVE_FAILURES if self.replace_unreadable else 1
        for attempt in range(attempts):
            image_path, mask_path = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                sample = self._load(image_path, mask_path)
            except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files; bad labels too
                data_logger.warning("skipping unreadable pair %s / %s: %s: %s", image_path, mask_path,
                                    type(error).__name__, error)
                continue
            return {**sample, "skipped": attempt, "valid": True}
        if not self.replace_unreadable:  # a blank image whose pixels are all ignored: it adds nothing to the scores
            blank = self._transform(tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8)),
                                    tv_tensors.Mask(torch.full((8, 8), IGNORE_INDEX, dtype=torch.int64)))
            return {**blank, "skipped": 1, "valid": False}
        raise ValueError(f"{MAX_CONSECUTIVE_FAILURES} unreadable pairs in a row from pair {index}: is the data broken?")


def train_transform(crop_size: int, mean: list[float], std: list[float]) -> T.Compose:
    """Random rescale (shorter side 0.5-2.0 x crop), random crop padded with the ignore value, flip, normalise."""
    return T.Compose([
        T.RandomShortestSize(list(range(crop_size // 2, 2 * crop_size + 1, max(1, crop_size // 16))),
                             antialias=True),
        T.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        T.RandomHorizontalFlip(),
        T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        T.Normalize(mean, std),
    ])


def eval_transform(crop_size: int, mean: list[float], std: list[float]) -> T.Compose:
    """Shorter side to the crop size (labels with nearest neighbours), normalise; inference slides over the rest."""
    return T.Compose([
        T.Resize(crop_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
        T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        T.Normalize(mean, std),
    ])


# ---------------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, crop: int, num_labels: int) -> torch.Tensor:
    """(1, 3, H, W) -> (1, C, H, W) logits averaged over crop x crop windows with stride 2/3 crop (the image is
    padded to at least one crop)."""
    _, _, height, width = image.shape
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    stride = max(1, crop * 2 // 3)
    rows = max(math.ceil((full_h - crop) / stride), 0) + 1
    cols = max(math.ceil((full_w - crop) / stride), 0) + 1
    logits = padded.new_zeros((1, num_labels, full_h, full_w))
    counts = padded.new_zeros((1, 1, full_h, full_w))
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * stride, full_h - crop), min(c * stride, full_w - crop)
            window = padded[:, :, top:top + crop, left:left + crop]
            logits[:, :, top:top + crop, left:left + crop] += model(pixel_values=window).logits
            counts[:, :, top:top + crop, left:left + crop] += 1
    return (logits / counts)[:, :, :height, :width]


def confusion_matrix(prediction: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(num_labels, num_labels) counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    keep = labels != IGNORE_INDEX
    index = labels[keep] * num_labels + prediction[keep]
    return torch.bincount(index, minlength=num_labels**2).reshape(num_labels, num_labels)


def iou_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """Mean IoU (%) over classes with a non-empty union, and pixel accuracy (%)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if not present.any():
        raise ValueError("no labelled pixels to score")
    iou = intersection[present] / union[present]
    pixel_accuracy = 100.0 * float(intersection.sum() / confusion.sum())
    return {"mean_iou": 100.0 * float(iou.mean()), "pixel_accuracy": pixel_accuracy}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, crop: int,
                          num_labels: int) -> dict[str, float]:
    model.eval()
    total = torch.zeros(num_labels, num_labels, dtype=torch.long, device=accelerator.device)
    images, unreadable = 0, 0
    for batch in loader:
        per_image = []
        for image, labels, valid in zip(batch["pixel_values"], batch["labels"], batch["valid"]):
            if valid:
                logits = sliding_window_logits(model, image.unsqueeze(0), crop, num_labels)
                per_image.append(confusion_matrix(logits.argmax(1)[0], labels, num_labels))
            else:
                per_image.append(total.new_zeros(num_labels, num_labels))
        gathered, valid = accelerator.gather_for_metrics((torch.stack(per_image), batch["valid"]))
        total += gathered.sum(0)
        images += int(valid.sum())
        unreadable += int((~valid).sum())
    return {**iou_from_confusion(total.cpu()), "num_samples": images, "num_unreadable": unreadable}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    shapes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(shapes) == 1:
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("pixel_values", "labels")}
    else:  # evaluation images of several sizes
        batch = {k: [s[k] for s in samples] for k in ("pixel_values", "labels")}
    batch["valid"] = torch.tensor([s["valid"] for s in samples], dtype=torch.bool)
    batch["skipped"] = torch.tensor(sum(s["skipped"] for s in samples), dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------------- the run
def train_segmentation(args: SegmentationArguments) -> dict[str, Any]:
    """Trains, evaluates every ``eval_steps`` (keeping the best model in ``output_dir``) and returns the results."""
    args.check()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=build_trackers(args.report_to, output_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_FOLDER)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    with hold_output_dir(accelerator, output_dir) as precision:
        set_seed(args.seed)
        model = upernet_from_mfm(args.model_name_or_path, num_labels=args.num_labels, image_size=args.crop_size,
                                 hidden_size=args.hidden_size, drop_path_rate=args.drop_path_rate)
        encoder_config, _ = build_mfm_config(args.model_name_or_path)  # for the encoder's normalisation
        mean, std = list(encoder_config.image_mean), list(encoder_config.image_std)
        train_set = ADE20KFolder(args.data_dir, args.train_split, train_transform(args.crop_size, mean, std),
                                 args.num_labels, args.reduce_labels, replace_unreadable=True)
        eval_set = ADE20KFolder(args.data_dir, args.validation_split, eval_transform(args.crop_size, mean, std),
                                args.num_labels, args.reduce_labels)
        unlisted = train_set.problems + eval_set.problems
        if unlisted:
            logger.warning("skipped %d folder entries that could not be listed or paired: %s", len(unlisted),
                           "; ".join(unlisted[:5]))
        if args.max_train_samples:
            train_set.pairs = train_set.pairs[:args.max_train_samples]
        if args.max_eval_samples:
            eval_set.pairs = eval_set.pairs[:args.max_eval_samples]
        train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
                                  drop_last=True, num_workers=args.dataloader_num_workers, collate_fn=_collate)
        eval_loader = DataLoader(eval_set, batch_size=1, num_workers=args.dataloader_num_workers, collate_fn=_collate)
        backbone_config = model.config.backbone_config
        optimizer = layer_decay_adamw(
            model, args.learning_rate, args.weight_decay, args.layer_decay, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            num_layers=getattr(backbone_config, "num_hidden_layers", None) or len(backbone_config.depths),
        )
        schedule = LearningRateSchedule(args.learning_rate, args.max_train_steps, args.warmup_steps, decay="linear")
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
        if len(train_loader) == 0:
            raise ValueError("the training split is smaller than one global batch")
        state = TrainerState()
        resume_run(accelerator, args, state, trajectory_settings(
            args, RUN_ONLY_ARGUMENTS, num_processes=accelerator.num_processes, mixed_precision=precision,
            schedule=asdict(schedule), model=config_settings(accelerator.unwrap_model(model).config),
        ))
        schedule.apply(optimizer, state.step)
        start_trackers(accelerator, args.project_name, args, num_processes=accelerator.num_processes,
                       mixed_precision=precision)

        # ---- the loop: optimizer steps, evaluations every eval_steps, checkpoints every checkpointing_steps
        progress = tqdm(total=args.max_train_steps, initial=state.step, desc="segmentation",
                        disable=not accelerator.is_local_main_process)
        sums = RunningSums(accelerator.device)
        epoch = state.step // len(train_loader)
        while state.step < args.max_train_steps:
            model.train()
            train_loader.set_epoch(epoch)
            skip = state.step - epoch * len(train_loader)  # a resumed epoch skips the batches it has done
            for batch in accelerator.skip_first_batches(train_loader, skip) if skip else train_loader:
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss {loss.item()} at step {state.step}")
                accelerator.backward(loss)
                clip_to_max_grad_norm(accelerator, model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                sums.add(loss, batch["skipped"])
                state.step += 1
                schedule.apply(optimizer, state.step)
                progress.update(1)
                if state.step % args.logging_steps == 0:
                    loss_value = sums.mean_loss(accelerator)
                    head_lr = max(group["lr"] for group in optimizer.param_groups)
                    accelerator.log({"train/loss": loss_value, "train/lr": head_lr}, step=state.step)
                    progress.set_postfix(loss=f"{loss_value:.4f}")
                if state.step % args.eval_steps == 0 or state.step == args.max_train_steps:
                    metrics = evaluate_segmentation(model, eval_loader, accelerator, args.crop_size, args.num_labels)
                    state.history.append({"step": state.step, **metrics})
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
                    logger.info("step %d: %s", state.step, metrics)
                    if not state.best or metrics["mean_iou"] > state.best["mean_iou"]:
                        state.best = {"step": state.step, **metrics}
                        with write_faults(output_dir, "the best model"):
                            accelerator.unwrap_model(model).save_pretrained(
                                output_dir, is_main_process=accelerator.is_main_process,
                                save_function=accelerator.save,
                            )
                            if accelerator.is_main_process:
                                segmentation_image_processor(args.crop_size, mean, std,
                                                             args.reduce_labels).save_pretrained(output_dir)
                    model.train()
                if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
                    state.skipped_images += sums.skipped_images(accelerator)
                    save_checkpoint(accelerator, output_dir / CHECKPOINTS_FOLDER, state.step, asdict(state),
                                    keep=args.checkpoints_total_limit)
                if state.step >= args.max_train_steps:
                    break
            epoch += 1
        progress.close()
        state.skipped_images += sums.skipped_images(accelerator)

        # ---- the outputs: results, the push
        results = {"global_step": state.step, "best": state.best, "history": state.history,
                   "skipped_images": state.skipped_images, "unlisted_entries": len(unlisted),
                   "settings_changes": state.settings_changes,
                   "arguments": {k: v for k, v in asdict(args).items() if not k.endswith("token")}}
        if accelerator.is_main_process:
            if state.skipped_images:
                logger.warning("skipped %d unreadable training pairs", state.skipped_images)
            write_json(output_dir / RESULTS_FILE, results)
            if args.push_to_hub and state.best:
                card = render_segmentation_card(
                    args.hub_model_id, accelerator.unwrap_model(model).config, Path(args.data_dir).resolve().name,
                    state.best, training_details=_training_details(args, state, precision),
                )
                url = publish_folder(output_dir, args.hub_model_id, card=card, private=args.hub_private_repo,
                                     token=args.hub_token, commit_message="Upload MFM UperNet segmentation model",
                                     local_dir=args.hub_local_dir)
                logger.info("pushed to %s", url)
        accelerator.wait_for_everyone()
        return results


def _training_details(args: SegmentationArguments, state: TrainerState, precision: str) -> dict[str, Any]:
    """The model card's table of what ran."""
    return {
        "encoder": args.model_name_or_path, "optimizer steps": state.step, "crop size": args.crop_size,
        "batch size per process": args.per_device_train_batch_size, "peak learning rate": args.learning_rate,
        "layer decay": args.layer_decay, "weight decay": args.weight_decay, "warmup steps": args.warmup_steps,
        "gradient clipping (max_grad_norm)": describe_clipping(args.max_grad_norm),
        "drop path": args.drop_path_rate, "mixed precision": precision,
        "skipped unreadable training pairs": state.skipped_images,
    }
