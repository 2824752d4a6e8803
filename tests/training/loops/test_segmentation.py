"""UperNet on MFM encoders: encoder weights carried over exactly, forward and backward, native save / load, and the
ADE20K-format training script (sliding-window inference, mean IoU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from classification_fixtures import run_script
from conftest import TINY_BACKBONES, tiny_config
from PIL import Image
from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.loops.segmentation_model import (
    default_out_indices,
    resize_position_embeddings,
    upernet_from_mfm,
)
from modeling_mfm.training.loops.segmentation_training import (
    confusion_matrix,
    iou_from_confusion,
    sliding_window_logits,
)
from modeling_mfm.training.run.trackers import read_metrics


def four_layer(backbone: str):
    if backbone in ("beit", "vit"):
        return tiny_config(backbone, backbone_config={**TINY_BACKBONES[backbone], "num_hidden_layers": 4})
    return tiny_config(backbone)


@pytest.mark.parametrize("backbone", ["beit", "vit", "convnext", "resnet"])
def test_forward_backward_and_encoder_weights(tmp_path, backbone):
    torch.manual_seed(0)
    source = MFMForPreTraining(four_layer(backbone))
    if backbone == "vit":  # a non-zero key bias, which the BEiT backbone drops without changing anything
        with torch.no_grad():
            for layer in source.mfm.backbone.layers:
                layer.attention.k_proj.bias.normal_()
    source.save_pretrained(tmp_path / "mfm")
    segmenter = upernet_from_mfm(str(tmp_path / "mfm"), num_labels=5, hidden_size=16)

    # the backbone computes what the MFM encoder computes (compared first: training updates BatchNorm statistics)
    images = torch.randn(2, 3, 32, 32)
    segmenter.eval()
    source.eval()
    with torch.no_grad():
        expected = source.mfm(images, output_hidden_states=True).hidden_states
        inner = segmenter.backbone.beit if backbone in ("beit", "vit") else segmenter.backbone
        actual = inner(images, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)

    segmenter.train()
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[0, :4] = 255  # ignored pixels
    out = segmenter(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 5, 32, 32)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in segmenter.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]


def test_native_save_and_load_and_a_larger_crop(tmp_path):
    source = MFMForPreTraining(four_layer("beit"))
    segmenter = upernet_from_mfm(model=source, num_labels=3, hidden_size=16, image_size=64)
    assert segmenter.config.backbone_config.out_indices == [1, 2, 3, 4]
    segmenter.save_pretrained(tmp_path / "upernet")
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits, segmenter.eval()(pixel_values=images).logits)


def test_helpers():
    assert default_out_indices(12) == [4, 6, 8, 12]  # BEiT's ViT-B blocks 3, 5, 7, 11 (0-based)
    assert default_out_indices(24) == [8, 12, 16, 24]
    with pytest.raises(ValueError, match=">= 4 blocks"):
        default_out_indices(2)
    grid = torch.arange(1 + 16, dtype=torch.float32).view(1, 17, 1).expand(1, 17, 2)
    resized = resize_position_embeddings(grid, 8)
    assert resized.shape == (1, 65, 2)
    assert torch.equal(resized[:, 0], grid[:, 0])  # the CLS embedding is kept
    assert resize_position_embeddings(grid, 4) is grid
    with pytest.raises(ValueError, match="exactly one"):
        upernet_from_mfm()
    with pytest.raises(ValueError, match="out_indices"):
        upernet_from_mfm(model=MFMForPreTraining(four_layer("beit")), out_indices=[1, 2, 3])


# ---------------------------------------------------------------------------------------------------- training
class PixelwiseModel(torch.nn.Module):
    """Logits computed per pixel (a 1x1 convolution): sliding windows must reproduce the whole-image result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=1)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.conv(pixel_values))


def test_sliding_window_matches_whole_image_for_a_pixelwise_model():
    model = PixelwiseModel()
    for shape in [(1, 3, 40, 56), (1, 3, 32, 32), (1, 3, 20, 70)]:
        image = torch.randn(shape)
        with torch.no_grad():
            expected = model(image).logits
        torch.testing.assert_close(sliding_window_logits(model, image, crop=32, num_labels=4), expected)


def test_confusion_and_iou():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    confusion = confusion_matrix(prediction, labels, num_labels=4)
    assert confusion.sum() == 6  # ignored pixels skipped
    scores = iou_from_confusion(confusion)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2; class 3 absent
    assert scores["mean_iou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 4 / 6)


def test_run_segmentation_end_to_end(tmp_path):
    MFMForPreTraining(four_layer("beit")).save_pretrained(tmp_path / "mfm")
    rng = np.random.default_rng(0)
    for split, count in (("training", 4), ("validation", 3)):
        for i in range(count):
            height = 40 + 8 * i
            image = rng.integers(0, 256, (height, 56, 3), dtype=np.uint8)
            mask = np.zeros((height, 56), np.uint8)  # 0 = "other", ignored with reduce_labels
            mask[:, :28] = 1
            mask[height // 2:, 28:] = 3
            for folder, array in (("images", image), ("annotations", mask)):
                path = tmp_path / "ade" / folder / split / f"img{i}.{'jpg' if folder == 'images' else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    run_script("run_segmentation.py", [
        "--model_name_or_path", str(tmp_path / "mfm"), "--data_dir", str(tmp_path / "ade"),
        "--output_dir", str(tmp_path / "out"), "--num_labels", "3", "--crop_size", "32", "--max_train_steps", "4",
        "--per_device_train_batch_size", "2", "--warmup_steps", "1", "--eval_steps", "2", "--checkpointing_steps", "2",
        "--hidden_size", "16", "--dataloader_num_workers", "0", "--push_to_hub", "--hub_model_id",
        "someone/tiny-upernet", "--hub_local_dir", str(tmp_path / "hub"), "--hub_token", "not-a-token"], tmp_path)
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["global_step"] == 4 and [h["step"] for h in results["history"]] == [2, 4]
    assert "hub_token" not in results["arguments"]  # credentials are never written
    records = read_metrics(tmp_path / "out" / "logs" / "metrics.jsonl")
    assert [r["eval/mean_iou"] for r in records if "eval/mean_iou" in r] == [h["mean_iou"] for h in results["history"]]
    # the push published the best model, its processor and a card with its mean IoU, not the checkpoints or logs
    published = tmp_path / "hub" / "someone" / "tiny-upernet"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in published.iterdir()}
    assert not (published / "checkpoints").exists() and not (published / "logs").exists()
    best = max(h["mean_iou"] for h in results["history"])
    card = (published / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and f"value: {round(best, 3)}" in card
    assert all(h["num_samples"] == 3 and 0 <= h["mean_iou"] <= 100 for h in results["history"])
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-4").is_dir()
    assert UperNetForSemanticSegmentation.from_pretrained(tmp_path / "out").config.num_labels == 3
    # the image processor saved beside it turns an image into the model's input, and reduces labels as trained
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    encoder = MFMForPreTraining.from_pretrained(tmp_path / "mfm").config
    assert list(processor.image_mean) == list(encoder.image_mean) and processor.do_reduce_labels
    batch = processor(Image.fromarray(image), segmentation_maps=Image.fromarray(mask), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert set(batch["labels"].unique().tolist()) == {0, 2, 255}  # 1 -> 0, 3 -> 2, "other" -> ignored
