"""Shared fixtures: tiny configs for every backbone, so tests stay fast on a CPU."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

from modeling_mfm import MFMConfig

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts and their helper modules, not an installed package
sys.path.insert(0, str(REPO / "benchmarks"))

TINY_BACKBONES = {
    "beit": dict(
        model_type="beit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, use_absolute_position_embeddings=True, use_relative_position_bias=False,
        layer_scale_init_value=0.0, use_mean_pooling=False, layer_norm_eps=1e-6, drop_path_rate=0.0,
    ),
    "vit": dict(
        model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, layer_norm_eps=1e-6,
    ),
    "resnet": dict(
        model_type="resnet", layer_type="bottleneck", depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 32, 32],
        embedding_size=8, downsample_in_bottleneck=False,
    ),
    "convnext": dict(model_type="convnext", depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16]),
    "convnextv2": dict(model_type="convnextv2", depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16]),
}


def noise_jpegs(folder, count: int, shape: tuple[int, int], seed: int):
    """A new folder of ``count`` random RGB JPEGs of ``shape`` (height, width)."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(count):
        Image.fromarray((rng.random((*shape, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return folder


def tiny_config(backbone: str = "beit", **overrides) -> MFMConfig:
    """A tiny MFMConfig (image 32) for the given backbone type."""
    kwargs = dict(backbone_config=dict(TINY_BACKBONES[backbone]), image_size=32, mask_radius=4)
    kwargs.update(overrides)
    return MFMConfig(**kwargs)


@pytest.fixture
def tiny_config_factory():
    return tiny_config


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (e.g. ``run_scripts/run_pretrain.py``) imported as a module, to call its main()."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
