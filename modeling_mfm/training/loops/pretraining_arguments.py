"""Command-line arguments of pre-training: a dataclass read by transformers' ``HfArgumentParser``, plus one flag per
`MFMConfig` field, generated from the config class so that new fields become flags without editing this file.

Defaults that depend on the kind of run are left as None here and filled in by `resolve_defaults`: the official
recipe (ViT-B/16, 300 epochs, batch 128 per device, base lr 3e-4) when data is given, and the embedded demo (a small
ViT on the photos bundled with scikit-image, a few minutes on a laptop CPU) when no data argument is given.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ...cli import ScriptArgumentParser
from ...configuration_mfm import MFMConfig, official_mask_radius
from ..evaluation.representation_monitor import MonitorArguments
from ..models.model_factory import config_fields
from ..run.run_folder import RunFolderArguments

__all__ = [
    "COMPILE_MODES",
    "DEMO_DEFAULTS",
    "DEMO_MODEL_OVERRIDES",
    "OFFICIAL_DEFAULTS",
    "PretrainingArguments",
    "build_argument_parser",
    "config_override_dataclass",
    "is_demo_run",
    "parse_arguments",
    "parse_backbone_overrides",
    "parse_config_overrides",
    "resolve_defaults",
]

# torch.compile's modes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The official MFM ViT pre-training recipe (the official code's ViT-B/16 configuration).
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "preset": "mfm-vit-base",
    "output_dir": "mfm-pretrain",
    "per_device_train_batch_size": 128,
    "num_train_epochs": 300.0,
    "warmup_epochs": 20.0,
    "base_learning_rate": 3e-4,
    "logging_steps": 50,
    "checkpointing_steps": 1000,
    "visualization_steps": 2000,
}

# The embedded demo: a ViT-Tiny-width encoder (6 layers) at 64x64 on random crops of the scikit-image photos;
# learns visibly in a few minutes on 2 CPU cores. The mask radius keeps the official radius / image size ratio.
DEMO_DEFAULTS: dict[str, Any] = {
    "preset": "mfm-vit-tiny",
    "output_dir": "mfm-pretrain-demo",
    "per_device_train_batch_size": 32,
    "max_train_steps": 400,
    "warmup_ratio": 0.05,
    "base_learning_rate": 1.6e-2,  # peak lr 1e-3 at batch 32 (lr = base_lr * 32 / 512)
    "logging_steps": 10,
    "checkpointing_steps": 200,
    "visualization_steps": 100,
    "cpu_threads": 0,  # all cores: `accelerate launch` without a config sets OMP_NUM_THREADS=1
}
DEMO_MODEL_OVERRIDES: dict[str, Any] = {
    "image_size": 64,
    "mask_radius": official_mask_radius(64),
    "backbone_overrides": {"num_hidden_layers": 6, "patch_size": 8},
}


@dataclass
class PretrainingArguments(MonitorArguments, RunFolderArguments):
    """Everything but the MFMConfig fields. Help strings double as documentation (``--help``)."""

    _argument_group_name = "pre-training"

    # ---- model
    preset: str | None = field(
        default=None,
        metadata={"help": "Preset name (see MFMConfig.available_presets()), e.g. mfm-vit-base. Default: mfm-vit-base, "
                          "or mfm-vit-tiny (6 layers, patch 8, 64x64) for the embedded demo."},
    )
    config_file: str | None = field(default=None, metadata={"help": "An MFMConfig JSON file (instead of --preset)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved MFMForPreTraining (folder or Hub id) to continue training from."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'JSON object of MFMConfig fields, as in run_finetune.py, e.g. \'{"image_size": 32, '
                          '"backbone_overrides": {"patch_size": 4}}\'; the per-field flags (--image_size...) and '
                          '--backbone_overrides win over it.'},
    )
    backbone_overrides: str | None = field(
        default=None, metadata={"help": 'JSON dict of backbone config fields, e.g. \'{"num_hidden_layers": 6}\'.'}
    )
    # ---- data
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (imagefolder layout)."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local data file or quoted glob pattern: parquet, arrow, CSV or JSON lines (images as an "
                          "Image column, bytes or paths; paths relative to the file's folder)."},
    )
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "The image column; detected (first Image feature) when not given."}
    )
    validation_split_size: int | None = field(
        default=None,
        metadata={"help": "Leave out the validation slice that fine-tuning holds out of the same data: this many rows, "
                          "stratified by label, drawn with --validation_split_seed (same rows as run_finetune.py)."},
    )
    validation_split_percentage: float | None = field(
        default=None, metadata={"help": "As --validation_split_size, as a percentage of the rows."}
    )
    validation_split_seed: int | None = field(
        default=None, metadata={"help": "Seed of the left-out slice (default: --seed)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column for the left-out slice's stratification (default: detected)."}
    )
    dataset_on_device: bool = field(
        default=False,
        metadata={"help": "Small images: decode the dataset once into a uint8 tensor on the training device and crop, "
                          "resize and flip batches there (see modeling_mfm.training.data.device_dataset)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it (sharded across processes with "
                          "split_dataset_by_node; needs --max_train_steps)."},
    )
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "Shuffle buffer of --streaming."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N images."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches downloads."})
    crop_min_scale: float = field(
        default=0.2, metadata={"help": "Smallest crop area fraction of RandomResizedCrop (official 0.2)."}
    )
    jpeg_draft: bool = field(
        default=True,
        metadata={"help": "Decode JPEGs at reduced size (1/2, 1/4, 1/8) when the crop is downscaled anyway; crop "
                          "geometry is unchanged. --no_jpeg_draft decodes at full size."},
    )
    decode_on_device: bool = field(
        default=False,
        metadata={"help": "Decode RGB JPEGs on the accelerator (torchvision.io.decode_jpeg: nvJPEG on CUDA), with "
                          "crop, resize and flip there too; workers only read files and draw the crops. Other "
                          "images take the CPU path. For hosts whose CPUs cannot keep up with the GPU."},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Workers per process (default: the CPU cores per process minus one; at most 32, at most 8 "
                          "when training on the CPU, whose cores also run the step)."},
    )
    dataloader_prefetch_factor: int = field(default=4, metadata={"help": "Batches prefetched by each worker."})
    # ---- optimisation
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Batch per device and step (official 128; demo 32)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs (official 300)."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps; overrides --num_train_epochs (demo 400)."}
    )
    base_learning_rate: float | None = field(
        default=None,
        metadata={"help": "lr = base_learning_rate * total_batch / 512, total_batch = per-device batch x processes x "
                          "accumulation steps (official base 3e-4)."},
    )
    warmup_lr: float = field(default=2.5e-7, metadata={"help": "Base lr at the start of warmup, scaled like the lr."})
    min_lr: float = field(default=2.5e-6, metadata={"help": "Base lr at the end of the cosine, scaled like the lr."})
    warmup_epochs: float | None = field(default=None, metadata={"help": "Linear warmup epochs (official 20)."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Warmup in optimizer steps; overrides --warmup_ratio and --warmup_epochs."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Warmup as a fraction of the training steps; overrides --warmup_epochs. Default: "
                          "warmup_epochs / num_train_epochs (the official 20/300) for step-based runs, 0.05 for the "
                          "demo."},
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (none on biases, norms, position embeddings, CLS)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=3.0, metadata={"help": "Gradient clipping norm (0 = no clipping)."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={"help": "Mixed precision through Accelerate (fp16 uses loss scaling; the official runs used "
                          "fp16). Default: the accelerate config / launch flag."},
    )
    max_nonfinite_retries: int | None = field(
        default=None,
        metadata={"help": "Consecutive non-finite losses tolerated before stopping (default 0; 20 with fp16, where "
                          "the grad scaler skips the step and lowers the loss scale)."},
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model (torch.compile via Accelerate)."})
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str = field(
        default="default",
        metadata={"help": "torch.compile mode; reduce-overhead replays CUDA graphs, which helps steps whose kernels "
                          "run faster than Python launches them (ResNet-50 on a fast GPU).", "choices": COMPILE_MODES},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    fast_paths: bool = field(
        default=True,
        metadata={"help": "Apply modeling_mfm.fast_paths (GEMM patch embedding and decoder head, mask-free SDPA, fused "
                          "QKV on CUDA...; the same function, faster). --no_fast_paths runs the stock model."},
    )
    bf16_residual_stream: bool = field(
        default=False,
        metadata={"help": "ViT encoders with --mixed_precision bf16: keep the residual stream in bf16 instead of "
                          "float32: faster, but it departs from the official recipe and in small runs trained "
                          "slightly worse (the trade-off: docs/performance.md)."},
    )
    cudnn_benchmark: bool = field(
        default=True,
        metadata={"help": "On CUDA, let cuDNN time its convolution algorithms for the run's input shape and keep the "
                          "fastest (torch.backends.cudnn.benchmark, as the official code); --no_cudnn_benchmark keeps "
                          "its heuristic choice."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order, crops and masks."})
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "Torch threads per process when training on the CPU (0 = the available cores divided by the "
                          "local processes). Default: as launched (`accelerate launch` sets 1 thread unless given "
                          "--num_cpu_threads_per_process); the embedded demo uses 0."},
    )
    # ---- outputs, checkpoints, logging
    output_dir: str | None = field(
        default=None, metadata={"help": "Output folder (default mfm-pretrain; demo mfm-pretrain-demo)."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the training state every N optimizer steps (0 = never)."}
    )
    save_every_epoch: bool = field(default=False, metadata={"help": "Also save the training state after each epoch."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep only the newest K checkpoints."})
    logging_steps: int | None = field(default=None, metadata={"help": "Log metrics every N steps."})
    visualization_steps: int | None = field(
        default=None, metadata={"help": "Save a reconstruction picture every N steps (0 = only at start and end)."}
    )
    num_visualization_images: int = field(default=4, metadata={"help": "Images in the reconstruction picture."})
    report_to: Literal["tensorboard", "wandb", "all", "none"] = field(
        default="tensorboard", metadata={"help": "Experiment trackers (metrics also go to logs/metrics.jsonl)."}
    )
    project_name: str = field(default="mfm-pretrain", metadata={"help": "Tracker project name."})
    # ---- hub
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository 'user/name' for --push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_local_dir: str | None = field(
        default=None,
        metadata={"help": "Dry run of --push_to_hub: publish into this local folder instead of the Hub."},
    )


def _field_help(name: str, docstring: str) -> str:
    """The first line documenting ``name`` in MFMConfig's docstring."""
    match = re.search(rf"^\s*(?:[\w, ]*\b)?{re.escape(name)}\b[^:\n]*:\s*(.*)$", docstring, flags=re.MULTILINE)
    text = match.group(1).strip() if match else ""
    return f"MFMConfig.{name}. {text}".strip()


