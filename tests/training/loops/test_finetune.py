"""Fine-tuning: data, transforms, model loading, arguments, and run_finetune.py end to end (resume, push, 2 processes)."""

from __future__ import annotations

import json
import sys

import datasets
import pytest
import torch
from classification_fixtures import CLASS_COLOURS, REPO, make_class_folders, run_script, script_env
from conftest import tiny_config
from PIL import Image
from reliability_fixtures import kill_at_checkpoint
from safetensors.torch import load_file
from torchvision.transforms import v2 as T
from transformers import HfArgumentParser

from modeling_mfm import MFMForImageClassification, MFMForPreTraining
from modeling_mfm.cli import ScriptArgumentParser
from modeling_mfm.training.data.classification_data import (
    ClassificationDataset,
    build_eval_transform,
    build_train_transform,
    find_label_column,
    load_classification_dataset,
    parse_rand_augment,
)
from modeling_mfm.training.loops.finetune import RECIPES, FinetuneArguments, finetune
from modeling_mfm.training.models.model_loading import load_classifier
from modeling_mfm.training.optim.optimizer import clip_to_max_grad_norm
from modeling_mfm.training.run.trackers import read_metrics

LABELS = sorted(CLASS_COLOURS)
TINY_PRESET_OVERRIDES = json.dumps({"image_size": 32, "backbone_overrides": {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8}})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("data"), {"train": 8, "validation": 5})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "mfm"
    MFMForPreTraining(tiny_config("beit")).save_pretrained(path)
    return path


def common_args(folders, tmp_path, output):
    return ["--train_dir", str(folders / "train"), "--validation_dir", str(folders / "validation"),
            "--output_dir", str(output), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--dataloader_num_workers", "0", "--cache_dir", str(tmp_path / "cache"), "--logging_steps", "1",
            "--warmup_epochs", "1"]


# ---------------------------------------------------------------------------------------------------- data
def test_image_folders_give_both_splits_and_class_names(folders, tmp_path):
    data = load_classification_dataset(train_dir=str(folders / "train"), validation_dir=str(folders / "validation"),
                                       cache_dir=str(tmp_path))
    assert data.labels == LABELS
    assert (len(data.train), len(data.validation)) == (24, 15)
    assert data.id2label == dict(enumerate(LABELS))


def test_automatic_validation_split_is_stratified(folders, tmp_path):
    data = load_classification_dataset(train_dir=str(folders / "train"), validation_split_percentage=25,
                                       cache_dir=str(tmp_path))
    assert (len(data.train), len(data.validation)) == (18, 6)
    assert sorted(data.validation[data.label_column]) == [0, 0, 1, 1, 2, 2]
    paths = lambda split: {row["path"] for row in split[data.image_column]}
    assert not paths(data.train) & paths(data.validation)


def test_label_column_detection():
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64"),
                                  "caption": datasets.Value("string")})
    assert find_label_column(features) == "fine_label"
    assert find_label_column(features, "caption") == "caption"
    with pytest.raises(ValueError, match="label_column_name 'nope'"):
        find_label_column(features, "nope")
    with pytest.raises(ValueError, match="no label column"):
        find_label_column(datasets.Features({"img": datasets.Image()}))


def test_transforms_shapes_and_official_mapping():
    image = Image.new("RGB", (48, 40), (120, 30, 200))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    evaluation = build_eval_transform(32, mean, std)
    resize = next(t for t in evaluation.transforms if isinstance(t, T.Resize))
    assert resize.size == [36]  # floor(32 / 0.875)
    out = evaluation(image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 0, 0], (torch.tensor([120, 30, 200]) / 255 - torch.tensor(mean)) / torch.tensor(std))
    assert next(t for t in build_eval_transform(224, mean, std).transforms if isinstance(t, T.Resize)).size == [256]
    train = build_train_transform(32, mean, std)
    rand_augment = next(t for t in train.transforms if isinstance(t, T.RandAugment))
    assert (rand_augment.num_ops, rand_augment.magnitude, rand_augment.num_magnitude_bins) == (2, 9, 11)
    assert next(t for t in train.transforms if isinstance(t, T.RandomErasing)).p == 0.25
    assert train(image).shape == (3, 32, 32)
    assert parse_rand_augment("rand-m7-n3-mstd0.5") == {"num_ops": 3, "magnitude": 7}
    for bad in ("autoaug", "rand-m12", "rand-x3", "rand-w0"):
        with pytest.raises(ValueError, match="auto_augment"):
            parse_rand_augment(bad)


