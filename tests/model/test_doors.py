"""One head, one pooling, one export, one image transform: the same weights give the same features and inputs through
every door (the MFM classes, the Auto classes, pipelines, Trainer, the scripts' loaders, the native export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

from modeling_mfm import MFMForImageClassification, MFMForPreTraining, MFMModel, build_image_processor
from modeling_mfm.training.data.classification_data import build_eval_transform, eval_transform_from_processor
from modeling_mfm.training.data.transforms import to_rgb
from modeling_mfm.training.evaluation.linear_probe import pool_features
from modeling_mfm.training.models.model_loading import load_classifier, load_encoder


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Moves every parameter away from its initial value (norms would otherwise be identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=["beit", "vit", "resnet"])
def pretraining_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"pretraining-{request.param}")
    perturb(MFMForPreTraining(tiny_config(request.param))).save_pretrained(folder)
    return folder


def test_every_door_gives_the_same_features_on_a_pretraining_folder(pretraining_folder):
    x = images()
    with torch.no_grad():
        reference = MFMModel.from_pretrained(pretraining_folder).eval()(x).pooler_output
        doors = {
            "AutoModel": AutoModel.from_pretrained(pretraining_folder).eval()(x).pooler_output,
            "MFMForImageClassification": MFMForImageClassification.from_pretrained(
                pretraining_folder, num_labels=3).eval().mfm(x).pooler_output,
            "AutoModelForImageClassification": AutoModelForImageClassification.from_pretrained(
                pretraining_folder, num_labels=3).eval().mfm(x).pooler_output,
            "load_classifier (run_finetune.py)": load_classifier(
                str(pretraining_folder), num_labels=3).eval().mfm(x).pooler_output,
            "load_encoder (linear probe)": pool_features(load_encoder(str(pretraining_folder)).eval(), x),
        }
    for door, features in doors.items():
        torch.testing.assert_close(features, reference, atol=0, rtol=0, msg=lambda text, d=door: f"{d}: {text}")
    pretraining = MFMForPreTraining.from_pretrained(pretraining_folder).eval()
    if pretraining.config.backbone_type == "beit":  # the pre-trained final norm is dropped, as the official recipe
        with torch.no_grad():
            normed = pretraining.mfm(x).last_hidden_state[:, 1:].mean(1)
        assert not torch.allclose(torch.nn.functional.layer_norm(normed, normed.shape[-1:], eps=1e-6), reference,
                                  atol=1e-3)


def test_fine_tuned_folder_gives_the_same_logits_through_every_door(pretraining_folder, tmp_path):
    classifier = perturb(load_classifier(str(pretraining_folder), num_labels=3), seed=2).eval()
    classifier.save_pretrained(tmp_path)
    x = images()
    with torch.no_grad():
        expected = classifier(x).logits
        for loaded in (MFMForImageClassification.from_pretrained(tmp_path),
                       AutoModelForImageClassification.from_pretrained(tmp_path),
                       load_classifier(str(tmp_path), num_labels=3)):
            torch.testing.assert_close(loaded.eval()(x).logits, expected, atol=0, rtol=0)
        features = AutoModel.from_pretrained(tmp_path).eval()(x).pooler_output
        torch.testing.assert_close(classifier.classifier(features), expected, atol=1e-6, rtol=1e-6)


def test_pipelines_and_trainer_use_the_processor_and_the_model(pretraining_folder, tmp_path):
    classifier = perturb(load_classifier(str(pretraining_folder), num_labels=3), seed=2).eval()
    classifier.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(2)]
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = classifier(pixel_values).logits
        features = AutoModel.from_pretrained(tmp_path).eval()(pixel_values).pooler_output
    top = pipeline("image-classification", model=str(tmp_path), top_k=3)(pictures)
    for scores, row in zip(top, logits.softmax(-1)):
        by_label = {entry["label"]: entry["score"] for entry in scores}
        expected = {classifier.config.id2label[i]: float(p) for i, p in enumerate(row)}
        assert by_label == pytest.approx(expected, abs=1e-6)
    pooled = pipeline("image-feature-extraction", model=str(tmp_path), pool=True)(pictures, return_tensors=True)
    torch.testing.assert_close(torch.cat(pooled), features, atol=1e-6, rtol=1e-6)
    dataset = [{"pixel_values": p, "labels": 0} for p in pixel_values]
    arguments = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], per_device_eval_batch_size=2)
    predicted = Trainer(model=classifier, args=arguments).predict(dataset).predictions
    torch.testing.assert_close(torch.as_tensor(predicted), logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", list(TINY_BACKBONES))
@pytest.mark.parametrize("head", ["pretraining", "classifier"])
def test_native_export_gives_the_encoder_door_outputs(backbone, head, tmp_path):
    config = tiny_config(backbone, num_labels=3)
    model = perturb(MFMForPreTraining(config) if head == "pretraining" else MFMForImageClassification(config))
    model.save_pretrained(tmp_path / "mfm")
    model.export_backbone(tmp_path / "native")
    exported = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "auto_map" not in exported and exported["model_type"] == backbone
    native, encoder = AutoModel.from_pretrained(tmp_path / "native").eval(), AutoModel.from_pretrained(tmp_path / "mfm")
    assert not isinstance(native, MFMModel)
    x = images()
    with torch.no_grad():
        ours, theirs = encoder.eval()(x), native(x)
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, atol=1e-6, rtol=1e-5)
    if backbone == "vit":  # ViTModel's pooler (tanh(dense(CLS))) cannot express MFM's pooling: none is exported
        with safe_open(tmp_path / "native" / "model.safetensors", "pt") as weights:
            assert not any(name.startswith("pooler.") for name in weights.keys())
    else:  # ResNetModel returns the pooled vector as (B, C, 1, 1)
        torch.testing.assert_close(theirs.pooler_output.flatten(1), ours.pooler_output, atol=1e-6, rtol=1e-5)
    assert AutoImageProcessor.from_pretrained(tmp_path / "native").crop_size["height"] == 32
    # and back: the native encoder in the fine-tuning loader gives the same features (a ViT export has no pooling
    # LayerNorm: the loader starts a new one, as from a pre-training folder)
    with torch.no_grad():
        reloaded = load_classifier(str(tmp_path / "native"), num_labels=3).eval().mfm(x)
    torch.testing.assert_close(reloaded.last_hidden_state, ours.last_hidden_state, atol=1e-6, rtol=1e-5)
    if not (backbone == "vit" and head == "classifier"):
        torch.testing.assert_close(reloaded.pooler_output, ours.pooler_output, atol=1e-6, rtol=1e-5)


def _test_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    rgba = np.concatenate([np.asarray(rgb), rng.integers(0, 256, (45, 61, 1), dtype=np.uint8)], axis=-1)
    rgba[:10, :10, 3] = 0  # a transparent corner: white after compositing
    return {
        "RGB": rgb,
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(rgba, mode="RGBA").convert("LA"),
        "CMYK": rgb.convert("CMYK"),
        "tall": Image.fromarray(rng.integers(0, 256, (77, 33, 3), dtype=np.uint8)),
    }


@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0])
def test_the_saved_processor_is_the_scripts_evaluation_transform(crop_pct, tmp_path):
    config = tiny_config("beit")
    build_image_processor(config, crop_pct=crop_pct).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)  # transformers' default (torchvision) backend
    scripts = build_eval_transform(config.image_size, config.image_mean, config.image_std, crop_pct)
    from_processor = eval_transform_from_processor(processor)  # robustness evaluation
    for mode, image in _test_images().items():
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert expected.shape == (3, 32, 32), mode
        for transform in (scripts, from_processor):
            torch.testing.assert_close(transform(to_rgb(image)), expected, atol=1e-5, rtol=0, msg=mode)
    white = (1.0 - torch.tensor(config.image_mean)) / torch.tensor(config.image_std)
    if crop_pct == 1.0:  # the transparent corner composited over white, as the training transforms do
        corner = processor(images=_test_images()["RGBA"], return_tensors="pt")["pixel_values"][0, :, 0, 0]
        torch.testing.assert_close(corner, white, atol=0.05, rtol=0)


def test_save_pretrained_keeps_a_processor_already_in_the_folder(tmp_path):
    model = MFMForPreTraining(tiny_config("resnet"))
    build_image_processor(model.config, crop_pct=0.95).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert AutoImageProcessor.from_pretrained(tmp_path).size["shortest_edge"] == 33  # floor(32 / 0.95), kept
    MFMForPreTraining(tiny_config("resnet")).save_pretrained(tmp_path / "fresh")
    assert AutoImageProcessor.from_pretrained(tmp_path / "fresh").size["shortest_edge"] == 36  # 0.875 by default
