"""Tiny workspaces for the three resumable scripts (pre-training, fine-tuning, segmentation), an in-process runner
of their ``main`` and a multi-process CPU launcher: what the reliability tests (untrusted checkpoints, run folders,
bad files, disk faults) and the end-to-end runs share."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState
from classification_fixtures import make_class_folders
from conftest import TINY_BACKBONES, tiny_config
from PIL import Image

from modeling_mfm import MFMForPreTraining
from modeling_mfm.cli import run_script

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET_OVERRIDES = json.dumps({"image_size": 32, "backbone_overrides": {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8}})


def load_main(script: str):
    spec = importlib.util.spec_from_file_location(f"_reliability_{script[:-3]}", REPO / "run_scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(script: str, argv: list[str]) -> int:
    """``run_scripts/<script>``'s main() in this process, as its command line runs it -> its exit code."""
    try:
        return run_script(load_main(script), argv)
    except SystemExit as stop:  # the parser's refusals
        return int(stop.code or 0)
    finally:
        AcceleratorState._reset_state(True)


# ---------------------------------------------------------------------------------------------------- workspaces
def write_noise_images(folder: Path, count: int, seed: int = 0, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray((rng.random((size, size + 4, 3)) * 255).astype(np.uint8)).save(folder / f"img_{i}.jpg")
    return folder


def pretrain_workspace(root: Path) -> dict:
    write_noise_images(root / "images" / "a", 8)
    config = root / "tiny.json"
    tiny_config("beit").to_json_file(str(config))
    return {"images": root / "images", "config": config}


def pretrain_args(ws: dict, output: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--config_file", str(ws["config"]), "--train_dir", str(ws["images"]), "--output_dir", str(output),
            "--per_device_train_batch_size", "4", "--max_train_steps", str(steps), "--warmup_steps", "1",
            "--base_learning_rate", "0.05", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--checkpointing_steps", "2", "--visualization_steps", "0", *extra]


def finetune_workspace(root: Path) -> dict:
    return {"folders": make_class_folders(root / "classes", {"train": 4, "validation": 2})}


def finetune_args(ws: dict, output: Path, *extra: str) -> list[str]:
    folders = ws["folders"]
    return ["--preset", "mfm-vit-tiny", "--config_overrides", TINY_PRESET_OVERRIDES, "--num_train_epochs", "1",
            "--train_dir", str(folders / "train"), "--validation_dir", str(folders / "validation"),
            "--output_dir", str(output), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--dataloader_num_workers", "0", "--logging_steps", "1", "--warmup_epochs", "1", *extra]


def segmentation_workspace(root: Path) -> dict:
    torch.manual_seed(0)
    config = tiny_config("beit", backbone_config={**TINY_BACKBONES["beit"], "num_hidden_layers": 4})
    MFMForPreTraining(config).save_pretrained(root / "mfm")
    rng = np.random.default_rng(0)
    for split, count in (("training", 4), ("validation", 2)):
        for i in range(count):
            image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            mask = np.zeros((40, 48), np.uint8)
            mask[:, :24] = 1
            mask[20:, 24:] = 3
            for folder, array, suffix in (("images", image, "jpg"), ("annotations", mask, "png")):
                path = root / "ade" / folder / split / f"img{i}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return {"model": root / "mfm", "data": root / "ade"}


def segmentation_args(ws: dict, output: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(ws["model"]), "--data_dir", str(ws["data"]), "--output_dir", str(output),
            "--num_labels", "3", "--crop_size", "32", "--max_train_steps", "2", "--per_device_train_batch_size", "2",
            "--warmup_steps", "1", "--eval_steps", "2", "--checkpointing_steps", "2", "--hidden_size", "16",
            "--dataloader_num_workers", "0", *extra]


# ---------------------------------------------------------------------------------------------------- bad files
class MarkerPayload:
    """A pickle that creates ``marker`` when it is unpickled: what an attacker plants in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_bytes(marker: Path, zipped: bool = True) -> bytes:
    """The payload as ``torch.save`` writes it (a zip archive, what Accelerate's files are) or as a bare pickle."""
    if not zipped:
        return pickle.dumps(MarkerPayload(marker))
    buffer = io.BytesIO()
    torch.save({"state": MarkerPayload(marker)}, buffer)
    return buffer.getvalue()


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels: a decompression bomb to PIL's size check."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def non_utf8_name(folder: Path, suffix: str = ".jpg") -> bytes:
    """An image saved under a file name that is not valid UTF-8 (Latin-1 'café'); returns the raw path."""
    raw = os.fsencode(folder) + b"/caf\xe9" + suffix.encode()
    rng = np.random.default_rng(7)
    with open(raw, "wb") as f:
        Image.fromarray((rng.random((40, 44, 3)) * 255).astype(np.uint8)).save(f, format="JPEG")
    return raw


def kill_at_checkpoint(command: list[str], checkpoint: Path, **popen_kwargs) -> None:
    """Starts a training command and kills it with SIGKILL as soon as ``checkpoint`` exists."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kwargs)
    deadline = time.time() + 180
    while not checkpoint.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cpu(processes: int) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes. (``--cpu --num_processes N`` starts one process unless
    run under mpirun; torchrun-style launching is ``--multi_gpu`` with ACCELERATE_USE_CPU=1, set by the caller.)"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]