def config_override_dataclass() -> type:
    """A dataclass with one optional field per MFMConfig field (except ``backbone_config``), default None meaning
    "keep the model's value"; `HfArgumentParser` turns it into flags such as ``--mask_radius 24``."""
    docstring = MFMConfig.__doc__ or ""
    fields = []
    for name, annotation in config_fields().items():
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if args else annotation
        fields.append((name, base | None, field(default=None, metadata={"help": _field_help(name, docstring)})))
    return dataclasses.make_dataclass(
        "MFMConfigOverrides", fields, namespace={"_argument_group_name": "MFMConfig overrides"}
    )


def build_argument_parser() -> ScriptArgumentParser:
    return ScriptArgumentParser(
        (PretrainingArguments, config_override_dataclass()), prog="run_pretrain.py",
        description="Masked Frequency Modeling pre-training with Accelerate. With no data argument it runs the "
                    "embedded demo (photos bundled with scikit-image); otherwise it follows the official recipe.",
    )


def parse_arguments(argv: list[str] | None = None) -> tuple[PretrainingArguments, dict[str, Any]]:
    """Parses the command line into the arguments and the MFMConfig overrides that were actually given."""
    parser = build_argument_parser()
    args, overrides = parser.parse_args_into_dataclasses(argv)
    given = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    return args, given


