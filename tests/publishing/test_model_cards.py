"""Model cards: model_cards/ is up to date with the template, and every card's metadata is valid Hub metadata."""

from __future__ import annotations

import filecmp
import runpy
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load

from modeling_mfm import MFMConfig
from modeling_mfm.conversion.release import OFFICIAL_RELEASES, write_release_cards
from modeling_mfm.publishing.model_card import render_model_card

ROOT = Path(__file__).resolve().parents[2]
CARDS = ROOT / "model_cards"

# ImageNet-1K top-1 (%) published in the official README, restated here independently of the catalogue.
PUBLISHED_TOP1 = {
    "mfm-vit-base": [83.1], "mfm-vit-base-sr": [82.4], "mfm-vit-base-deblur": [81.7], "mfm-vit-base-denoise": [82.7],
    "mfm-resnet50": [78.5, 80.1], "mfm-resnet50-sr": [77.9], "mfm-resnet50-deblur": [78.0],
    "mfm-resnet50-denoise": [77.5],
    "mfm-vit-base-ft-in1k": [83.1], "mfm-vit-base-sr-ft-in1k": [82.4], "mfm-vit-base-deblur-ft-in1k": [81.7],
    "mfm-vit-base-denoise-ft-in1k": [82.7], "mfm-resnet50-ft-in1k": [78.5], "mfm-resnet50-ft-in1k-300ep": [80.1],
    "mfm-resnet50-sr-ft-in1k": [77.9], "mfm-resnet50-deblur-ft-in1k": [78.0], "mfm-resnet50-denoise-ft-in1k": [77.5],
}


def test_model_cards_directory_is_up_to_date(tmp_path):
    names = [path.name for path in write_release_cards(tmp_path)]
    existing = sorted(path.name for path in CARDS.glob("*.md"))
    assert sorted(names) == existing, "run python run_scripts/make_model_cards.py"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, CARDS, names, shallow=False)
    assert not mismatch and not errors, f"out of date: {mismatch + errors}; run python run_scripts/make_model_cards.py"


def test_make_model_cards_script_writes_and_checks(tmp_path, monkeypatch, capsys):
    script = str(ROOT / "run_scripts" / "make_model_cards.py")

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
        return exit_info.value.code

    assert run("--output-dir", str(tmp_path)) == 0
    assert len(list(tmp_path.glob("*.md"))) == len(OFFICIAL_RELEASES)
    assert run("--output-dir", str(tmp_path), "--check") == 0
    (tmp_path / "mfm-vit-base.md").write_text("stale", encoding="utf-8")
    assert run("--output-dir", str(tmp_path), "--check") == 1
    assert "out of date" in capsys.readouterr().err


def test_every_released_checkpoint_has_a_card():
    assert set(PUBLISHED_TOP1) == set(OFFICIAL_RELEASES)
    assert {path.stem for path in CARDS.glob("*.md")} == set(PUBLISHED_TOP1)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOP1))
def test_card_metadata_is_valid_hub_metadata(name):
    path = CARDS / f"{name}.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.license == "other"
    assert data.license_name == "s-lab-license-1.0"
    assert data.license_link == "https://github.com/Jiahao000/MFM/blob/HEAD/LICENSE"
    assert data.library_name == "transformers"
    classifier = "-ft-in1k" in name
    assert data.pipeline_tag == ("image-classification" if classifier else "image-feature-extraction")
    assert data.datasets == ["imagenet-1k"]
    assert {"vision", "mfm", "masked-frequency-modeling"} <= set(data.tags)
    assert ("resnet" if "resnet" in name else "beit") in data.tags
    if classifier:
        assert data.base_model == f"modeling-mfm/{name.split('-ft-in1k')[0]}"
    # model-index round trip through huggingface_hub's own parser and validation
    metadata = metadata_load(path)
    parsed = ModelCardData(**metadata)
    assert parsed.model_name == name
    assert [r.metric_value for r in parsed.eval_results] == PUBLISHED_TOP1[name]
    for result in parsed.eval_results:
        assert (result.task_type, result.dataset_type, result.metric_type) == (
            "image-classification", "imagenet-1k", "accuracy",
        )
    body = card.text
    for needed in (
        "## Intended uses and limitations",
        "trust_remote_code=True",
        f'from_pretrained("modeling-mfm/{name}"',
        f"run_scripts/run_finetune.py --model_name_or_path modeling-mfm/{name} \\",
        f"--recipe {'resnet' if 'resnet' in name else 'vit'}",
        "## Training details",
        "S-Lab License 1.0",
        "@inproceedings{xie2023masked",
        "arXiv 2206.07706",
        "github.com/Jiahao000/MFM",
    ):
        assert needed in body, needed


