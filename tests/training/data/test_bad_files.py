"""One bad file never aborts a run: corrupt images, decompression bombs, file names that are not UTF-8, broken links,
link loops and unreadable folders are skipped (or, for odd names, simply used) and counted, in every loader: the
folder listing, pre-training, fine-tuning (training and validation), the linear probe and segmentation. (The
robustness loader is checked in training/evaluation/test_robustness.py.)"""

from __future__ import annotations

import json
import os
import shutil

import datasets
import pytest
import torch
from classification_fixtures import make_class_folders
from conftest import tiny_config
from PIL import Image
from reliability_fixtures import (
    finetune_args,
    finetune_workspace,
    non_utf8_name,
    png_with_claimed_size,
    pretrain_args,
    pretrain_workspace,
    run_in_process,
    segmentation_args,
    segmentation_workspace,
    write_noise_images,
)

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.data import image_folders
from modeling_mfm.training.data.image_folders import folder_dataset, list_image_folder, local_path
from modeling_mfm.training.data.sources import open_image

BOMB_WARNING = png_with_claimed_size(10_000, 10_000)  # 1e8 pixels: above Image.MAX_IMAGE_PIXELS (a warning in PIL)
BOMB_ERROR = png_with_claimed_size(30_000, 30_000)  # above twice the limit: DecompressionBombError