def is_demo_run(args: PretrainingArguments) -> bool:
    """True when no data source is given: the script then runs the embedded demo."""
    return args.dataset_name is None and args.train_dir is None and args.train_file is None


def resolve_defaults(args: PretrainingArguments) -> PretrainingArguments:
    """Fills the unset run-dependent fields from `DEMO_DEFAULTS` or `OFFICIAL_DEFAULTS` (a new object)."""
    defaults = DEMO_DEFAULTS if is_demo_run(args) else OFFICIAL_DEFAULTS
    changes = {}
    for name, value in defaults.items():
        if getattr(args, name) is not None:
            continue
        if name == "preset" and (args.config_file or args.model_name_or_path):
            continue
        changes[name] = value
    return dataclasses.replace(args, **changes)


def _json_object(name: str, text: str | None) -> dict[str, Any]:
    """The JSON object of the flag ``name`` (empty when not given); a clear error for anything else."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


def parse_backbone_overrides(text: str | None) -> dict[str, Any]:
    """``--backbone_overrides`` JSON -> dict (a clear error for anything else)."""
    return _json_object("backbone_overrides", text)


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """``--config_overrides`` JSON -> dict of MFMConfig fields, ``backbone_overrides`` (a dict) among them; unknown
    fields are refused here, as their flags would be."""
    values = _json_object("config_overrides", text)
    unknown = sorted(set(values) - set(config_fields()) - {"backbone_overrides"})
    if unknown:
        raise ValueError(f"config_overrides: unknown MFMConfig fields {unknown}")
    if not isinstance(values.get("backbone_overrides", {}), dict):
        raise ValueError(f"config_overrides: backbone_overrides must be a JSON object, got {text!r}")
    return values
