"""benchmarks/cifar10_study.py: --smoke --plan cpu runs the whole comparison (pre-training with the monitor,
pictures, both low-label fine-tunings, probes, the test split, table) on a tiny generated data set, then a second
invocation finds every stage done; the GPU plan's throughput stage runs at smoke size; the GPU plan's commands, which
only a GPU runs, parse, and each pretext's model trains at 32 px."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import HfArgumentParser

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.evaluation.linear_probe import LinearProbeArguments
from modeling_mfm.training.loops.finetune import FinetuneArguments
from modeling_mfm.training.loops.pretraining_arguments import parse_arguments, parse_backbone_overrides
from modeling_mfm.training.models.model_factory import build_config

REPO = Path(__file__).resolve().parents[2]


def study(*arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_study.py"), *arguments], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_cpu_plan_smoke_runs_every_stage_reports_the_test_split_and_skips_finished_stages(tmp_path):
    output = tmp_path / "study"
    cut = study("--smoke", "--plan", "cpu", "--output_dir", str(output), "--max_minutes", "0.02")  # first stage
    assert cut.returncode == 3 and "--max_minutes reached in stage pretrain-mfm" in cut.stderr, cut.stderr[-3000:]
    assert not (output / "pretrain-mfm" / "stage.json").exists()
    first = study("--smoke", "--plan", "cpu", "--output_dir", str(output))  # the same command continues
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((output / "study.json").read_text())
    assert set(summary["stages"]) == {"pretrain-mfm", "pictures", "finetune-mfm", "init-random", "finetune-scratch",
                                      "probe-mfm", "probe-random", "card"}
    rows = {row["pretext"]: row for row in summary["rows"]}
    assert set(rows) == {"mfm", "scratch"}
    for row in rows.values():  # 40 held-out and 40 test images of 10 classes: multiples of 2.5 %
        for key in ("finetune_final_top1", "finetune_best_top1", "linear_top1", "knn_top1", "test_finetune_final_top1",
                    "test_finetune_best_top1", "test_linear_top1", "test_knn_top1"):
            assert 0 <= row[key] <= 100 and (row[key] / 2.5).is_integer(), (key, row)
    assert rows["mfm"]["pretrain_epochs"] == 4 and rows["scratch"]["pretrain_epochs"] == 0
    # the test split has the training split's classes (colours): the frozen features classify it
    assert rows["mfm"]["test_linear_top1"] > 10 and rows["mfm"]["test_knn_top1"] > 10
    pretraining = summary["stages"]["pretrain-mfm"]["pretraining"]
    assert pretraining["img_per_s"] > 0 and 0 < pretraining["final_loss"] < 1
    # the monitor measured at the start, every 4 steps and at the end (4 epochs of 4 steps)
    assert [record["step"] for record in summary["monitor"]] == [0, 4, 8, 12, 16]
    assert all(0 <= record["knn_top1"] <= 100 for record in summary["monitor"])
    assert summary["pictures"]["images"] == 40 and (output / "pictures" / "reconstruction.png").stat().st_size > 0
    verdict = summary["verdict"]
    assert verdict["split"] == "test" and {"finetune_mfm_minus_scratch", "knn_mfm_minus_scratch"} <= set(verdict)
    assert verdict["finetune_target_5_met"] == (verdict["finetune_mfm_minus_scratch"] >= 5)
    # fine-tuning ran on the stratified 60-row subset (6 per class), evaluated on the held-out slice and the test
    results = json.loads((output / "finetune-mfm" / "all_results.json").read_text())
    assert results["test"]["final"]["num_samples"] == 40 and results["history"][-1]["num_samples"] == 40
    commands = [c for stage in summary["stages"].values() for c in stage["commands"]]
    assert len(commands) == 5 and all("--validation_split_size 40 --validation_split_seed 0" in c for c in commands)
    assert sum("--train_subset_size 60" in c for c in commands) == 2
    assert sum("--test_file" in c for c in commands) == 4
    assert [c for c in commands if "--monitor_steps 4" in c] == [c for c in commands if "run_pretrain.py" in c]
    table = (output / "study.md").read_text()
    assert "| MFM | 4 | 3 |" in table and "| none (random init) | 0 | 3 |" in table and "plan cpu" in table
    # the pre-trained folder's card carries the measured test accuracies, and release.py would publish it
    card = ModelCard.load(output / "pretrain-mfm" / "README.md")
    values = {result.metric_name.split(" ")[0]: result.metric_value for result in card.data.eval_results}
    assert values == {"top-1": rows["mfm"]["test_finetune_final_top1"], "kNN": rows["mfm"]["test_knn_top1"],
                      "linear-probe": rows["mfm"]["test_linear_top1"]}
    assert all(result.dataset_split == "test" for result in card.data.eval_results)
    assert "![held-out reconstructions](held_out_reconstruction.png)" in card.text
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    release = subprocess.run([sys.executable, str(REPO / "run_scripts" / "release.py"), "--model_name_or_path",
                              str(output / "pretrain-mfm"), "--hub_model_id", "modeling-mfm/mfm-vit-4x96-cifar10",
                              "--dry_run"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert release.returncode == 0, release.stderr[-2000:]
    assert "held_out_reconstruction.png" in release.stdout and "checkpoints" not in release.stdout

    again = study("--smoke", "--plan", "cpu", "--output_dir", str(output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 8 and "run_scripts/" not in again.stdout

    other = study("--output_dir", str(output), "--plan", "cpu", "--train_file",
                  str(output / "smoke-data" / "train.parquet"))
    assert other.returncode == 2 and "holds a study with another plan" in other.stderr


@pytest.mark.slow
def test_gpu_plan_smoke_throughput_stage_measures_both_data_paths(tmp_path):
    output = tmp_path / "study"
    listed = study("--smoke", "--output_dir", str(output), "--list_stages")
    assert listed.stdout.split()[-2:] == ["throughput", "report"] and "pictures" in listed.stdout
    run = study("--smoke", "--output_dir", str(output), "--stage", "throughput")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((output / "study.json").read_text())
    assert set(summary["throughput"]) == {"device", "pil"}
    assert all(speed["img_per_s"] > 0 and speed["peak_memory_mib"] > 0 for speed in summary["throughput"].values())
    assert "| --dataset_on_device |" in (output / "study.md").read_text()


def test_study_refuses_a_test_file_that_does_not_exist(tmp_path):
    run = study("--smoke", "--output_dir", str(tmp_path), "--test_file", str(tmp_path / "missing.parquet"))
    assert run.returncode == 2 and "--test_file" in run.stderr and "names no file" in run.stderr


def load_study_module():
    spec = importlib.util.spec_from_file_location("cifar10_study", REPO / "benchmarks" / "cifar10_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pretext", ["mfm", "sr", "deblur", "denoise"])
def test_every_gpu_stage_command_parses_and_its_model_trains_at_32px(tmp_path, pretext):
    """The GPU plan's commands, which CI never runs: each parses into valid arguments, and each pretext's model
    (the smoke width, the GPU plan's corruption settings) takes a training step on 32x32 images."""
    study_module = load_study_module()
    args = study_module.parse_args(["--output_dir", str(tmp_path), "--train_file", "cifar10/*.parquet",
                                    "--pretexts", "mfm", "sr", "deblur", "denoise"])
    study = study_module.Study(args, study_module.GPU_PLAN)
    command = study.pretrain_command(pretext, tmp_path / "pt", ["--dataset_on_device", "--num_train_epochs", "120"])
    assert command[0] == "run_pretrain.py"
    arguments, overrides = parse_arguments(command[1:])
    assert arguments.dataset_on_device and arguments.validation_split_size == 5000
    assert arguments.train_file == "cifar10/*.parquet" and arguments.per_device_train_batch_size == 512
    config = build_config(arguments.preset, overrides=overrides,
                          backbone_overrides={**parse_backbone_overrides(arguments.backbone_overrides),
                                              **study_module.SMOKE_PLANS["gpu"].backbone})
    assert config.corruption == pretext and config.image_size == 32 and config.mask_radius == pytest.approx(2.2857)
    torch.manual_seed(0)
    model = MFMForPreTraining(config)
    loss = model(pixel_values=torch.randn(2, 3, 32, 32)).loss
    loss.backward()
    assert torch.isfinite(loss)

    finetuning = study.finetune_command(tmp_path / "pt", tmp_path / "ft", 0.8)
    (parsed,) = HfArgumentParser(FinetuneArguments).parse_args_into_dataclasses(args=finetuning[1:])
    parsed = parsed.resolved()
    assert parsed.dataset_on_device and parsed.auto_augment is None and parsed.num_train_epochs == 40
    probe = study.probe_command(tmp_path / "pt", tmp_path / "probe")
    (parsed_probe,) = HfArgumentParser(LinearProbeArguments).parse_args_into_dataclasses(args=probe[1:])
    parsed_probe.check()
    assert parsed_probe.validation_split_size == 5000 and parsed_probe.crop_pct == 1.0
    assert parsed_probe.num_train_epochs == study.plan.probe_epochs
