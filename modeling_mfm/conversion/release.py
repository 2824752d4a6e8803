"""The official MFM releases: their catalogue (checkpoints, published ImageNet-1K results) and their model cards.

A converted release folder is what ``save_pretrained`` writes, the native encoder in ``backbone/`` and the card from
`release_card`; `publishing.hub.publish_folder` publishes it (``run_scripts/release.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..configuration_mfm import MFMConfig
from ..publishing.folder_layout import MODEL_CARD_FILE
from ..publishing.model_card import render_model_card
from .imagenet import imagenet_labels

__all__ = [
    "HUB_NAMESPACE",
    "OFFICIAL_LICENSE",
    "OFFICIAL_RELEASES",
    "OfficialRelease",
    "generic_card",
    "release_card",
    "release_config",
    "write_card",
    "write_release_cards",
]

# Hub organisation that hosts the converted official checkpoints.
HUB_NAMESPACE = "modeling-mfm"
OFFICIAL_REPO = "https://github.com/Jiahao000/MFM"
# The official weights are released under the S-Lab License 1.0 (non-commercial).
OFFICIAL_LICENSE = {
    "license": "other",
    "license_name": "s-lab-license-1.0",
    "license_link": f"{OFFICIAL_REPO}/blob/HEAD/LICENSE",
}
IMAGENET_1K = {"dataset": "imagenet-1k", "dataset_name": "ImageNet-1K", "split": "validation"}
BACKBONE_SUBFOLDER = "backbone"


@dataclass(frozen=True)
class OfficialRelease:
    """One official checkpoint (github.com/Jiahao000/MFM, ImageNet-1K) and where it goes on the Hub.

    ``top1`` lists the published ImageNet-1K top-1 accuracies (%) with their fine-tuning epochs; for a pre-trained
    encoder they are the results of fine-tuning it.
    """

    name: str
    preset: str
    task: str  # "pretraining" or "classification"
    checkpoint_url: str
    top1: tuple[tuple[int, float], ...]  # (fine-tuning epochs, top-1 %)
    base: str | None = None  # for classifiers: the pre-trained release they were fine-tuned from

    @property
    def is_vit(self) -> bool:
        return self.preset.startswith("mfm-vit")


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


def _catalogue() -> dict[str, OfficialRelease]:
    # (pre-train name, preset, pre-trained file, [(fine-tune epochs, top-1, fine-tuned file, classifier name)])
    rows = [
        ("mfm-vit-base", "mfm-vit-base", "1qgMuODAxAapwXZXbH2Bgo5s5O_zc1bdl",
         [(100, 83.1, "1uxYn_q3BA0J5XlUMSnf8c2uQfLA0bkJo", "mfm-vit-base-ft-in1k")]),
        ("mfm-vit-base-sr", "mfm-vit-base-sr", "1NvysdzymzbuIT5BlhczLy5qZJ7wL4dbO",
         [(100, 82.4, "12a7w7t0weJO2wpuMYfFn0DTwYCk5DK1o", "mfm-vit-base-sr-ft-in1k")]),
        ("mfm-vit-base-deblur", "mfm-vit-base-deblur", "1dvKolr_Xgp-eNwlHmzl0aULofknnOshS",
         [(100, 81.7, "1mK7ViXL_o3bRVHR21zvSFdkU-iuWBlmy", "mfm-vit-base-deblur-ft-in1k")]),
        ("mfm-vit-base-denoise", "mfm-vit-base-denoise", "1gfyWJEeK-7iBI64YRGTE_Lna_gzTs8rG",
         [(100, 82.7, "1CAv-a_75S-7p0jaiWUDv2ZSo1QYcVcSR", "mfm-vit-base-denoise-ft-in1k")]),
        ("mfm-resnet50", "mfm-resnet50", "1rWXMJryJ2tq44EYfkZ8GREQoYLf1up9e",
         [(100, 78.5, "1qr_kMb7bDEP1hwYD-bJ5mG7Co7KYlQSq", "mfm-resnet50-ft-in1k"),
          (300, 80.1, "1Uftl6c33gngKzWEj2c9ewmWGFBvGYgMo", "mfm-resnet50-ft-in1k-300ep")]),
        ("mfm-resnet50-sr", "mfm-resnet50-sr", "1_rpcvWJt3yHQYHdE3m5mCldUGH1S73EI",
         [(100, 77.9, "1hIdAApYD7sVb-qf3WA_3KaJMCJKUk25T", "mfm-resnet50-sr-ft-in1k")]),
        ("mfm-resnet50-deblur", "mfm-resnet50-deblur", "174Bcn-oPm6IB9h6RDB8Ujkr92tRC_vqK",
         [(100, 78.0, "1ThCmH-Vmh9S6PBuXrv5XAMY04mpOAqJ1", "mfm-resnet50-deblur-ft-in1k")]),
        ("mfm-resnet50-denoise", "mfm-resnet50-denoise", "18MulyHunviyRrSIJFJhp8bfcamjr55-w",
         [(100, 77.5, "18v7RrSsJp1lxXeKaZczuwUmm0OY59HJf", "mfm-resnet50-denoise-ft-in1k")]),
    ]
    releases: dict[str, OfficialRelease] = {}
    for name, preset, file_id, finetuned in rows:
        releases[name] = OfficialRelease(
            name, preset, "pretraining", _drive(file_id), tuple((epochs, top1) for epochs, top1, _, _ in finetuned)
        )
        for epochs, top1, ft_file, ft_name in finetuned:
            releases[ft_name] = OfficialRelease(
                ft_name, preset, "classification", _drive(ft_file), ((epochs, top1),), base=name
            )
    return releases


OFFICIAL_RELEASES: dict[str, OfficialRelease] = _catalogue()

_PRETRAINING_DETAILS = {
    "data": "ImageNet-1K training set (1.28M images), no labels",
    "epochs": 300,
    "optimizer": "AdamW, betas (0.9, 0.95), weight decay 0.05 (none on biases, norms, position embedding, CLS token)",
    "learning rate": "3e-4 x total batch / 512, 20 warm-up epochs from 2.5e-7, cosine decay to 2.5e-6",
    "batch size": "2048 (128 per GPU on 16 GPUs)",
    "gradient clipping": "max norm 3.0",
    "augmentation": "RandomResizedCrop 224 (scale 0.2-1, bicubic), horizontal flip",
    "precision": "mixed precision (fp16)",
}
_VIT_FINETUNE_DETAILS = {
    "data": "ImageNet-1K training set, 1000 classes",
    "optimizer": "AdamW, weight decay 0.05, layer-wise learning-rate decay 0.8",
    "learning rate": "2e-3 x total batch / 512, 5 warm-up epochs, cosine decay to 2.5e-7",
    "regularisation": "drop path 0.1, label smoothing 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25",
    "augmentation": "RandomResizedCrop 224, RandAugment rand-m9-mstd0.5-inc1, no colour jitter",
    "head": "mean of the patch tokens, LayerNorm, linear classifier",
}
_RESNET_FINETUNE_DETAILS = {
    "data": "ImageNet-1K training set, 1000 classes",
    "recipe": "timm's ImageNet training script, as in the official repository",
    "head": "global average pooling, linear classifier",
}


def release_config(name: str) -> MFMConfig:
    """The MFMConfig of an official release (the converter produces the same one from the file)."""
    release = _release(name)
    if release.task == "pretraining":
        return MFMConfig.from_preset(release.preset)
    labels = imagenet_labels()
    overrides = {"backbone_overrides": {"use_mean_pooling": True}} if release.is_vit else {}
    return MFMConfig.from_preset(
        release.preset,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **overrides,
    )


def _release(name: str) -> OfficialRelease:
    if name not in OFFICIAL_RELEASES:
        raise ValueError(f"unknown release {name!r}; known: {', '.join(sorted(OFFICIAL_RELEASES))}")
    return OFFICIAL_RELEASES[name]


def release_card(
    name: str, config: MFMConfig | None = None, repo_id: str | None = None, namespace: str = HUB_NAMESPACE
) -> str:
    """The model card of an official release (``repo_id`` defaults to ``namespace/name``)."""
    release = _release(name)
    repo_id = repo_id or f"{namespace}/{release.name}"
    config = config if config is not None else release_config(name)
    namespace = repo_id.split("/")[0]
    results = [
        {
            "task": "image-classification",
            **IMAGENET_1K,
            "metric": "accuracy",
            "name": f"top-1 ({epochs}-epoch fine-tuning)" if release.task == "pretraining" else "top-1",
            "value": top1,
        }
        for epochs, top1 in release.top1
    ]
    if release.task == "pretraining":
        details = dict(_PRETRAINING_DETAILS)
        details["pretext"] = {
            "mfm": f"frequency masking, radius {config.mask_radius:g}, low-pass probability "
            f"{config.low_pass_probability:g}",
            "sr": f"super-resolution, x{config.sr_factor} bicubic",
            "deblur": "deblurring, random blur kernels",
            "denoise": "denoising, Gaussian or Poisson noise",
        }[config.corruption]
        kind = "pre-trained"
    else:
        details = dict(_VIT_FINETUNE_DETAILS if release.is_vit else _RESNET_FINETUNE_DETAILS)
        details = {"epochs": release.top1[0][0], **details}
        kind = "fine-tuned"
    base_model = f"{namespace}/{release.base}" if release.base else None
    provenance = (
        f"These are the authors' {kind} weights from the [official MFM release]({OFFICIAL_REPO}) "
        f"([original checkpoint]({release.checkpoint_url})), converted with `run_scripts/convert_original.py`, "
        "which refuses to write a model whose outputs differ from an independent re-computation of the official "
        "forward pass (relative error above 1e-5). The published numbers below are the authors'."
    )
    return render_model_card(
        repo_id,
        config,
        task=release.task,
        **OFFICIAL_LICENSE,
        datasets=["imagenet-1k"],
        results=results,
        training_details=details,
        base_model=base_model,
        backbone_subfolder=BACKBONE_SUBFOLDER,
        provenance=provenance,
    )


def generic_card(repo_id: str, config: MFMConfig, task: str) -> str:
    """The card of a converted official checkpoint that is not in the catalogue: official licence, no results."""
    return render_model_card(
        repo_id,
        config,
        task=task,
        **OFFICIAL_LICENSE,
        datasets=["imagenet-1k"],
        backbone_subfolder=BACKBONE_SUBFOLDER,
        provenance=f"Converted from an official checkpoint of the [MFM release]({OFFICIAL_REPO}).",
    )


def write_card(folder: str | os.PathLike, card: str) -> Path:
    """Writes ``card`` as the folder's README.md (the Hub's model card)."""
    path = Path(folder) / MODEL_CARD_FILE
    path.write_text(card, encoding="utf-8")
    return path


def write_release_cards(output_dir: str | os.PathLike, namespace: str = HUB_NAMESPACE) -> list[Path]:
    """Writes ``<name>.md`` for every official release; returns the paths (sorted by name)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in sorted(OFFICIAL_RELEASES):
        path = output_dir / f"{name}.md"
        path.write_text(release_card(name, namespace=namespace), encoding="utf-8")
        paths.append(path)
    return paths
