"""Hub model cards for MFM checkpoints: one template for the converted official releases and for new runs.

``render_model_card`` returns the README.md text: YAML metadata built with huggingface_hub's ``ModelCardData`` /
``EvalResult`` (so ``model-index`` follows the Hub schema), then a Markdown body describing the model from its
``MFMConfig``: what MFM is, intended use and limits, how to load it with this package or with
``trust_remote_code=True``, how to fine-tune it, training details, results and the citation. The output depends only
on the arguments (no dates, no versions), so checked-in cards can be regenerated and compared byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

__all__ = ["CITATION", "INSTALL_COMMAND", "render_model_card", "render_segmentation_card"]

TASKS = {"pretraining": "image-feature-extraction", "classification": "image-classification"}

# How a reader gets the `modeling_mfm` package.
INSTALL_COMMAND = "pip install masked-frequency-modeling"

CITATION = """@inproceedings{xie2023masked,
  title     = {Masked Frequency Modeling for Self-Supervised Visual Pre-Training},
  author    = {Xie, Jiahao and Li, Wei and Zhan, Xiaohang and Liu, Ziwei and Ong, Yew Soon and Loy, Chen Change},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023},
  url       = {https://arxiv.org/abs/2206.07706}
}"""

_INTRO = (
    "Masked Frequency Modeling (MFM; Xie et al., ICLR 2023, [arXiv 2206.07706](https://arxiv.org/abs/2206.07706)) "
    "is a self-supervised way to pre-train an image encoder. Each training image is taken to the frequency domain "
    "with a 2-D FFT; a circular filter then deletes either its high frequencies (a low-pass view) or its low "
    "frequencies (a high-pass view). The encoder sees only the filtered image and a small decoder has to predict "
    "the original; the error is measured between spectra, on the frequencies that were deleted. Nothing else is "
    "needed: no mask tokens, no extra data, no teacher network. The paper also casts super-resolution, deblurring "
    "and denoising as pretexts in the same frame."
)

_PRETEXTS = {
    "mfm": "frequency masking (MFM)",
    "sr": "super-resolution",
    "deblur": "deblurring",
    "denoise": "denoising",
}

_RESULT_KEYS = ("task", "dataset", "metric", "value")
_LICENSE_TITLES = {"s-lab-license-1.0": "S-Lab License 1.0"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


_VIT_NAMES = {(384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L"}


def _is_resnet50(backbone: Any) -> bool:
    return (
        backbone.layer_type == "bottleneck"
        and list(backbone.depths) == [3, 4, 6, 3]
        and list(backbone.hidden_sizes) == [256, 512, 1024, 2048]
    )


def _encoder_name(config: Any) -> str:
    """Short name: "ViT-B/16", "ResNet-50", else the family with its size."""
    backbone = config.backbone_config
    kind = backbone.model_type
    if kind in ("beit", "vit"):
        name = _VIT_NAMES.get((backbone.hidden_size, backbone.num_hidden_layers))
        if name:
            return f"{name}/{backbone.patch_size}"
        return f"ViT ({backbone.num_hidden_layers} layers, width {backbone.hidden_size})"
    if kind == "resnet":
        return "ResNet-50" if _is_resnet50(backbone) else f"ResNet (stage depths {list(backbone.depths)})"
    return f"{kind} (stage depths {list(backbone.depths)})"


def _encoder_description(config: Any) -> str:
    backbone = config.backbone_config
    kind = backbone.model_type
    if kind in ("beit", "vit"):
        style = "BEiT-style ViT (q and v biases, no k bias, absolute position embeddings)" if kind == "beit" else "ViT"
        return (
            f"{style}: {backbone.num_hidden_layers} layers, width {backbone.hidden_size}, "
            f"{backbone.num_attention_heads} heads, MLP {backbone.intermediate_size}, "
            f"patch {backbone.patch_size}x{backbone.patch_size}"
        )
    if kind == "resnet":
        return (
            f"{'ResNet-50' if _is_resnet50(backbone) else 'ResNet'} ({backbone.layer_type} blocks, timm layout): "
            f"stage depths {list(backbone.depths)}, "
            f"widths {list(backbone.hidden_sizes)}"
        )
    return f"{kind}: stage depths {list(backbone.depths)}, widths {list(backbone.hidden_sizes)}"


def _pretext_description(config: Any) -> str:
    if config.corruption == "mfm":
        outer = "" if config.mask_outer_radius is None else f" and outer radius {_fmt(config.mask_outer_radius)}"
        return (
            f"frequency masking: per image a low-pass filter (probability {_fmt(config.low_pass_probability)}) or a "
            f"high-pass filter, radius {_fmt(config.mask_radius)}{outer} on the centred spectrum"
        )
    if config.corruption == "sr":
        return f"super-resolution: bicubic down-sampling by {config.sr_factor} and back up"
    if config.corruption == "deblur":
        return "deblurring: random blur kernels (isotropic, anisotropic, generalised, plateau and sinc)"
    return "denoising: random Gaussian or Poisson noise"


def _architecture_table(config: Any, task: str) -> list[str]:
    mean, std = _fmt(list(config.image_mean)), _fmt(list(config.image_std))
    rows = [
        ("Encoder", _encoder_description(config)),
        ("Input", f"{config.image_size}x{config.image_size} RGB, normalised with mean {mean} and std {std}"),
    ]
    if task == "pretraining":
        rows.append(("Pretext", _pretext_description(config)))
        if config.decoder_depth > 0:
            decoder = (
                f"transformer decoder: {config.decoder_depth} blocks, width {config.decoder_hidden_size}, "
                f"{config.decoder_num_attention_heads} heads, then 1x1 convolution + "
                f"PixelShuffle({config.encoder_stride})"
            )
        else:
            decoder = f"1x1 convolution + PixelShuffle({config.encoder_stride})"
        rows.append(("Decoder", decoder))
        loss = "removed frequencies only" if config.loss_on == "masked" else "all frequencies"
        rows.append(("Loss", f"frequency loss (focal-frequency style) on the {loss}"))
    else:
        pooling = "LayerNorm of the mean patch token" if config.is_vit else "global average pooling"
        rows.append(("Head", f"{pooling}, then a linear layer to {config.num_labels} classes"))
    return ["| | |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]


def _eval_results(results: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    converted = []
    for i, result in enumerate(results):
        missing = [k for k in _RESULT_KEYS if k not in result]
        if missing:
            raise ValueError(f"results[{i}] needs the keys {list(_RESULT_KEYS)}; missing {missing}")
        converted.append(
            EvalResult(
                task_type=result["task"],
                dataset_type=result["dataset"],
                dataset_name=result.get("dataset_name", result["dataset"]),
                dataset_split=result.get("split"),
                metric_type=result["metric"],
                metric_name=result.get("name"),
                metric_value=result["value"],
            )
        )
    return converted


def _usage(repo_id: str, config: Any, task: str, backbone_subfolder: str | None) -> list[str]:
    size = config.image_size
    if task == "pretraining":
        package = [
            "```python",
            "import torch",
            "from modeling_mfm import MFMForPreTraining, MFMModel",
            "",
            f'model = MFMModel.from_pretrained("{repo_id}")  # the encoder',
            f"pixel_values = torch.randn(1, 3, {size}, {size})  # normalised as the image processor does",
            "features = model(pixel_values).last_hidden_state",
            "",
            f'pretrainer = MFMForPreTraining.from_pretrained("{repo_id}")  # encoder + decoder + frequency loss',
            "out = pretrainer(pixel_values)  # out.loss, out.reconstruction, out.corrupted_pixel_values",
            "```",
        ]
        remote = [
            "```python",
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)',
            'features = model(**processor(images=image, return_tensors="pt")).last_hidden_state',
            "```",
        ]
    else:
        package = [
            "```python",
            "from transformers import AutoImageProcessor",
            "from modeling_mfm import MFMForImageClassification",
            "",
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            f'model = MFMForImageClassification.from_pretrained("{repo_id}")',
            'logits = model(**processor(images=image, return_tensors="pt")).logits',
            "print(model.config.id2label[logits.argmax(-1).item()])",
            "```",
        ]
        remote = [
            "```python",
            "from transformers import pipeline",
            "",
            f'classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)',
            'classifier("image.jpg")',
            "```",
        ]
    lines = [
        "## How to use",
        "",
        f"With this package installed (`{INSTALL_COMMAND}`):",
        "",
        *package,
        "",
        "With transformers alone, the model code ships with the checkpoint (`trust_remote_code=True`):",
        "",
        *remote,
    ]
    if backbone_subfolder:
        lines += [
            "",
            f"The encoder is also stored as a native transformers model in `{backbone_subfolder}/`, which needs no "
            "custom code at all:",
            "",
            "```python",
            "from transformers import AutoModel",
            "",
            f'encoder = AutoModel.from_pretrained("{repo_id}", subfolder="{backbone_subfolder}")',
            "```",
        ]
    return lines


def _intended_use(task: str, license: str, license_name: str | None) -> list[str]:
    if task == "pretraining":
        uses = [
            "- Intended use: initialising image classification, detection or segmentation models by fine-tuning, "
            "and extracting image features. The pre-trained encoder is not a classifier by itself.",
            "- The decoder and its reconstructions exist to train the encoder; they are not a restoration model and "
            "their images are not meant to be looked at as results.",
        ]
    else:
        uses = [
            "- Intended use: classifying images into the label set of its training data, and as a starting point "
            "for fine-tuning on other image tasks.",
            "- It predicts only the classes it was trained on, and its accuracy drops on images unlike its training "
            "distribution (resolution, domain, corruptions).",
        ]
    uses.append(
        "- The training images carry the biases of their dataset (for ImageNet-1K: its object-centric photographs, "
        "class choice and label noise); check behaviour on your own data before relying on it."
    )
    if license == "other" and license_name:
        uses.append(
            f"- The weights are released under the {_LICENSE_TITLES.get(license_name, license_name)} (see the "
            "license link in the metadata), which does not allow commercial use."
        )
    return uses


def render_model_card(
    repo_id: str,
    config: Any,
    task: str = "pretraining",
    license: str = "apache-2.0",
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | None = None,
    results: list[dict] | None = None,
    training_details: dict | None = None,
    images: list[str] | None = None,
    extra_tags: list[str] | None = None,
    description: str | None = None,
    *,
    base_model: str | None = None,
    backbone_subfolder: str | None = None,
    provenance: str | None = None,
) -> str:
    """The README.md (YAML metadata + Markdown) of an MFM checkpoint on the Hub.

    Args:
        repo_id: "namespace/name" on the Hub; used in the loading snippets and as the model-index name.
        config: the checkpoint's `MFMConfig` (describes encoder, input, pretext, decoder or head).
        task: "pretraining" (pipeline tag image-feature-extraction) or "classification" (image-classification).
        license, license_name, license_link: Hub license metadata; `license="other"` needs name and link.
        datasets: Hub dataset ids the model was trained on (e.g. ["imagenet-1k"]).
        results: entries like ``{"task": "image-classification", "dataset": "imagenet-1k", "metric": "accuracy",
            "name": "top-1", "value": 83.1}`` (optional "dataset_name", "split"), written as the model-index.
        training_details: setting -> value, shown as a table.
        images: paths (relative to the repo) or URLs of pictures to show, e.g. reconstructions.
        extra_tags: Hub tags besides the default ones.
        description: replaces the introduction paragraph about MFM.
        base_model: Hub id of the checkpoint this one was fine-tuned from.
        backbone_subfolder: where the repo stores the native transformers encoder (`export_backbone`), if it does.
        provenance: a paragraph on where the weights come from (e.g. the official release they were converted from).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'namespace/name', got {repo_id!r}")
    if license == "other" and not (license_name and license_link):
        raise ValueError("license='other' needs license_name and license_link (Hub metadata rule)")
    backbone_type = config.backbone_config.model_type
    tags = ["vision", "self-supervised-learning", "masked-frequency-modeling", "mfm", backbone_type]
    if task == "pretraining" and config.corruption != "mfm":
        tags.append(_PRETEXTS[config.corruption].replace(" ", "-"))
    tags += [t for t in (extra_tags or []) if t not in tags]
    eval_results = _eval_results(results or [])
    card_data = ModelCardData(
        license=license,
        license_name=license_name,
        license_link=license_link,
        library_name="transformers",
        pipeline_tag=TASKS[task],
        tags=tags,
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
        model_name=repo_id.split("/")[1] if eval_results else None,
        eval_results=eval_results or None,
    )
    name = repo_id.split("/")[1]
    lines = [f"# {name}", "", description or _INTRO, ""]
    if task == "pretraining":
        summary = f"This repository holds a {_encoder_name(config)} encoder pre-trained with the "
        summary += f"{_PRETEXTS[config.corruption]} pretext."
    else:
        summary = f"This repository holds a {_encoder_name(config)} image classifier ({config.num_labels} classes)."
    if base_model:
        summary += f" It was fine-tuned from [{base_model}](https://huggingface.co/{base_model})."
    lines += [summary, ""]
    if provenance:
        lines += [provenance, ""]
    lines += ["## Model description", "", *_architecture_table(config, task), ""]
    lines += ["## Intended uses and limitations", "", *_intended_use(task, license, license_name), ""]
    lines += [*_usage(repo_id, config, task, backbone_subfolder), ""]
    recipe = "vit" if config.is_vit else "resnet"
    lines += [
        "## Fine-tuning",
        "",
        "The `modeling_mfm` package fine-tunes this checkpoint for image classification with its Accelerate script "
        f"(the `{recipe}` recipe follows the official fine-tuning; `--help` lists every option):",
        "",
        "```bash",
        f"accelerate launch run_scripts/run_finetune.py --model_name_or_path {repo_id} \\",
        f"    --dataset_name <hub dataset id> --output_dir <output folder> --recipe {recipe}",
        "```",
        "",
    ]
    if training_details:
        lines += ["## Training details", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in training_details.items()]
        lines.append("")
    if eval_results:
        lines += ["## Evaluation results", "", "| task | dataset | metric | value |", "| --- | --- | --- | --- |"]
        for result in eval_results:
            metric = result.metric_name or result.metric_type
            lines.append(f"| {result.task_type} | {result.dataset_name} | {metric} | {_fmt(result.metric_value)} |")
        lines.append("")
    if images:
        lines += ["## Examples", ""]
        lines += [f"![{image.rsplit('/', 1)[-1]}]({image})" for image in images]
        lines.append("")
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)


