"""Layer-wise lr decay groups: the scale of each parameter and where weight decay applies."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config

from modeling_mfm import MFMForImageClassification
from modeling_mfm.training.optim.layer_decay import layer_decay_parameter_groups, layer_id_for_parameter
from modeling_mfm.training.optim.schedules import LearningRateSchedule

DECAY = 0.8


def by_name(groups: list[dict]) -> dict[str, dict]:
    table = {}
    for group in groups:
        for name in group["names"]:
            assert name not in table, f"{name} is in two groups"
            table[name] = group
    return table


@pytest.mark.parametrize("backbone", ["beit", "vit"])
def test_vit_groups_follow_the_official_scales(backbone):
    layers = 3
    config = tiny_config(backbone, num_labels=4,
                         backbone_config={**TINY_BACKBONES[backbone], "num_hidden_layers": layers})
    model = MFMForImageClassification(config)
    groups = layer_decay_parameter_groups(model, weight_decay=0.05, layer_decay=DECAY, lr=1e-3)
    table = by_name(groups)
    assert set(table) == {n for n, _ in model.named_parameters()}

    p = "mfm.backbone."
    expected_scale = {
        p + "embeddings.patch_embeddings.projection.weight": DECAY ** (layers + 1),
        p + "embeddings.cls_token": DECAY ** (layers + 1),
        p + "embeddings.position_embeddings": DECAY ** (layers + 1),
        p + "layers.0.attention.q_proj.weight": DECAY ** layers,
        p + "layers.1.mlp.fc1.weight": DECAY ** (layers - 1),
        p + "layers.2.layernorm_after.weight": DECAY ** (layers - 2),
        p + "layernorm.weight": 1.0,
        "mfm.fc_norm.weight": 1.0,
        "classifier.weight": 1.0,
        "classifier.bias": 1.0,
    }
    if backbone == "beit":  # the classifier leaves out BEiT's final LayerNorm (the official fine-tuning head)
        assert p + "layernorm.weight" not in table
        del expected_scale[p + "layernorm.weight"]
    for name, scale in expected_scale.items():
        assert table[name]["lr_scale"] == pytest.approx(scale), name
        assert table[name]["lr"] == pytest.approx(1e-3 * scale), name

    no_decay = [p + "embeddings.cls_token", p + "embeddings.position_embeddings", "classifier.bias",
                p + "layers.0.attention.q_proj.bias", p + "layers.0.layernorm_before.weight", "mfm.fc_norm.bias",
                p + "embeddings.patch_embeddings.projection.bias"]
    for name in no_decay:
        assert table[name]["weight_decay"] == 0.0, name
    for name in [p + "embeddings.patch_embeddings.projection.weight", p + "layers.1.mlp.fc2.weight",
                 "classifier.weight"]:
        assert table[name]["weight_decay"] == 0.05, name


def test_cnn_stages_decay_per_stage():
    model = MFMForImageClassification(tiny_config("resnet", num_labels=4))
    table = by_name(layer_decay_parameter_groups(model, weight_decay=0.05, layer_decay=0.5))
    stages = 4
    assert table["mfm.backbone.embedder.embedder.convolution.weight"]["lr_scale"] == 0.5 ** (stages + 1)
    assert table["mfm.backbone.encoder.stages.0.layers.0.layer.0.convolution.weight"]["lr_scale"] == 0.5**stages
    assert table["mfm.backbone.encoder.stages.3.layers.0.layer.2.convolution.weight"]["lr_scale"] == 0.5
    assert table["classifier.weight"]["lr_scale"] == 1.0
    assert table["mfm.backbone.encoder.stages.3.layers.0.layer.2.normalization.weight"]["weight_decay"] == 0.0


def test_no_layer_decay_gives_plain_groups():
    model = MFMForImageClassification(tiny_config("convnext", num_labels=4))
    groups = layer_decay_parameter_groups(model, weight_decay=0.02, layer_decay=1.0)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedule_keeps_the_layer_ratios():
    model = MFMForImageClassification(tiny_config("beit", num_labels=4))
    groups = layer_decay_parameter_groups(model, weight_decay=0.05, layer_decay=DECAY, lr=2e-3)
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    schedule = LearningRateSchedule(2e-3, 100, 10, 1e-6, 1e-6)
    for step in range(37):
        schedule.apply(optimizer, step)
        optimizer.step()
    lrs = {g["layer_id"]: g["lr"] for g in optimizer.param_groups}
    layers = 2
    assert lrs[0] / lrs[layers + 1] == pytest.approx(DECAY ** (layers + 1))
    assert lrs[1] / lrs[layers + 1] == pytest.approx(DECAY**layers)


def test_bad_values_are_refused():
    model = MFMForImageClassification(tiny_config("beit", num_labels=4))
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, 0.05, 0.0)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, 0.05, 1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        layer_decay_parameter_groups(model, -0.1, 0.8)
    with pytest.raises(ValueError, match="layers"):
        layer_id_for_parameter("mfm.backbone.layers.5.mlp.fc1.weight", num_layers=2)


def test_upernet_backbone_names():
    from modeling_mfm import MFMForPreTraining
    from modeling_mfm.training.loops.segmentation_model import upernet_from_mfm

    layers = 4
    source = MFMForPreTraining(tiny_config("beit", backbone_config={**TINY_BACKBONES["beit"],
                                                                   "num_hidden_layers": layers}))
    segmenter = upernet_from_mfm(model=source, num_labels=3, hidden_size=8)
    table = by_name(layer_decay_parameter_groups(segmenter, 0.05, 0.65, num_layers=layers))
    assert table["backbone.beit.embeddings.patch_embeddings.projection.weight"]["lr_scale"] == pytest.approx(
        0.65 ** (layers + 1))
    assert table["backbone.beit.layers.3.mlp.fc2.weight"]["lr_scale"] == pytest.approx(0.65)
    assert table["decode_head.classifier.weight"]["lr_scale"] == 1.0
    assert table["backbone.fpn.fpn2.weight"]["lr_scale"] == 1.0
