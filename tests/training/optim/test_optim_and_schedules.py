"""AdamW parameter groups, the linear lr scaling rule and the warmup + cosine / linear schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.optim.optimizer import build_optimizer, parameter_groups, scale_learning_rate
from modeling_mfm.training.optim.schedules import LearningRateSchedule


class ToyViT(nn.Module):
    """Parameter names and shapes of the MFM ViT family (BEiT backbone, transformer decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 5, 8))
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(3, 8, 2, 2)
        self.attention = nn.Module()
        self.attention.q_proj = nn.Linear(8, 8)
        self.attention.k_proj = nn.Linear(8, 8, bias=False)
        self.layernorm_before = nn.LayerNorm(8)
        self.decoder = nn.Module()
        self.decoder.position_embeddings = nn.Parameter(torch.zeros(1, 5, 4))
        self.decoder.projection = nn.Conv2d(8, 12, 1)
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_parameter_groups_follow_the_official_rule():
    groups = {g["group_name"]: g for g in parameter_groups(ToyViT(), weight_decay=0.05)}
    assert sorted(groups["decay"]["names"]) == [
        "attention.k_proj.weight",
        "attention.q_proj.weight",
        "decoder.projection.weight",
        "embeddings.patch_embeddings.projection.weight",
    ]
    assert sorted(groups["no_decay"]["names"]) == [
        "attention.q_proj.bias",
        "decoder.position_embeddings",
        "decoder.projection.bias",
        "embeddings.cls_token",
        "embeddings.patch_embeddings.projection.bias",
        "embeddings.position_embeddings",
        "layernorm_before.bias",
        "layernorm_before.weight",
    ]
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0


def test_parameter_groups_on_the_real_model(tiny_config_factory):
    model = MFMForPreTraining(tiny_config_factory("beit", decoder_depth=1, decoder_hidden_size=16,
                                                  decoder_num_attention_heads=2))
    groups = {g["group_name"]: g for g in parameter_groups(model, 0.05)}
    names = groups["decay"]["names"] + groups["no_decay"]["names"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)  # every parameter exactly once
    params = dict(model.named_parameters())
    for name in groups["decay"]["names"]:
        assert params[name].ndim >= 2 and "position_embeddings" not in name and "cls_token" not in name
    for name in ("mfm.backbone.embeddings.cls_token", "mfm.backbone.embeddings.position_embeddings",
                 "decoder.position_embeddings", "decoder.layernorm.weight", "decoder.projection.bias"):
        assert name in groups["no_decay"]["names"]


def test_fused_cpu_adamw_follows_the_per_tensor_loop():
    import copy

    torch.manual_seed(0)
    fused_model = ToyViT()
    loop_model = copy.deepcopy(fused_model)
    initial = [p.detach().clone() for p in fused_model.parameters()]
    fused, loop = build_optimizer(fused_model, lr=1e-2), build_optimizer(loop_model, lr=1e-2, fused=False)
    for step in range(5):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    trained = [(a, p0) for a, p0 in zip(fused_model.parameters(), initial) if a.requires_grad]
    assert all((a - p0).abs().max() > 1e-2 for a, p0 in trained)  # the steps did move them


def test_build_optimizer():
    optimizer = build_optimizer(ToyViT(), lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["fused"] is True  # CPU kernel
    assert build_optimizer(ToyViT(), lr=1e-3, fused=False).defaults["fused"] is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(ToyViT(), lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_groups(ToyViT(), -1.0)


def test_linear_scaling_rule():
    assert scale_learning_rate(3e-4, 2048) == pytest.approx(1.2e-3)  # official: 128 x 16 GPUs
    assert scale_learning_rate(3e-4, 512) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="total_batch_size"):
        scale_learning_rate(3e-4, 0)


def test_warmup_cosine_values():
    schedule = LearningRateSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.1, min_lr=0.01)
    assert schedule.lr_at(0) == pytest.approx(0.1)
    assert schedule.lr_at(5) == pytest.approx(0.55)
    # the cosine is measured from step 0, as timm's CosineLRScheduler without warmup_prefix
    assert schedule.lr_at(10) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * 0.1)) / 2)
    assert schedule.lr_at(50) == pytest.approx(0.505)
    assert schedule.lr_at(100) == pytest.approx(0.01)
    after = [schedule.lr_at(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    with pytest.raises(ValueError, match="warmup_steps"):
        LearningRateSchedule(1.0, 10, 11, 0.0, 0.0)
    with pytest.raises(ValueError, match="min_lr"):
        LearningRateSchedule(1.0, 10, 1, 0.0, 2.0)
    with pytest.raises(ValueError, match="decay"):
        LearningRateSchedule(1.0, 10, 1, decay="poly")


def test_linear_decay_is_measured_from_step_0_as_mmsegmentation():
    schedule = LearningRateSchedule(peak_lr=1e-4, total_steps=160000, warmup_steps=1500, decay="linear")
    assert schedule.lr_at(0) == 0.0 and schedule.lr_at(750) == pytest.approx(0.5e-4)
    assert schedule.lr_at(1500) == pytest.approx(1e-4 * (1 - 1500 / 160000))  # mmseg's poly, power 1, min 0
    assert schedule.lr_at(80000) == pytest.approx(0.5e-4)
    assert schedule.lr_at(160000) == 0.0 and schedule.lr_at(170000) == 0.0


def test_schedule_is_a_function_of_the_step_and_sets_every_group():
    optimizer = torch.optim.AdamW(parameter_groups(ToyViT(), 0.05), lr=2.0)
    optimizer.param_groups[1]["lr_scale"] = 0.5  # a layer-decay group
    schedule = LearningRateSchedule(2.0, 20, 4, warmup_lr=0.2, min_lr=0.02)
    seen = []
    for step in range(20):
        seen.append(schedule.apply(optimizer, step))
        assert optimizer.param_groups[0]["lr"] == seen[-1]
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * seen[-1])
        optimizer.step()
    assert seen == pytest.approx([schedule.lr_at(s) for s in range(20)])
    # a resumed run needs only the step: no scheduler state exists
    fresh = torch.optim.AdamW(parameter_groups(ToyViT(), 0.05), lr=2.0)
    assert schedule.apply(fresh, 7) == seen[7] and fresh.param_groups[0]["lr"] == seen[7]

