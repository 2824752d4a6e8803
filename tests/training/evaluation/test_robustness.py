"""Robustness benchmarks: mCE as Hendrycks & Dietterich define it, 200-class logit restriction, folder layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from classification_fixtures import run_script
from conftest import tiny_config
from PIL import Image

from modeling_mfm import MFMForImageClassification
from modeling_mfm.training.evaluation.robustness import class_wnids, mean_corruption_error
from modeling_mfm.training.evaluation.robustness_classes import (
    IMAGENET_1K_WNIDS,
    IMAGENET_A_WNIDS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_R_WNIDS,
)

# AlexNet's average error per corruption as printed in Hendrycks & Dietterich (ICLR 2019), in %
PAPER_ALEXNET = {
    "gaussian_noise": 88.6, "shot_noise": 89.4, "impulse_noise": 92.3, "defocus_blur": 82.0, "glass_blur": 82.6,
    "motion_blur": 78.6, "zoom_blur": 79.8, "snow": 86.7, "frost": 82.7, "fog": 81.9, "brightness": 56.5,
    "contrast": 85.3, "elastic_transform": 64.6, "pixelate": 71.8, "jpeg_compression": 60.7,
}


def test_class_lists():
    assert len(IMAGENET_1K_WNIDS) == len(set(IMAGENET_1K_WNIDS)) == 1000
    assert list(IMAGENET_1K_WNIDS) == sorted(IMAGENET_1K_WNIDS)
    assert IMAGENET_1K_WNIDS[0] == "n01440764" and IMAGENET_1K_WNIDS[-1] == "n15075141"  # tench ... toilet tissue
    for subset in (IMAGENET_A_WNIDS, IMAGENET_R_WNIDS):
        assert len(set(subset)) == 200 and set(subset) <= set(IMAGENET_1K_WNIDS)
    assert "n01443537" in IMAGENET_R_WNIDS and "n01443537" not in IMAGENET_A_WNIDS  # goldfish
    assert sorted(PAPER_ALEXNET) == sorted(IMAGENET_C_CORRUPTIONS)


def test_mce_normalises_by_alexnet():
    alexnet = {name: [value / 100] * 5 for name, value in PAPER_ALEXNET.items()}
    assert mean_corruption_error(alexnet)["mCE"] == pytest.approx(100.0, abs=0.1)
    half = {name: [0.2, 0.3, 0.4, 0.5, 0.6] for name in IMAGENET_C_CORRUPTIONS}  # mean error 0.4 everywhere
    result = mean_corruption_error(half)
    for name, value in result["corruption_errors"].items():
        assert value == pytest.approx(40.0 / PAPER_ALEXNET[name] * 100, rel=2e-3)
    expected = np.mean([40.0 / v * 100 for v in PAPER_ALEXNET.values()])
    assert result["mCE"] == pytest.approx(expected, rel=2e-3)
    with pytest.raises(ValueError, match="5 severities"):
        mean_corruption_error({"fog": [0.5, 0.5]})
    with pytest.raises(ValueError, match="unknown corruption"):
        mean_corruption_error({"rain": [0.5] * 5})


def test_class_wnids_from_labels_or_standard_order():
    config = tiny_config("beit", num_labels=1000)
    assert class_wnids(config) == list(IMAGENET_1K_WNIDS)  # LABEL_i names: the standard order
    wnids = list(reversed(IMAGENET_1K_WNIDS))
    assert class_wnids(tiny_config("beit", num_labels=1000, id2label=dict(enumerate(wnids)))) == wnids
    with pytest.raises(ValueError, match="cannot match"):
        class_wnids(tiny_config("beit", num_labels=10))


def save_image(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


def test_run_robustness_eval_end_to_end(tmp_path):
    """A classifier whose output ignores the image (zero weights, chosen biases) makes every expected number known:
    its overall favourite class lies outside the 200-class subsets, so only the logit restriction can score."""
    wnids = list(IMAGENET_1K_WNIDS)
    a_first, a_second = [w for w in IMAGENET_A_WNIDS if w not in IMAGENET_R_WNIDS][:2]
    r_first = IMAGENET_R_WNIDS[0]
    outsider = next(w for w in wnids if w not in IMAGENET_A_WNIDS and w not in IMAGENET_R_WNIDS)
    bias = torch.zeros(1000)
    bias[wnids.index(outsider)] = 10.0  # argmax over all 1000 classes
    bias[wnids.index(a_first)] = 5.0  # argmax within ImageNet-A's classes
    bias[wnids.index(r_first)] = 4.0  # argmax within ImageNet-R's classes (a_first is not in R)
    model = MFMForImageClassification(tiny_config("beit", num_labels=1000))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(bias)
    model.save_pretrained(tmp_path / "classifier")

    rng = np.random.default_rng(0)
    wrong = next(w for w in wnids if w != outsider)
    for corruption in IMAGENET_C_CORRUPTIONS:
        for severity in range(1, 6):
            save_image(tmp_path / "c" / corruption / str(severity) / outsider / "0.JPEG", rng)  # right
            for i in range(3):
                save_image(tmp_path / "c" / corruption / str(severity) / wrong / f"{i}.JPEG", rng)  # wrong
    for i in range(2):
        save_image(tmp_path / "a" / a_first / f"{i}.jpg", rng)  # right once restricted
    save_image(tmp_path / "a" / a_second / "0.jpg", rng)  # wrong
    save_image(tmp_path / "r" / r_first / "0.png", rng)  # right once restricted
    for wnid in IMAGENET_R_WNIDS[1:4]:
        save_image(tmp_path / "r" / wnid / "0.png", rng)  # wrong
    save_image(tmp_path / "sketch" / outsider / "0.JPEG", rng)  # right
    save_image(tmp_path / "sketch" / a_first / "0.JPEG", rng)  # wrong: no restriction on Sketch
    (tmp_path / "sketch" / a_first / "1.JPEG").write_bytes(b"\xff\xd8 not a JPEG")  # unreadable: left out, counted
    (tmp_path / "sketch" / a_first / "2.JPEG").symlink_to(tmp_path / "nowhere.JPEG")  # broken link: counted

    output = tmp_path / "robustness"
    result = run_script("run_robustness_eval.py", [
        "--model_name_or_path", str(tmp_path / "classifier"), "--imagenet_c_dir", str(tmp_path / "c"),
        "--imagenet_a_dir", str(tmp_path / "a"), "--imagenet_r_dir", str(tmp_path / "r"),
        "--imagenet_sketch_dir", str(tmp_path / "sketch"), "--dataloader_num_workers", "0",
        "--per_device_eval_batch_size", "3", "--output_dir", str(output)], tmp_path)
    results = json.loads((output / "results.json").read_text())
    clean = {"num_unreadable": 0, "unlisted_entries": 0}
    assert results["imagenet_a"] == {"top1": pytest.approx(200 / 3), "num_samples": 3, **clean}
    assert results["imagenet_r"] == {"top1": pytest.approx(25.0), "num_samples": 4, **clean}
    assert results["imagenet_sketch"] == {"top1": pytest.approx(50.0), "num_samples": 2, "num_unreadable": 1,
                                          "unlisted_entries": 1}
    c = results["imagenet_c"]
    assert c["num_samples"] == 15 * 5 * 4 and c["complete"]
    assert all(acc == [25.0] * 5 for acc in c["accuracy"].values())
    expected = np.mean([75.0 / v * 100 for v in PAPER_ALEXNET.values()])  # error 0.75 at every severity
    assert c["mCE"] == pytest.approx(expected, rel=2e-3)
    assert "IN-C mCE" in result.stdout and "IN-A top-1" in result.stdout


def test_missing_severity_and_unknown_classes_are_reported(tmp_path):
    from modeling_mfm.training.evaluation.robustness import RobustnessArguments, WnidFolderDataset

    with pytest.raises(ValueError, match="at least one"):
        RobustnessArguments(model_name_or_path="x").check()
    with pytest.raises(ValueError, match="corruptions"):
        RobustnessArguments(model_name_or_path="x", corruptions="rain").corruption_list()
    save_image(tmp_path / "n99999999" / "0.jpg", np.random.default_rng(0))
    with pytest.raises(ValueError, match="not evaluated classes"):
        WnidFolderDataset(tmp_path, IMAGENET_A_WNIDS, transform=None)