def plant_bad_entries(folder, after: tuple[str, str, str]) -> None:
    """Three unreadable images, one image with a Latin-1 name (readable), a broken link and a link loop. Each
    unreadable image is named to sort right after one of the readable images ``after`` (a replacement is the next
    row, so no replacement is itself unreadable and every count below is exact)."""
    (folder / f"{after[0]}~corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    (folder / f"{after[1]}~bomb_warning.png").write_bytes(BOMB_WARNING)
    (folder / f"{after[2]}~bomb_error.png").write_bytes(BOMB_ERROR)
    non_utf8_name(folder)
    (folder / "dangling.jpg").symlink_to(folder / "missing.jpg")
    (folder / "loop").symlink_to(folder)


def refuse_to_list(monkeypatch, folder) -> None:
    """Makes ``folder`` unreadable: by permissions, or (for root, who reads anything) by the error they raise."""
    if os.geteuid() != 0:
        folder.chmod(0)
        return
    real_scandir = os.scandir

    def scandir(path):
        if str(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(image_folders.os, "scandir", scandir)


def test_listing_skips_and_counts_what_it_cannot_list(tmp_path, monkeypatch):
    root = write_noise_images(tmp_path / "data" / "cats", 5)
    plant_bad_entries(root, ("img_0", "img_2", "img_4"))
    (root / ".hidden.jpg").write_bytes(b"ignored")
    (root / "notes.txt").write_text("not an image")
    (root / "self.jpg").symlink_to(root / "self.jpg")  # a link to itself
    locked = root / "locked"
    write_noise_images(locked, 1)
    (tmp_path / "data" / "stray.jpg").write_bytes(BOMB_WARNING)  # outside any class folder
    refuse_to_list(monkeypatch, locked)
    try:
        listing = list_image_folder(tmp_path / "data", by_class=True)
    finally:
        locked.chmod(0o755)
    names = [os.path.basename(local_path(p)) for p in listing.files]
    assert names == ["caf\udce9.jpg", "img_0.jpg", "img_0~corrupt.jpg", "img_1.jpg", "img_2.jpg",
                     "img_2~bomb_warning.png", "img_3.jpg", "img_4.jpg", "img_4~bomb_error.png"]
    assert set(listing.classes) == {"cats"}
    problems = "\n".join(listing.problems)
    assert len(listing.problems) == 5, problems
    for expected in ("dangling.jpg: broken link", "self.jpg: broken link (Too many levels of symbolic links)",
                     "loop: a symbolic link loop", "locked: unreadable folder", "stray.jpg: not inside a class"):
        assert expected in problems
    # Arrow stores every listed name (the Latin-1 one as a file:// URI) and the image behind it opens
    dataset = folder_dataset(listing)
    stored = [row["path"] for row in dataset["image"]]
    odd = next(p for p in stored if p.startswith("file://"))
    assert odd.endswith("/caf%E9.jpg")
    with open_image({"path": odd, "bytes": None}) as image:
        assert image.size == (44, 40)


def test_decompression_bombs_are_errors_not_warnings(tmp_path):
    for name, data in (("warning.png", BOMB_WARNING), ("error.png", BOMB_ERROR)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            open_image(str(tmp_path / name))
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            open_image({"bytes": data, "path": None})


def test_pretraining_skips_and_counts_bad_files(tmp_path, capsys, caplog):
    workspace = pretrain_workspace(tmp_path)
    plant_bad_entries(workspace["images"] / "a", ("img_0", "img_2", "img_4"))
    output = tmp_path / "run"
    # 8 images + 3 unreadable + 1 with a Latin-1 name = 12 rows = 3 steps of 4: each row met once
    with caplog.at_level("WARNING"):
        assert run_in_process("run_pretrain.py", pretrain_args(workspace, output, steps=3)) == 0
    assert "skipped images 3" in capsys.readouterr().out
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 3 and not any("caf" in message for message in skipped)
    assert any("DecompressionBomb" in message for message in skipped)
    card = (output / "README.md").read_text()
    assert "| skipped images | 3 |" in card and "| folder entries that could not be listed | 2 |" in card


def test_finetuning_skips_and_counts_bad_training_and_validation_images(tmp_path):
    workspace = finetune_workspace(tmp_path)
    plant_bad_entries(workspace["folders"] / "train" / "red", ("0", "1", "2"))
    (workspace["folders"] / "validation" / "blue" / "broken.jpg").write_bytes(b"not an image")
    output = tmp_path / "run"
    # 12 + 4 listed training rows, 4 per batch: every row met once; 6 + 1 validation rows
    assert run_in_process("run_finetune.py", finetune_args(workspace, output)) == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["completed"] and results["skipped_images"] == 3 and results["unlisted_entries"] == 2
    assert results["history"][0]["num_samples"] == 6 and results["history"][0]["num_unreadable"] == 1
    card = (output / "README.md").read_text()
    assert "| skipped unreadable training images | 3 |" in card and "| unreadable validation images | 1 |" in card
    assert "| folder entries that could not be listed | 2 |" in card


def test_an_unreadable_image_in_the_automatic_validation_split_is_left_out(tmp_path):
    workspace = finetune_workspace(tmp_path)
    for path in (workspace["folders"] / "train" / "red").iterdir():  # a class of unreadable images only: the
        path.write_bytes(b"not an image")  # stratified validation split must hold some
    args = finetune_args(workspace, tmp_path / "run", "--validation_split_percentage", "25")
    position = args.index("--validation_dir")
    del args[position:position + 2]
    assert run_in_process("run_finetune.py", args) == 0
    evaluation = json.loads((tmp_path / "run" / "all_results.json").read_text())["history"][0]
    assert (evaluation["num_samples"], evaluation["num_unreadable"]) == (2, 1)


def test_linear_probe_leaves_out_unreadable_images(tmp_path):
    folders = make_class_folders(tmp_path / "data", {"train": 3, "validation": 2})
    (folders / "validation" / "red" / "broken.jpg").write_bytes(b"not an image")
    (folders / "train" / "blue" / "bomb.png").write_bytes(BOMB_ERROR)
    torch.manual_seed(0)
    MFMForPreTraining(tiny_config("beit")).save_pretrained(tmp_path / "mfm")
    assert run_in_process("run_linear_probe.py", [
        "--model_name_or_path", str(tmp_path / "mfm"), "--train_dir", str(folders / "train"),
        "--validation_dir", str(folders / "validation"), "--output_dir", str(tmp_path / "out"),
        "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "4", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--knn_k", "3"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["num_train"], results["num_unreadable_train"]) == (9, 1)
    assert (results["num_eval"], results["num_unreadable_eval"]) == (6, 1)


def test_segmentation_skips_and_counts_bad_pairs(tmp_path):
    workspace = segmentation_workspace(tmp_path)
    ade = workspace["data"]
    (ade / "images" / "training" / "img3.jpg").write_bytes(b"\xff\xd8 truncated")  # 4 pairs, 2 x 2 per epoch
    (ade / "annotations" / "validation" / "img1.png").write_bytes(BOMB_ERROR)
    shutil.copy(ade / "images" / "validation" / "img0.jpg", ade / "images" / "validation" / "lonely.jpg")
    output = tmp_path / "run"
    assert run_in_process("run_segmentation.py", segmentation_args(workspace, output)) == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["skipped_images"] == 1 and results["unlisted_entries"] == 1  # the image without annotation
    assert results["history"][-1]["num_samples"] == 1 and results["history"][-1]["num_unreadable"] == 1


def test_classification_rows_with_latin1_names_train(tmp_path):
    """The imagefolder builder of datasets fails on such names (Arrow takes UTF-8 only); ours keeps them."""
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    non_utf8_name(folder)
    listing = list_image_folder(tmp_path / "train", by_class=True)
    dataset = folder_dataset(listing)
    assert isinstance(dataset.features["label"], datasets.ClassLabel) and dataset.features["label"].names == ["x"]
    with open_image(dataset[0]["image"]) as image:
        assert image.mode == "RGB"
