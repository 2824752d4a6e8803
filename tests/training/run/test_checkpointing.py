"""Atomic, rotated training checkpoints written with Accelerate, and how "latest" is found again."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from modeling_mfm.training.run.checkpointing import (
    TRAINER_STATE_NAME,
    list_checkpoints,
    read_trainer_state,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(True)  # leave no global Accelerate state to other tests


def prepared(accelerator):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return accelerator.prepare(model, optimizer, scheduler)


def train_step(model, optimizer, scheduler):
    loss = model(torch.ones(3, 4)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_save_resolve_rotate(tmp_path, accelerator):
    model, optimizer, scheduler = prepared(accelerator)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler)
        path = save_checkpoint(accelerator, root, step, {"note": "x"}, keep=2)
        assert path == root / f"checkpoint-{step}"
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]  # the newest two
    assert resolve_checkpoint("latest", root) == root / "checkpoint-3"
    assert read_trainer_state(root / "checkpoint-3") == {"note": "x", "step": 3}
    assert not list((root).glob(".tmp-*"))
    # the saved state restores weights, optimizer and scheduler
    weights = model.weight.detach().clone()
    lr = optimizer.param_groups[0]["lr"]
    train_step(model, optimizer, scheduler)
    accelerator.load_state(str(root / "checkpoint-3"))
    assert torch.equal(model.weight, weights) and optimizer.param_groups[0]["lr"] == lr


def test_a_save_in_progress_never_shows_under_a_checkpoint_name(tmp_path, accelerator):
    model, optimizer, scheduler = prepared(accelerator)
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, {})
    seen = {}

    def during_save(models, weights, output_dir):  # runs inside Accelerator.save_state, before any file is written
        seen["output_dir"] = output_dir
        seen["latest"] = resolve_checkpoint("latest", root)
        seen["names"] = sorted(p.name for p in root.iterdir())

    handle = accelerator.register_save_state_pre_hook(during_save)
    save_checkpoint(accelerator, root, 2, {})
    handle.remove()
    assert ".tmp-checkpoint-2" in str(seen["output_dir"])
    assert seen["latest"] == root / "checkpoint-1"  # a crash at this moment resumes from the previous checkpoint
    assert "checkpoint-2" not in seen["names"]
    assert resolve_checkpoint("latest", root) == root / "checkpoint-2"


def test_leftovers_of_a_killed_save_are_ignored_and_cleaned(tmp_path, accelerator):
    model, optimizer, scheduler = prepared(accelerator)
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 4, {})
    (root / ".tmp-checkpoint-6").mkdir()
    (root / ".tmp-checkpoint-6" / "model.safetensors").write_bytes(b"half")
    (root / "checkpoint-9").mkdir()  # a folder without trainer state is not a checkpoint
    assert resolve_checkpoint("latest", root) == root / "checkpoint-4"
    removed = remove_stale_temporaries(root)
    assert [p.name for p in removed] == [".tmp-checkpoint-6"] and not (root / ".tmp-checkpoint-6").exists()
    # saving again at an existing step replaces that checkpoint
    train_step(model, optimizer, scheduler)
    save_checkpoint(accelerator, root, 4, {"again": True})
    assert read_trainer_state(root / "checkpoint-4")["again"] is True


def test_resolve_checkpoint_arguments(tmp_path):
    assert resolve_checkpoint("latest", tmp_path / "nothing-yet") is None  # the same command starts a fresh run
    assert resolve_checkpoint("none", tmp_path) is None and resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_checkpoint(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "partial").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "partial"), tmp_path)
    (tmp_path / "partial" / TRAINER_STATE_NAME).write_text(json.dumps({"step": 3}))
    assert resolve_checkpoint(str(tmp_path / "partial"), tmp_path) == tmp_path / "partial"
    with pytest.raises(ValueError, match="keep"):
        rotate_checkpoints(tmp_path, 0)