def test_card_bodies_describe_their_checkpoint():
    base = ModelCard.load(CARDS / "mfm-vit-base.md").text
    assert "ViT-B/16" in base and "width 768" in base and "frequency masking" in base
    assert "radius 16" in base and "probability 0.5" in base and "PixelShuffle(16)" in base
    resnet = ModelCard.load(CARDS / "mfm-resnet50.md").text
    assert "ResNet-50" in resnet and "probability 0.3" in resnet and "PixelShuffle(32)" in resnet
    sr = ModelCard.load(CARDS / "mfm-vit-base-sr.md")
    assert "super-resolution" in sr.text and "super-resolution" in sr.data.tags
    classifier = ModelCard.load(CARDS / "mfm-vit-base-ft-in1k.md").text
    assert "1000 classes" in classifier and 'pipeline("image-classification"' in classifier


def _tiny_config(**overrides) -> MFMConfig:
    backbone = dict(model_type="beit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    return MFMConfig(backbone_config=backbone, image_size=32, mask_radius=4, **overrides)


def test_card_for_a_new_run_with_results_images_and_tags():
    text = render_model_card(
        "someone/mfm-vit-tiny-run",
        _tiny_config(),
        datasets=["imagenet-1k"],
        results=[{"task": "image-classification", "dataset": "imagenet-1k", "metric": "accuracy", "name": "top-1",
                  "value": 61.2}, {"task": "image-classification", "dataset": "imagenet-1k", "metric": "accuracy",
                  "name": "top-5", "value": 84.0}],
        training_details={"epochs": 100, "learning rate": 1.5e-4},
        images=["reconstructions.png", "https://example.org/spectrum.png"],
        extra_tags=["laptop", "vision"],
        description="A small run.",
    )
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.license_name is None
    assert card.data.tags.count("vision") == 1 and "laptop" in card.data.tags
    assert [r.metric_value for r in card.data.eval_results] == [61.2, 84.0]
    assert [r.metric_name for r in card.data.eval_results] == ["top-1", "top-5"]
    assert "A small run." in card.text and "Masked Frequency Modeling (MFM; Xie" not in card.text
    assert "![reconstructions.png](reconstructions.png)" in card.text
    assert "![spectrum.png](https://example.org/spectrum.png)" in card.text
    assert "| learning rate | 0.00015 |" in card.text
    assert "subfolder=" not in card.text  # no native export was declared
    assert "ViT (2 layers, width 32)" in card.text


def test_card_without_results_has_no_model_index():
    text = render_model_card("someone/run", _tiny_config(), task="pretraining")
    assert "model-index" not in text
    assert ModelCard(text).data.eval_results is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "segmentation"}, "task must be one of"),
        ({"license": "other"}, "license_name and license_link"),
        ({"results": [{"task": "image-classification", "value": 1.0}]}, r"results\[0\] needs the keys"),
    ],
)
def test_bad_card_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_model_card("someone/run", _tiny_config(), **kwargs)


def test_bad_repo_id_is_refused():
    with pytest.raises(ValueError, match="namespace/name"):
        render_model_card("no-namespace", _tiny_config())
