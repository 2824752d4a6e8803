"""Save/load, Auto classes, remote code without the package installed, and native encoder export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BeitModel,
    ResNetModel,
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
    image = (torch.rand(3, 50, 40) * 255).to(torch.uint8)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    assert list(processor.image_mean) == config.image_mean and list(processor.image_std) == config.image_std


def test_pretraining_checkpoint_loads_into_classifier(tmp_path):
    pretrain = MFMForPreTraining(tiny_config("beit"))
    pretrain.save_pretrained(tmp_path)
    classifier = MFMForImageClassification.from_pretrained(tmp_path, num_labels=4)
    assert classifier.classifier.out_features == 4
    for name, param in pretrain.mfm.backbone.state_dict().items():
        torch.testing.assert_close(classifier.mfm.backbone.state_dict()[name], param, atol=0, rtol=0)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    try:
        import modeling_mfm
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_mfm must not be importable here")
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForImageClassification
    path, inputs = sys.argv[1], torch.load(sys.argv[2])
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert type(config).__name__ == "MFMConfig", type(config)
    pre = AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True).eval()
    enc = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    cls = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True, num_labels=2).eval()
    out = pre(inputs["x"], frequency_mask=inputs["mask"])
    torch.save({"loss": out.loss, "reconstruction": out.reconstruction,
                "hidden": enc(inputs["x"]).last_hidden_state, "logits_shape": cls(inputs["x"]).logits.shape},
               sys.argv[3])
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    model = MFMForPreTraining(tiny_config("beit")).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    x, mask = fixed_inputs()
    torch.save({"x": x, "mask": mask}, tmp_path / "inputs.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    # run from an empty folder with a path that excludes this checkout, and an isolated module cache
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    blocker = workdir / "sitecustomize.py"  # hide an installed (editable) modeling_mfm from this process
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'modeling_mfm' or name.startswith('modeling_mfm.'):\n"
        "            raise ImportError('blocked for this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env["PYTHONPATH"] = str(workdir)
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    local = model(x, frequency_mask=mask)
    torch.testing.assert_close(remote["loss"], local.loss, atol=0, rtol=0)
    torch.testing.assert_close(remote["reconstruction"], local.reconstruction, atol=0, rtol=0)
    torch.testing.assert_close(remote["hidden"], model.mfm(x).last_hidden_state, atol=0, rtol=0)
    assert tuple(remote["logits_shape"]) == (2, 2)


@pytest.mark.parametrize("backbone,native_class", [("beit", BeitModel), ("resnet", ResNetModel)])
def test_encoder_exports_as_a_native_transformers_checkpoint(tmp_path, backbone, native_class):
    model = MFMForPreTraining(tiny_config(backbone)).eval()
    model.export_backbone(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == backbone
    native = AutoModel.from_pretrained(tmp_path).eval()
    assert type(native) is native_class
    x, _ = fixed_inputs()
    # the same weights; the native model computes the patch embedding as a convolution, ours as a GEMM (rounding)
    torch.testing.assert_close(native(x).last_hidden_state, model.mfm(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert AutoImageProcessor.from_pretrained(tmp_path).size["height"] == 32


def test_exported_mean_pooling_beit_keeps_the_pooler(tmp_path):
    backbone = dict(tiny_config("beit").backbone_config.to_dict(), use_mean_pooling=True)
    model = MFMForImageClassification(tiny_config("beit", backbone_config=backbone, num_labels=2)).eval()
    model.export_backbone(tmp_path)
    native = AutoModel.from_pretrained(tmp_path).eval()
    x, _ = fixed_inputs()
    torch.testing.assert_close(native(x).pooler_output, model.mfm(x).pooler_output, atol=1e-6, rtol=1e-5)
