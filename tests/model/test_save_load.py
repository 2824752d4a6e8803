"""Save/load and the Auto classes (remote code without the package: test_remote_code; exports: test_doors)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_config
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from modeling_mfm import MFMConfig, MFMForImageClassification, MFMForPreTraining, MFMModel, low_pass_mask


def fixed_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
    return x, mask


@pytest.mark.parametrize("backbone", ["beit", "resnet", "convnext"])
def test_save_and_load_give_identical_outputs(tmp_path, backbone):
    model = MFMForPreTraining(tiny_config(backbone)).eval()
    x, mask = fixed_inputs()
    expected = model(x, frequency_mask=mask)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_mfm.py",
            "configuration_mfm.py", "frequency.py", "corruptions.py"} <= files
    for loader in (MFMForPreTraining, AutoModelForPreTraining):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MFMForPreTraining)
        out = loaded(x, frequency_mask=mask)
        torch.testing.assert_close(out.reconstruction, expected.reconstruction, atol=0, rtol=0)
        torch.testing.assert_close(out.loss, expected.loss, atol=0, rtol=0)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification"}


def test_auto_classes_and_image_processor(tmp_path):
    config = tiny_config("beit", num_labels=3)
    MFMForImageClassification(config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MFMConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MFMModel)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), MFMForImageClassification)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "BitImageProcessor"  # a stock processor: no remote code to load it
    image = (torch.rand(3, 50, 40) * 255).to(torch.uint8)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    assert processor.size["shortest_edge"] == 36 and processor.crop_size["height"] == 32  # floor(32 / 0.875)
    assert list(processor.image_mean) == config.image_mean and list(processor.image_std) == config.image_std


def test_pretraining_checkpoint_loads_into_classifier(tmp_path):
    pretrain = MFMForPreTraining(tiny_config("beit"))
    pretrain.save_pretrained(tmp_path)
    classifier = MFMForImageClassification.from_pretrained(tmp_path, num_labels=4)
    assert classifier.classifier.out_features == 4
    loaded = classifier.mfm.backbone.state_dict()
    for name, param in pretrain.mfm.backbone.state_dict().items():
        if name.startswith("layernorm."):  # BEiT's pre-trained final norm is not part of the classifier
            assert name not in loaded
            continue
        torch.testing.assert_close(loaded[name], param, atol=0, rtol=0)
