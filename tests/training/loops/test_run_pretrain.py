"""run_scripts/run_pretrain.py end to end: tiny model, generated images, a handful of steps, outputs in tmp dirs.

Covers one and two processes (and their equality with gradient accumulation), resume after SIGKILL, an unreadable
image, streaming, bf16 + gradient checkpointing, the embedded demo's defaults, a non-finite loss, the local Hub
push, and bad arguments.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_config
from PIL import Image
from reliability_fixtures import kill_at_checkpoint, launch_cpu
from safetensors.torch import load_file

from modeling_mfm import MFMForPreTraining, cli
from modeling_mfm.training.run.trackers import read_metrics

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "run_scripts" / "run_pretrain.py"

pytestmark = pytest.mark.slow


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run re-logs the steps after its checkpoint)."""
    records = read_metrics(output_dir / "logs" / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """16 images (15 readable in assorted modes + 1 corrupt JPEG) and a tiny BEiT config (32x32, patch 8)."""
    root = tmp_path_factory.mktemp("pretrain")
    images = root / "images"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        array = (rng.random((36 + 3 * i, 40 + 2 * i, 3)) * 255).astype(np.uint8)
        Image.fromarray(array).save(images / ("a" if i % 2 else "b") / f"rgb_{i}.jpg", quality=90)
    Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(images / "a" / "grey.png")
    Image.fromarray((rng.random((40, 48)) * 65535).astype(np.uint16)).save(images / "a" / "grey16.png")
    Image.fromarray((rng.random((40, 48, 4)) * 255).astype(np.uint8), "RGBA").save(images / "b" / "rgba.png")
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).convert("CMYK").save(images / "b" / "cmyk.jpg")
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).convert("P").save(images / "b" / "pal.gif")
    (images / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    config = root / "tiny.json"
    tiny_config("beit").to_json_file(str(config))
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return {"root": root, "images": images, "config": config, "env": env}


def common_args(ws, output_dir, steps: int, batch: int = 4, *extra: str) -> list[str]:
    return [
        "--config_file", str(ws["config"]), "--train_dir", str(ws["images"]), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(batch), "--max_train_steps", str(steps), "--warmup_steps", "1",
        "--base_learning_rate", "0.05", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--cache_dir", str(ws["root"] / "datasets_cache"), *extra,
    ]


def run_script(ws, args, launcher=None, timeout=240) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    env = dict(ws["env"], ACCELERATE_USE_CPU="1") if launcher else ws["env"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ws["root"])


def load_script_main():
    spec = importlib.util.spec_from_file_location("run_pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def in_process():
    """Runs the script's main() in this process, resetting Accelerate's global state afterwards."""
    main = load_script_main()
    yield lambda argv: cli.run_script(main, argv)
    AcceleratorState._reset_state(True)


def test_single_process_run_writes_model_card_pictures_and_pushes(workspace, in_process, capsys):
    out = workspace["root"] / "single"
    hub = workspace["root"] / "hub"
    result = run_script(workspace, common_args(
        workspace, out, 4, 4, "--dataloader_num_workers", "1", "--checkpointing_steps", "2",
        "--visualization_steps", "2", "--report_to", "tensorboard",
        "--push_to_hub", "--hub_model_id", "someone/mfm-tiny", "--hub_local_dir", str(hub),
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) and r["train/img_per_s"] > 0 and r["train/peak_memory_mib"] > 0
               and np.isfinite(r["train/grad_norm"]) for r in records)
    # 16 files, 4 steps of 4 = one epoch: the corrupt JPEG was met once, skipped with a warning and counted
    assert records[-1]["train/skipped_images"] == 1
    assert "skipping unreadable image" in result.stderr and "corrupt.jpg" in result.stderr
    assert "skipped 1 unreadable images" in result.stderr
    # lr = base_lr * total_batch / 512 at the first cosine step
    assert records[1]["train/lr"] == pytest.approx(0.05 * 4 / 512 * (1 + np.cos(np.pi * 1 / 4)) / 2 + 2.5e-6 * 4 / 512
                                             * (1 - (1 + np.cos(np.pi * 1 / 4)) / 2), rel=1e-6)
    # final model = the last checkpoint's weights, loadable with from_pretrained, image processor included
    model = MFMForPreTraining.from_pretrained(out)
    checkpoint = load_file(out / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in checkpoint:
            assert torch.equal(tensor, checkpoint[name]), name
    processor = json.loads((out / "preprocessor_config.json").read_text())  # the evaluation transform at 32 px
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["size"] == {"shortest_edge": 36}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    pictures = sorted(p.name for p in (out / "reconstructions").iterdir())
    assert pictures == ["step-0000000.png", "step-0000002.png", "step-0000004.png"]
    assert Image.open(out / "reconstruction.png").size[0] > 500
    assert list((out / "logs").rglob("events.out.tfevents*"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "someone/mfm-tiny" in card and "reconstruction.png" in card
    assert "| optimizer steps | 4 |" in card and "| skipped images | 1 |" in card
    published = sorted(p.name for p in (hub / "someone" / "mfm-tiny").iterdir())
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json",
            "reconstruction.png"} <= set(published)
    assert not {"checkpoints", "logs", "reconstructions"} & set(published)
    # running the same command again finds the run complete and only rewrites the outputs
    assert in_process(common_args(workspace, out, 4, 4)) == 0
    assert "already complete at step 4" in capsys.readouterr().out


def test_two_processes_equal_one_process_with_accumulation(workspace):
    two = workspace["root"] / "two_processes"
    one = workspace["root"] / "one_process_accumulating"
    launched = run_script(workspace, common_args(workspace, two, 3, 2), launcher=launch_cpu(2))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((two / "logs" / "metrics_config.json").read_text())["num_processes"] == 2
    single = run_script(workspace, common_args(workspace, one, 3, 2, "--gradient_accumulation_steps", "2"))
    assert single.returncode == 0, single.stderr[-3000:]
    two_losses, one_losses = losses_by_step(two), losses_by_step(one)
    assert sorted(two_losses) == [1, 2, 3]
    for step in two_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], rel=1e-4), step
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-5), name


def test_sigkill_and_restart_continue_the_same_trajectory(workspace):
    steps = 12
    extra = ("--checkpointing_steps", "4", "--checkpoints_total_limit", "2")
    reference = workspace["root"] / "uninterrupted"
    done = run_script(workspace, common_args(workspace, reference, steps, 4, *extra))
    assert done.returncode == 0, done.stderr[-3000:]

    out = workspace["root"] / "killed"
    command = [sys.executable, str(SCRIPT), *common_args(workspace, out, steps, 4, *extra)]
    kill_at_checkpoint(command, out / "checkpoints" / "checkpoint-4", env=workspace["env"], cwd=workspace["root"])
    assert not (out / "checkpoints" / f"checkpoint-{steps}").exists()

    resumed = run_script(workspace, common_args(workspace, out, steps, 4, *extra))  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    expected, got = losses_by_step(reference), losses_by_step(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == expected[step], step  # bit for bit
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_streaming_bf16_bf16_residual_stream_and_gradient_checkpointing(workspace):
    out = workspace["root"] / "streaming"
    result = run_script(workspace, common_args(
        workspace, out, 3, 4, "--streaming", "--shuffle_buffer_size", "8", "--mixed_precision", "bf16",
        "--gradient_checkpointing", "--bf16_residual_stream", "--visualization_steps", "0",
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in records)
    assert json.loads((out / "logs" / "metrics_config.json").read_text())["mixed_precision"] == "bf16"
    assert (out / "model.safetensors").exists()


def test_embedded_demo_defaults_run_offline(workspace, in_process, capsys):
    out = workspace["root"] / "demo"
    code = in_process(["--output_dir", str(out), "--max_train_steps", "2", "--per_device_train_batch_size", "4",
                       "--dataloader_num_workers", "0", "--report_to", "none", "--logging_steps", "1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 64 and config["backbone_config"]["num_hidden_layers"] == 6
    assert "scikit-image" in (out / "README.md").read_text()
    assert [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl")] == [1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workspace, in_process, capsys):
    out = workspace["root"] / "diverging"
    args = common_args(workspace, out, 8, 4, "--checkpointing_steps", "1", "--visualization_steps", "0")
    args[args.index("--base_learning_rate") + 1] = "1e30"  # the second step blows the weights up
    code = in_process(args)
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite" in err and "last good checkpoint" in err
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    first_bad = int(err.split("non-finite (NaN or inf) at step ")[1].split()[0])
    assert checkpoints and max(checkpoints) < first_bad  # nothing saved after the loss went bad
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image_column_name", "photo"], "image_column_name 'photo' is not a column"),
        (["--image_size", "30"], "must be divisible by the encoder stride (8)"),
        (["--preset", "mfm-vit-nope"], "unknown preset 'mfm-vit-nope'"),
        (["--bf16_residual_stream"], "--bf16_residual_stream needs --mixed_precision bf16 (this run: no)"),
    ],
)
def test_bad_arguments_in_process(workspace, in_process, capsys, extra, message):
    args = common_args(workspace, workspace["root"] / "bad", 1)
    if extra[0] == "--preset":
        args = args[2:]  # a preset instead of the config file
    code = in_process(args + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_empty_folder_exits_non_zero_with_a_clear_message(workspace):
    empty = workspace["root"] / "empty"
    (empty / "sub").mkdir(parents=True)
    args = common_args(workspace, workspace["root"] / "bad_empty", 1)
    args[args.index("--train_dir") + 1] = str(empty)
    result = run_script(workspace, args)
    assert result.returncode == 2
    assert "contains no image files" in result.stderr and "Traceback" not in result.stderr


def test_torch_compile_saves_plain_weight_names(workspace, in_process, capsys):
    out = workspace["root"] / "compiled"
    code = in_process(common_args(workspace, out, 2, 4, "--torch_compile", "--torch_compile_backend", "eager",
                                  "--visualization_steps", "0"))
    assert code == 0, capsys.readouterr().err[-3000:]
    names = list(load_file(out / "model.safetensors"))
    assert names and not any("_orig_mod" in name for name in names)
    _, info = MFMForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(np.isfinite(r["train/loss"]) for r in read_metrics(out / "logs" / "metrics.jsonl"))


@pytest.mark.parametrize("pretext", ["sr", "deblur", "denoise"])
def test_restoration_pretext_from_the_command_line(workspace, in_process, capsys, pretext):
    out = workspace["root"] / f"pretext-{pretext}"
    code = in_process(common_args(workspace, out, 2, 4, "--corruption", pretext, "--loss_on", "all",
                                  "--visualization_steps", "0"))
    assert code == 0, capsys.readouterr().err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["corruption"] == pretext and config["loss_on"] == "all"
    records = read_metrics(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in records)


def test_decode_on_device_follows_the_pil_paths_trajectory(workspace, in_process, capsys, monkeypatch):
    """The same crops, masks and steps with JPEGs decoded by the 'device' (the CPU here): the losses follow the PIL
    path's (--no_jpeg_draft, full-size decoding) up to the two decoders' rounding; other images, the corrupt file
    and the pictures take their usual paths."""
    from modeling_mfm.training.data import pretraining_data

    decoded_batches = []
    real_decode_batch = pretraining_data.decode_batch

    def counting_decode_batch(batch, size, device):
        decoded_batches.append(len(batch["jpeg_crops"]))
        return real_decode_batch(batch, size, device)

    monkeypatch.setattr(pretraining_data, "decode_batch", counting_decode_batch)
    losses = {}
    for name, flag in (("pil", "--no_jpeg_draft"), ("device", "--decode_on_device")):
        out = workspace["root"] / f"decode-{name}"
        code = in_process(common_args(workspace, out, 4, 4, flag, "--visualization_steps", "2"))
        assert code == 0, capsys.readouterr().err[-3000:]
        records = read_metrics(out / "logs" / "metrics.jsonl")
        assert records[-1]["train/skipped_images"] == 1  # the corrupt JPEG, met once in the epoch
        assert (out / "reconstruction.png").exists()
        losses[name] = [r["train/loss"] for r in records]
    assert losses["device"] == pytest.approx(losses["pil"], rel=5e-3)  # other crops: 0.48 vs 0.80
    # only the device run went through decode_batch: its 4 steps and the pictures' batch, with JPEGs still encoded
    assert len(decoded_batches) == 5 and sum(decoded_batches) >= 8