def test_unreadable_images_are_replaced_in_training_and_left_out_of_evaluation(tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    rows = datasets.Dataset.from_dict({"image": [{"path": str(broken), "bytes": None},
                                                 {"path": str(good), "bytes": None}], "label": [0, 1]})
    transform = build_eval_transform(8, [0.5] * 3, [0.5] * 3, crop_pct=1.0)
    sample = ClassificationDataset(rows, "image", "label", transform, replace_unreadable=True)[0]
    assert sample["labels"] == 1 and sample["skipped"] == 1 and sample["valid"]
    with caplog.at_level("WARNING"):
        left_out = ClassificationDataset(rows, "image", "label", transform)[0]
    assert not left_out["valid"] and left_out["skipped"] == 1 and left_out["labels"] == 0
    assert left_out["pixel_values"].shape == (3, 8, 8) and "broken.jpg" in caplog.text


# ---------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("backbone", ["beit", "resnet"])
def test_native_encoder_loads_into_the_classifier(tmp_path, backbone):
    source = MFMForPreTraining(tiny_config(backbone))
    source.export_backbone(tmp_path / "native")
    model = load_classifier(str(tmp_path / "native"), num_labels=3, id2label=dict(enumerate(LABELS)),
                            drop_path_rate=0.1)
    expected = source.mfm.backbone.state_dict()
    loaded = model.mfm.backbone.state_dict()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert model.config.id2label == dict(enumerate(LABELS))
    if backbone == "beit":  # official fine-tuning head: final norm dropped, stochastic depth on
        assert model.config.backbone_config.use_mean_pooling is True
        assert isinstance(model.mfm.backbone.layernorm, torch.nn.Identity)
        assert model.config.backbone_config.drop_path_rate == 0.1


def test_pretraining_checkpoint_and_preset_sources(pretrained):
    model = load_classifier(str(pretrained), num_labels=3)
    source = MFMForPreTraining.from_pretrained(pretrained)
    torch.testing.assert_close(model.mfm.backbone.layers[1].mlp.fc2.weight, source.mfm.backbone.layers[1].mlp.fc2.weight)
    scratch = load_classifier(preset="mfm-vit-tiny", num_labels=3, config_overrides=json.loads(TINY_PRESET_OVERRIDES))
    assert scratch.config.image_size == 32 and scratch.config.backbone_config.patch_size == 8
    with pytest.raises(ValueError, match="exactly one"):
        load_classifier(str(pretrained), preset="mfm-vit-tiny", num_labels=3)
    with pytest.raises(ValueError, match="presets only"):
        load_classifier(str(pretrained), num_labels=3, config_overrides={"image_size": 64})


def test_arguments_take_the_recipe_defaults_and_check_values():
    args = FinetuneArguments(preset="mfm-vit-tiny", train_dir="x").resolved()
    assert (args.layer_decay, args.mixup, args.cutmix, args.label_smoothing) == (0.8, 0.8, 1.0, 0.1)
    assert (args.base_learning_rate, args.warmup_epochs, args.drop_path_rate) == (2e-3, 5, 0.1)
    assert args.auto_augment == "rand-m9-mstd0.5-inc1" and args.random_erasing == 0.25
    assert args.cudnn_benchmark  # cuDNN autotuning on CUDA unless --no_cudnn_benchmark
    (parsed,) = HfArgumentParser(FinetuneArguments).parse_args_into_dataclasses(
        args=["--preset", "mfm-vit-tiny", "--train_dir", "x", "--no_cudnn_benchmark"]
    )
    assert parsed.cudnn_benchmark is False
    resnet = FinetuneArguments(preset="mfm-resnet50", train_dir="x", recipe="resnet", mixup=0.0).resolved()
    assert resnet.layer_decay == RECIPES["resnet"]["layer_decay"] and resnet.mixup == 0.0
    for bad, match in [({"recipe": "swin"}, "recipe"), ({"label_smoothing": 1.0}, "label_smoothing"),
                       ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
                       ({"push_to_hub": True}, "hub_model_id"), ({"report_to": "nope"}, "report_to")]:
        with pytest.raises(ValueError, match=match):
            FinetuneArguments(preset="mfm-vit-tiny", train_dir="x", **bad).resolved()


def test_max_grad_norm_argument_zero_means_no_clipping_and_is_the_default():
    (parsed,) = ScriptArgumentParser(FinetuneArguments).parse_args_into_dataclasses(
        ["--preset", "mfm-vit-tiny", "--train_dir", "x"])
    assert parsed.max_grad_norm is None  # the recipe's, which is no clipping in both
    assert parsed.resolved().max_grad_norm == 0.0 == RECIPES["vit"]["max_grad_norm"] == RECIPES["resnet"][
        "max_grad_norm"]
    assert parsed.adam_epsilon == 1e-8  # the value fine-tuning always used
    (parsed,) = ScriptArgumentParser(FinetuneArguments).parse_args_into_dataclasses(
        ["--preset", "mfm-vit-tiny", "--train_dir", "x", "--max_grad_norm", "0", "--adam_epsilon", "1e-6"])
    assert (parsed.resolved().max_grad_norm, parsed.adam_epsilon) == (0.0, 1e-6)
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        FinetuneArguments(preset="mfm-vit-tiny", train_dir="x", max_grad_norm=-1.0).resolved()

    class Recorder:  # Accelerate's clip_grad_norm_, recorded
        def __init__(self):
            self.calls = []

        def clip_grad_norm_(self, parameters, max_norm):
            self.calls.append(max_norm)
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.full((3,), 10.0)
    accelerator = Recorder()
    assert clip_to_max_grad_norm(accelerator, [weight], 0.0) is None  # 0: nothing computed, nothing clipped
    assert accelerator.calls == [] and torch.equal(weight.grad, torch.full((3,), 10.0))
    clip_to_max_grad_norm(accelerator, [weight], 1.5)
    assert accelerator.calls == [1.5] and float(weight.grad.norm()) == pytest.approx(1.5, rel=1e-4)


@pytest.mark.slow
def test_fine_tuning_with_max_grad_norm_zero_never_clips(folders, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    calls, real_clip = [], Accelerator.clip_grad_norm_

    def recording_clip(self, parameters, max_norm, norm_type=2):
        calls.append(max_norm)
        return real_clip(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    for max_grad_norm, expected in ((0.0, []), (0.5, [0.5, 0.5])):
        calls.clear()
        args = FinetuneArguments(
            preset="mfm-vit-tiny", config_overrides=TINY_PRESET_OVERRIDES, train_dir=str(folders / "train"),
            validation_dir=str(folders / "validation"), output_dir=str(tmp_path / f"clip-{max_grad_norm}"),
            per_device_train_batch_size=4, per_device_eval_batch_size=4, dataloader_num_workers=0,
            cache_dir=str(tmp_path / "cache"), max_train_steps=2, warmup_epochs=0, max_grad_norm=max_grad_norm,
        )
        try:
            assert finetune(args)["global_step"] == 2
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        assert calls == expected, max_grad_norm


# ---------------------------------------------------------------------------------------------------- scripts
def test_run_finetune_end_to_end_resume_and_push(folders, pretrained, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    base = ["--model_name_or_path", str(pretrained), "--num_train_epochs", "2", "--crop_pct", "0.95"]
    run_script("run_finetune.py", base + common_args(folders, tmp_path, full) + [
        "--push_to_hub", "--hub_model_id", "someone/tiny-mfm", "--hub_local_dir", str(tmp_path / "hub"),
        "--report_to", "tensorboard"], tmp_path)

    results = json.loads((full / "all_results.json").read_text())
    assert results["completed"] and results["global_step"] == results["total_steps"] == 12  # 24 images / 4, 2 epochs
    assert [r["epoch"] for r in results["history"]] == [1, 2]
    assert all(r["num_samples"] == 15 for r in results["history"])
    best = max(results["history"], key=lambda r: r["top1"])
    assert results["best_top1"] == best["top1"]

    # the best model is a loadable classifier with the dataset's class names, and its processor is the run's
    # evaluation transform
    model = MFMForImageClassification.from_pretrained(full)
    assert model.config.id2label == dict(enumerate(LABELS))
    processor = json.loads((full / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 33} and processor["crop_size"] == {"height": 32, "width": 32}
    # model card with a model-index of the best accuracy
    card = (full / "README.md").read_text()
    assert "model-index:" in card and "name: top-1" in card and f"value: {round(best['top1'], 3)}" in card
    # logs: the JSON-lines tracker got the training loss and the evaluation, TensorBoard wrote events
    records = read_metrics(full / "logs" / "metrics.jsonl")
    assert sum("train/loss" in r for r in records) == 12
    assert [r["eval/top1"] for r in records if "eval/top1" in r] == [r["top1"] for r in results["history"]]
    assert list((full / "logs").rglob("events.out.tfevents*"))
    # the push published the model and card but not the checkpoints or logs
    published = tmp_path / "hub" / "someone" / "tiny-mfm"
    assert (published / "model.safetensors").is_file() and (published / "README.md").is_file()
    assert not (published / "checkpoints").exists() and not (published / "logs").exists()

    # the same run, interrupted in the middle of the first epoch and resumed, ends with the same weights
    run_script("run_finetune.py", base + common_args(folders, tmp_path, split) + ["--stop_after_steps", "3"], tmp_path)
    partial = json.loads((split / "all_results.json").read_text())
    assert not partial["completed"] and partial["global_step"] == 3
    assert (split / "checkpoints" / "checkpoint-3").is_dir()
    run_script("run_finetune.py", base + common_args(folders, tmp_path, split), tmp_path)  # the same command
    resumed = json.loads((split / "all_results.json").read_text())
    assert resumed["completed"] and resumed["history"] == results["history"]
    expected = load_file(full / "checkpoints" / "checkpoint-12" / "model.safetensors")
    actual = load_file(split / "checkpoints" / "checkpoint-12" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)

    # killed with SIGKILL after its first checkpoint, the same command continues to the same weights
    killed = tmp_path / "killed"
    args = base + common_args(folders, tmp_path, killed) + ["--checkpointing_steps", "2"]
    kill_at_checkpoint([sys.executable, str(REPO / "run_scripts" / "run_finetune.py"), *args],
                       killed / "checkpoints" / "checkpoint-2", cwd=REPO, env=script_env(tmp_path))
    assert not (killed / "checkpoints" / "checkpoint-12").exists()
    run_script("run_finetune.py", args, tmp_path)
    assert json.loads((killed / "all_results.json").read_text())["history"] == results["history"]
    actual = load_file(killed / "checkpoints" / "checkpoint-12" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


def test_two_processes_count_each_validation_sample_once(folders, tmp_path):
    output = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    run_script("run_finetune.py", ["--preset", "mfm-vit-tiny", "--config_overrides", TINY_PRESET_OVERRIDES,
                                   "--num_train_epochs", "1"] + common_args(folders, tmp_path, output), tmp_path,
               launcher=torchrun, extra_env={"ACCELERATE_USE_CPU": "true"})
    results = json.loads((output / "all_results.json").read_text())
    assert results["total_steps"] == 3  # 24 images / (4 per process x 2 processes)
    distributed = results["history"][0]
    # 15 validation images over 2 processes with batches of 4: the padding added to even out the processes is dropped
    assert distributed["num_samples"] == 15

    run_script("run_finetune.py", ["--model_name_or_path", str(output), "--eval_only"]
               + common_args(folders, tmp_path, tmp_path / "single"), tmp_path)
    single = json.loads((tmp_path / "single" / "eval_results.json").read_text())
    assert single["eval_num_samples"] == 15
    assert single["eval_top1"] == pytest.approx(distributed["top1"])
    assert single["eval_loss"] == pytest.approx(distributed["loss"], rel=1e-5)
