"""benchmarks/cifar10_study.py: --smoke runs the whole comparison (pre-training, both fine-tunings, probes,
throughput, table) on a tiny generated data set, then a second invocation finds every stage done; the GPU plan's
commands, which only a GPU runs, parse, and each pretext's model trains at 32 px."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from modeling_mfm import MFMForPreTraining
from modeling_mfm.training.arguments import parse_arguments, parse_backbone_overrides
from modeling_mfm.training.finetune import FinetuneArguments
from modeling_mfm.training.linear_probe import LinearProbeArguments
from modeling_mfm.training.model_factory import build_config

REPO = Path(__file__).resolve().parents[2]


def study(*arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_study.py"), *arguments], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_smoke_runs_every_stage_writes_the_table_and_skips_finished_stages(tmp_path):
    output = tmp_path / "study"
    cut = study("--smoke", "--output_dir", str(output), "--max_minutes", "0.02")  # stops in the first stage
    assert cut.returncode == 3 and "--max_minutes reached in stage pretrain-mfm" in cut.stderr, cut.stderr[-3000:]
    assert not (output / "pretrain-mfm" / "stage.json").exists()
    first = study("--smoke", "--output_dir", str(output))  # the same command without the limit continues
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((output / "study.json").read_text())
    assert set(summary["stages"]) == {"pretrain-mfm", "finetune-mfm", "init-random", "finetune-scratch", "probe-mfm",
                                      "probe-random", "throughput"}
    rows = {row["pretext"]: row for row in summary["rows"]}
    assert set(rows) == {"mfm", "scratch"}
    for row in rows.values():  # 40 held-out images of 10 classes: multiples of 2.5 %
        for key in ("finetune_final_top1", "finetune_best_top1", "linear_top1", "knn_top1"):
            assert 0 <= row[key] <= 100 and (row[key] / 2.5).is_integer(), (key, row)
    assert rows["mfm"]["pretrain_epochs"] == 4 and rows["scratch"]["pretrain_epochs"] == 0
    assert rows["mfm"]["linear_top1"] > 10 and rows["mfm"]["knn_top1"] > 10  # the classes differ in colour
    pretraining = summary["stages"]["pretrain-mfm"]["pretraining"]
    assert pretraining["img_per_s"] > 0 and 0 < pretraining["final_loss"] < 1
    assert set(summary["throughput"]) == {"device", "pil"}
    assert all(speed["img_per_s"] > 0 and speed["peak_memory_mib"] > 0 for speed in summary["throughput"].values())
    assert "mfm_minus_scratch" in summary["verdict"]
    # every stage ran the package's script with the same held-out slice; the commands are recorded
    commands = [c for stage in summary["stages"].values() for c in stage["commands"]]
    assert len(commands) == 7 and all("--validation_split_size 40 --validation_split_seed 0" in c for c in commands)
    table = (output / "study.md").read_text()
    assert "| MFM | 4 | 3 |" in table and "| none (random init) | 0 | 3 |" in table
    assert "| --dataset_on_device |" in table

    again = study("--smoke", "--output_dir", str(output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 7 and "run_scripts/" not in again.stdout

    other = study("--output_dir", str(output), "--train_file", str(output / "smoke-data" / "train.parquet"))
    assert other.returncode == 2 and "holds a study with another plan" in other.stderr


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
    config = build_config(arguments.model, overrides=overrides,
                          backbone_overrides={**parse_backbone_overrides(arguments.backbone_overrides),
                                              **study_module.SMOKE_PLAN.backbone})
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
