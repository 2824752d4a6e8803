"""The core install is what loading and running a model needs: setup.cfg's requirements, the imports of the files a
checkpoint ships, and (when .ci/run sets ``MFM_CORE_PYTHON``, a fresh virtual environment holding the built wheel and
its core dependencies alone) a model built, run, saved and loaded there, with a clear message for the training
extra."""

from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = {"torch", "transformers", "huggingface-hub", "safetensors", "numpy", "pillow"}
# the top-level modules of CORE, and what transformers itself always brings
CORE_MODULES = {"torch", "transformers", "huggingface_hub", "safetensors", "numpy", "PIL"}
MODEL_FILES = ("__init__.py", "configuration_mfm.py", "modeling_mfm.py", "frequency.py", "corruptions.py")
TRAINING_ONLY = ("accelerate", "datasets", "evaluate", "torchvision", "matplotlib", "skimage", "tensorboard")
CORE_PYTHON = os.environ.get("MFM_CORE_PYTHON")


def requirements(section: str, key: str) -> list[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return [line.strip() for line in config[section][key].strip().splitlines() if line.strip()]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower()


def test_the_core_requirements_are_what_a_model_needs_and_torch_has_no_upper_pin():
    core = requirements("options", "install_requires")
    assert {name_of(r) for r in core} == CORE
    torch = next(r for r in core if name_of(r) == "torch")
    assert "<" not in torch, torch
    train = {name_of(r) for r in requirements("options.extras_require", "train")}
    assert {"accelerate", "datasets", "evaluate", "torchvision"} <= train
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_the_shipped_model_files_import_only_the_standard_library_and_the_core():
    for name in MODEL_FILES:
        tree = ast.parse((REPO / "modeling_mfm" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module.split(".")[0]]
            else:
                continue
            for module in modules:
                assert module in sys.stdlib_module_names or module in CORE_MODULES, f"{name} imports {module}"


@pytest.mark.skipif(CORE_PYTHON is None, reason="set by .ci/run: a fresh venv with the wheel and the core alone")
def test_the_built_wheel_runs_a_model_with_the_core_dependencies_alone(tmp_path):
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import torch
        from transformers import AutoModel
        from modeling_mfm import MFMConfig, MFMForPreTraining
        missing = [n for n in {TRAINING_ONLY!r} if importlib.util.find_spec(n) is not None]
        assert not missing, f"installed without being asked for: {{missing}}"
        config = MFMConfig(image_size=32, mask_radius=4, backbone_config=dict(model_type="beit", image_size=32,
                           patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, use_mask_token=False, layer_scale_init_value=0.0,
                           use_absolute_position_embeddings=True, use_relative_position_bias=False))
        torch.manual_seed(0)
        model = MFMForPreTraining(config)
        loss = model(torch.randn(2, 3, 32, 32)).loss
        loss.backward()
        model.save_pretrained(sys.argv[1])
        encoder = AutoModel.from_pretrained(sys.argv[1])
        print("core ok", round(float(loss), 4), type(encoder).__name__)
        try:
            import modeling_mfm.training
        except ImportError as error:
            print("training:", error)
    """)
    run = subprocess.run([CORE_PYTHON, "-c", script, str(tmp_path / "model")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "core ok" in run.stdout and "MFMModel" in run.stdout
    assert "pip install 'masked-frequency-modeling[train]'" in run.stdout
    # the wheel, not this checkout, was imported
    where = subprocess.run([CORE_PYTHON, "-c", "import modeling_mfm; print(modeling_mfm.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert "site-packages" in where and str(REPO) not in where
