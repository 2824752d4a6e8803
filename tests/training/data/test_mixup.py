"""Mixup / CutMix soft targets: rows sum to one, images and targets mixed with the same lam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_mfm.training.data.mixup import MixDecision, MixupCutmix, smooth_one_hot, soft_target_cross_entropy

C = 5


def batch(n: int = 6, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator), torch.tensor([0, 1, 2, 3, 4, 2][:n])


def test_smoothed_targets():
    targets = smooth_one_hot(torch.tensor([2, 0]), C, 0.1)
    expected = torch.full((2, C), 0.1 / C)
    expected[0, 2] = expected[1, 0] = 0.9 + 0.1 / C
    torch.testing.assert_close(targets, expected)


def test_mixup_mixes_images_and_targets_with_the_same_lam():
    images, labels = batch()
    mixer = MixupCutmix(C, label_smoothing=0.1)
    mixed, targets = mixer.mix(images, labels, MixDecision(lam=0.3))
    torch.testing.assert_close(mixed, 0.3 * images + 0.7 * images.flip(0))
    one_hot = F.one_hot(labels, C).float() * 0.9 + 0.1 / C
    torch.testing.assert_close(targets, 0.3 * one_hot + 0.7 * one_hot.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_pastes_the_box_and_weights_targets_by_its_area():
    images, labels = batch()
    mixer = MixupCutmix(C, label_smoothing=0.0)
    box = (2, 10, 4, 8)  # top, bottom, left, right: 8 x 4 = 32 of 256 pixels
    mixed, targets = mixer.mix(images, labels, MixDecision(lam=1 - 32 / 256, cutmix=True, box=box))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:10, 4:8] = True
    assert torch.equal(mixed[..., inside], images.flip(0)[..., inside])
    assert torch.equal(mixed[..., ~inside], images[..., ~inside])
    assert targets[0, labels[0]] == pytest.approx(1 - 32 / 256)
    assert targets[0, labels[-1]] == pytest.approx(32 / 256)


def test_sampled_decisions_give_targets_summing_to_one():
    images, labels = batch()
    mixer = MixupCutmix(C, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                        rng=np.random.default_rng(0))
    kinds = []
    for _ in range(200):
        decision = mixer.sample(16, 16)
        kinds.append(decision.cutmix)
        assert 0.0 <= decision.lam <= 1.0
        if decision.cutmix:
            top, bottom, left, right = decision.box
            assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 16
            assert decision.lam == pytest.approx(1 - (bottom - top) * (right - left) / 256)
        _, targets = mixer.mix(images, labels, decision)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))
        assert (targets >= 0).all()
    assert 0.35 < np.mean(kinds) < 0.65  # switch probability 0.5


def test_only_one_method_enabled():
    mixer = MixupCutmix(C, mixup_alpha=0.0, cutmix_alpha=1.0, rng=np.random.default_rng(1))
    assert all(mixer.sample(8, 8).cutmix for _ in range(20))
    mixer = MixupCutmix(C, mixup_alpha=0.8, cutmix_alpha=0.0, rng=np.random.default_rng(1))
    assert not any(mixer.sample(8, 8).cutmix for _ in range(20))
    mixer = MixupCutmix(C, prob=0.0)
    assert mixer.sample(8, 8) == MixDecision()


def test_soft_target_cross_entropy_matches_torch_label_smoothing():
    logits = torch.randn(4, C, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 4, 0, 2])
    ours = soft_target_cross_entropy(logits, smooth_one_hot(labels, C, 0.1))
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        MixupCutmix(C, label_smoothing=1.0)
    with pytest.raises(ValueError, match="switch_prob"):
        MixupCutmix(C, switch_prob=2.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        MixupCutmix(C, mixup_alpha=-1)
    with pytest.raises(ValueError, match="lam"):
        MixupCutmix(C).mix(*batch(), MixDecision(lam=1.5))
