"""Low-label fine-tuning and the test split: a stratified, seeded training subset (--train_subset_size), a test split
matched to the training classes by name (--test_dir / --test_file), evaluated once at the end by fine-tuning (final
and best epoch) and by the frozen-feature probes."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import datasets
import pytest
import torch
from classification_fixtures import CLASS_COLOURS, make_class_folders, run_script
from conftest import tiny_config

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.data.classification_data import ClassificationDataArguments, load_test_split
from modeling_mfm.training.data.holdout import stratified_holdout, stratified_subset


def labelled_rows(counts: dict[int, int]) -> datasets.Dataset:
    labels = [label for label, count in counts.items() for _ in range(count)]
    return datasets.Dataset.from_dict({"index": list(range(len(labels))), "label": labels})


def test_stratified_subset_is_proportional_seeded_and_the_holdout_rule():
    rows = labelled_rows({0: 40, 1: 40, 2: 20})
    subset = stratified_subset(rows, "label", 10, seed=3)
    assert Counter(subset["label"]) == {0: 4, 1: 4, 2: 2}
    _, expected = stratified_holdout(rows["label"], 10, seed=3)
    assert subset["index"] == expected.tolist()
    assert stratified_subset(rows, "label", 10, seed=3)["index"] == subset["index"]
    assert stratified_subset(rows, "label", 10, seed=4)["index"] != subset["index"]
    assert len(stratified_subset(rows, "label", 500, seed=0)) == 100  # more than there is: every row
    with pytest.raises(ValueError, match="subset size must be >= 1"):
        stratified_subset(rows, "label", 0, seed=0)


def test_test_folder_labels_follow_the_training_class_order_by_name(tmp_path):
    folders = make_class_folders(tmp_path / "data", {"test": 2})
    training_classes = ["red", "blue", "green", "yellow"]  # another order, and a class the test lacks
    test = load_test_split(str(folders / "test"), None, training_classes)
    assert test.features["label"].names == training_classes
    by_file = {row["image"]["path"].split("/")[-2]: row["label"] for row in test}
    assert by_file == {"red": 0, "blue": 1, "green": 2}
    with pytest.raises(ValueError, match=r"test split has classes the training data lacks: \['green'\]"):
        load_test_split(str(folders / "test"), None, ["red", "blue"])


def test_arguments_load_the_subset_and_the_test_split(tmp_path):
    folders = make_class_folders(tmp_path / "data", {"train": 10, "test": 3})
    arguments = ClassificationDataArguments(train_dir=str(folders / "train"), validation_split_size=6,
                                            train_subset_size=9, test_dir=str(folders / "test"))
    data = arguments.load_datasets(seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (9, 6, 9)
    assert Counter(data.train["label"]) == {0: 3, 1: 3, 2: 3}
    assert data.test.column_names == [data.image_column, data.label_column]
    with pytest.raises(ValueError, match="--test_dir or --test_file, not both"):
        ClassificationDataArguments(train_dir="x", test_dir="a", test_file="b").check_data_source()


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    MFMForPreTraining(tiny_config("beit")).save_pretrained(tmp_path / "mfm")
    return tmp_path / "mfm"


@pytest.mark.slow
def test_fine_tuning_reports_the_test_split_for_the_final_and_the_best_epoch(tmp_path, pretrained):
    folders = make_class_folders(tmp_path / "data", {"train": 12, "test": 4})
    shutil.rmtree(folders / "test" / next(iter(CLASS_COLOURS)))  # the test split may lack a class
    run_script("run_finetune.py", [
        "--model_name_or_path", str(pretrained), "--train_dir", str(folders / "train"), "--validation_split_size",
        "6", "--train_subset_size", "15", "--test_dir", str(folders / "test"), "--output_dir", str(tmp_path / "ft"),
        "--num_train_epochs", "3", "--per_device_train_batch_size", "5", "--auto_augment", "none",
        "--dataloader_num_workers", "0", "--report_to", "none", "--cache_dir", str(tmp_path / "cache")], tmp_path)
    results = json.loads((tmp_path / "ft" / "all_results.json").read_text())
    assert results["global_step"] == 9  # 15 rows of the subset, batch 5, 3 epochs
    assert all(epoch["num_samples"] == 6 for epoch in results["history"])
    test = results["test"]
    assert test["final"]["num_samples"] == test["best"]["num_samples"] == 8
    for scores in test.values():
        assert (scores["top1"] / 12.5).is_integer()  # 8 test images
    if results["best_epoch"] == 3:  # the final epoch was the best one: the same model, the same numbers
        assert test["best"] == test["final"]
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "split: test" in card and f"value: {round(test['best']['top1'], 3)}" in card


@pytest.mark.slow
def test_probes_report_the_test_split(tmp_path, pretrained):
    folders = make_class_folders(tmp_path / "data", {"train": 8, "validation": 3, "test": 2})
    run_script("run_linear_probe.py", [
        "--model_name_or_path", str(pretrained), "--train_dir", str(folders / "train"), "--validation_dir",
        str(folders / "validation"), "--test_dir", str(folders / "test"), "--output_dir", str(tmp_path / "probe"),
        "--dataloader_num_workers", "0", "--num_train_epochs", "20", "--per_device_train_batch_size", "8",
        "--cache_dir", str(tmp_path / "cache")], tmp_path)
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["num_eval"] == 9 and results["test"]["num_eval"] == 6
    assert results["test"]["knn"]["top1"] == 100.0  # three solid colours
    assert results["test"]["linear_probe"]["epochs"] == 20 and 0 <= results["test"]["linear_probe"]["top1"] <= 100
