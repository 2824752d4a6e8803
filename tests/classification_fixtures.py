"""Helpers shared by the fine-tuning / evaluation tests: tiny labelled image folders and script runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# three well separated colours, so that even a tiny model learns something in a few steps
CLASS_COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size=(40, 48)) -> None:
    """A noisy image of one colour, saved as PNG or JPEG by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def make_class_folders(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.{png,jpg}`` with ``per_class[split]`` images per class; returns root."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, colour in CLASS_COLOURS.items():
            for i in range(count):
                write_image(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}", colour, rng)
    return root


def script_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_script(script: str, args: list[str], tmp_path: Path, launcher: list[str] | None = None,
               extra_env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``run_scripts/<script>`` (optionally under a launcher such as torchrun) and fails with its output."""
    env = script_env(tmp_path)
    env.update(extra_env or {})
    command = (launcher or [sys.executable]) + [str(REPO / "run_scripts" / script), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