def render_segmentation_card(
    repo_id: str, config: Any, dataset: str, best: Mapping[str, Any], training_details: dict | None = None
) -> str:
    """The README.md of a UperNet trained on an MFM encoder (`training.segmentation_training`): its mean IoU and
    pixel accuracy on ``dataset``'s validation split as the model-index, how to use it, what ran."""
    results = [{"task": "image-segmentation", "dataset": dataset, "metric": metric, "name": name,
                "value": round(best[key], 3), "split": "validation"}
               for key, metric, name in (("mean_iou", "mean_iou", "mean IoU"), ("pixel_accuracy", "accuracy",
                                                                                  "pixel accuracy"))]
    name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-segmentation",
        tags=["vision", "masked-frequency-modeling", "mfm", "upernet", config.backbone_config.model_type],
        model_name=name, eval_results=_eval_results(results),
    )
    lines = [
        f"# {name}", "",
        f"UperNet semantic segmentation ({config.num_labels} classes) on an encoder pre-trained with Masked Frequency "
        "Modeling (MFM; Xie et al., ICLR 2023), trained with BEiT's ADE20K recipe by `modeling_mfm`.", "",
        "```python",
        "from transformers import AutoImageProcessor, UperNetForSemanticSegmentation",
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        f'model = UperNetForSemanticSegmentation.from_pretrained("{repo_id}")',
        "```", "",
    ]
    if training_details:
        lines += ["## Training details", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in training_details.items()]
        lines.append("")
    lines += ["## Evaluation results", "", "| dataset | metric | value |", "| --- | --- | --- |"]
    lines += [f"| {r['dataset']} | {r['name']} | {_fmt(r['value'])} |" for r in results]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
