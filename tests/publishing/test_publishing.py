"""Publishing a training run's folder to the Hub through a local mirror (no network): the model goes, the training
by-products stay."""

from __future__ import annotations

import json

import pytest

from modeling_mfm.publishing.folder_layout import (
    CHECKPOINTS_FOLDER,
    LOGS_FOLDER,
    MODEL_CARD_FILE,
    PICTURES_FOLDER,
    RECONSTRUCTION_PICTURE,
    RESULTS_FILE,
)
from modeling_mfm.publishing.hub import PUBLISH_IGNORE_PATTERNS, publish_folder


def make_output_folder(root):
    (root / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (root / "logs").mkdir()
    (root / "logs" / "metrics.jsonl").write_text("{}\n")
    (root / "reconstructions").mkdir()
    (root / "reconstructions" / "step-0000002.png").write_bytes(b"png")
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "config.json").write_text("{}")
    (root / "reconstruction.png").write_bytes(b"png")
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mfm\n---\n\n# model\n")


def test_push_publishes_the_model_not_the_training_byproducts(tmp_path):
    make_output_folder(tmp_path / "out")
    url = publish_folder(tmp_path / "out", "someone/mfm-test", local_dir=tmp_path / "hub")
    published = sorted(p.relative_to(tmp_path / "hub" / "someone" / "mfm-test").as_posix()
                       for p in (tmp_path / "hub").rglob("*") if p.is_file())
    assert published == ["README.md", "config.json", "model.safetensors", "reconstruction.png"]
    assert url.startswith("file://")
    # pushing again updates the same repository
    (tmp_path / "out" / "config.json").write_text('{"v": 2}')
    publish_folder(tmp_path / "out", "someone/mfm-test", local_dir=tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "someone" / "mfm-test" / "config.json").read_text()) == {"v": 2}


def test_the_folder_names_are_the_documented_ones_and_the_by_products_stay_local():
    """Docs, model cards and users' commands (``--resume_from_checkpoint out/checkpoints/checkpoint-200``) spell these
    names; the tests of the loops check the folders by them."""
    assert (MODEL_CARD_FILE, RESULTS_FILE, RECONSTRUCTION_PICTURE) == ("README.md", "all_results.json",
                                                                      "reconstruction.png")
    assert (CHECKPOINTS_FOLDER, LOGS_FOLDER, PICTURES_FOLDER) == ("checkpoints", "logs", "reconstructions")
    assert {f"{name}/*" for name in (CHECKPOINTS_FOLDER, LOGS_FOLDER, PICTURES_FOLDER)} <= set(PUBLISH_IGNORE_PATTERNS)


def test_push_refuses_bad_metadata_and_ids(tmp_path):
    make_output_folder(tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(Exception, match="(?i)yaml|while parsing|flow"):
        publish_folder(tmp_path / "out", "someone/bad", local_dir=tmp_path / "hub")
    with pytest.raises(ValueError, match="hub_model_id"):
        publish_folder(tmp_path / "out", "a/b/c", local_dir=tmp_path / "hub")
