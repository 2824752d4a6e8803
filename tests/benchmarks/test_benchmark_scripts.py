"""The measurement scripts in benchmarks/ keep running against the package they measure (tiny settings, CPU): they
import its internals, so a change there can break them without any other test noticing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import noise_jpegs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(script: str, *arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *arguments], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_vit_step_variants_agree_with_float32_and_refuse_unknown_variants():
    result = run("vit_step_variants.py", "--preset", "mfm-vit-tiny", "--per_device_train_batch_size", "2", "--image_size", "32",
                 "--device", "cpu", "--eager", "--steps", "1",
                 "--variants", "autocast", "conv_patches+complex_fft", "bf16_residual", "separate_qkv+flash")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^(\S+)\s+loss [\d.]+ \(rel\. diff\. ([\d.e+-]+)\)", result.stdout, re.MULTILINE))
    assert set(rows) == {"autocast", "conv_patches+complex_fft", "bf16_residual", "separate_qkv+flash"}, result.stdout
    assert all(float(difference) < 1e-3 for difference in rows.values()), rows  # bf16 rounding, nothing more

    refused = run("vit_step_variants.py", "--variants", "autocast+warp_drive")
    assert refused.returncode == 2 and refused.stderr.startswith("vit_step_variants.py: error: unknown variant part "
                                                                 "'warp_drive'") and refused.stderr.count("\n") == 1


def test_precision_convergence_compares_the_variants_loss_curves(tmp_path):
    images = noise_jpegs(tmp_path / "images", 8, (40, 40), seed=0)
    result = run("precision_convergence.py", "--train_dir", str(images), "--output_dir", str(tmp_path / "runs"),
                 "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--image_size", "32", "--layers", "1",
                 "--variants", "fp32", "bf16_residual", "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = re.search(r"^bf16_residual .* relative difference to fp32 ([\d.e+-]+) on average", result.stdout,
                        re.MULTILINE)
    assert summary is not None, result.stdout
    assert abs(float(summary.group(1))) < 5e-2
