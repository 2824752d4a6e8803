"""Save -> load with remote code -> same outputs, in a process where this package is not importable.

Every backbone and every head is saved here, then loaded through the Auto classes with ``trust_remote_code=True`` by
a separate Python started with ``-S`` (no site processing: the editable install of this package is not on its path)
from a folder that holds only the checkpoints. It runs against the installed transformers, or, when
``MFM_TRANSFORMERS_FLOOR_DIR`` names a folder holding another transformers (``pip install --target``; ``.ci/run`` does
this for the lowest version setup.cfg allows), against that one: the code a checkpoint ships must load there too.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONES, tiny_config

from modeling_mfm import MFMForImageClassification, MFMForPreTraining, MFMModel, low_pass_mask

FLOOR_DIR = os.environ.get("MFM_TRANSFORMERS_FLOOR_DIR")
SHIPPED = {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_mfm.py", "modeling_mfm.py",
           "frequency.py", "corruptions.py"}

LOADER = textwrap.dedent(
    """
    import json, sys
    try:
        import modeling_mfm
    except ImportError:
        pass
    else:
        raise SystemExit(f"modeling_mfm must not be importable here, found {modeling_mfm.__file__}")
    import torch, transformers
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    inputs = torch.load("inputs.pt")
    outputs = {"transformers": transformers.__version__}
    for folder in json.loads(open("folders.json").read()):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "MFMConfig", type(config)
        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        head = (AutoModelForPreTraining if folder.startswith("pretraining") else AutoModelForImageClassification)
        model = head.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            encoded = encoder(inputs["x"])
            result = {"hidden": encoded.last_hidden_state, "pooled": encoded.pooler_output}
            if folder.startswith("pretraining"):
                out = model(inputs["x"], frequency_mask=inputs["mask"])
                result.update(loss=out.loss, reconstruction=out.reconstruction)
            else:
                result["logits"] = model(inputs["x"]).logits
        outputs[folder] = result
    torch.save(outputs, "outputs.pt")
    """
)


def _site_packages() -> list[str]:
    return [path for path in (*site.getsitepackages(), site.getusersitepackages()) if os.path.isdir(path)]


def _build(kind: str, backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "pretraining":
        decoder = {"decoder_depth": 1, "decoder_hidden_size": 16, "decoder_num_attention_heads": 2}
        return MFMForPreTraining(tiny_config(backbone, **(decoder if backbone == "beit" else {}))).eval()
    model = MFMForImageClassification(tiny_config(backbone, num_labels=3)).eval()
    for parameter in model.parameters():  # a trained-looking head and pooling norm, not the initial identity
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    return model


def test_checkpoints_load_with_remote_code_and_give_the_same_outputs(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
    torch.save({"x": x, "mask": mask}, workdir / "inputs.pt")
    expected, folders = {}, []
    for kind in ("pretraining", "classifier"):
        for backbone in TINY_BACKBONES:
            folder = f"{kind}-{backbone}"
            model = _build(kind, backbone)
            model.save_pretrained(workdir / folder)
            assert set(os.listdir(workdir / folder)) == SHIPPED  # the model's definition, nothing else
            encoder = MFMModel.from_pretrained(workdir / folder).eval()
            with torch.no_grad():
                encoded = encoder(x)
                result = {"hidden": encoded.last_hidden_state, "pooled": encoded.pooler_output}
                if kind == "pretraining":
                    out = model(x, frequency_mask=mask)
                    result.update(loss=out.loss, reconstruction=out.reconstruction)
                else:
                    result["logits"] = model(x).logits
            expected[folder] = result
            folders.append(folder)
    (workdir / "folders.json").write_text(json.dumps(folders))
    (workdir / "load.py").write_text(LOADER)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=os.pathsep.join(
        ([FLOOR_DIR] if FLOOR_DIR else []) + _site_packages()))
    result = subprocess.run([sys.executable, "-S", "load.py"], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(workdir / "outputs.pt")
    if FLOOR_DIR:
        print(f"remote code loaded with transformers {remote['transformers']}")
    # the same transformers gives the same numbers; another release may sum in another order (its SDPA path)
    tolerance = 1e-5 if FLOOR_DIR else 0.0
    for folder, values in expected.items():
        for name, value in values.items():
            torch.testing.assert_close(remote[folder][name], value, atol=tolerance, rtol=tolerance,
                                       msg=lambda text, f=folder, n=name: f"{f} {n}: {text}")


@pytest.mark.skipif(FLOOR_DIR is None, reason="set by .ci/run with the lowest transformers setup.cfg allows")
def test_the_floor_is_the_one_setup_cfg_allows():
    from packaging.version import Version

    info = next(Path(FLOOR_DIR).glob("transformers-*.dist-info")).name
    tested = Version(info.removeprefix("transformers-").removesuffix(".dist-info"))
    setup = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    floor = Version(re.search(r"^\s*transformers>=([\w.]+)", setup, flags=re.MULTILINE).group(1))
    assert tested == floor, f"CI tested transformers {tested}, setup.cfg allows >= {floor}"
