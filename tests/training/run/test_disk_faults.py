"""Faults say what happened: a full disk names the path and "no space left on device", removes its temporary folder
and loses nothing (the same command resumes to the uninterrupted run's weights); a real write failure (a file-size
limit) stops the run the same way; fp16 where autocast cannot run it is refused, and the card records the precision
that ran."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from classification_fixtures import script_env
from reliability_fixtures import (
    REPO,
    finetune_args,
    finetune_workspace,
    pretrain_args,
    pretrain_workspace,
    run_in_process,
)
from safetensors.torch import load_file

from modeling_mfm.training.run import disk_faults
from modeling_mfm.training.run.checkpoint_verification import verify_checkpoint
from modeling_mfm.training.run.checkpointing import list_checkpoints, save_checkpoint
from modeling_mfm.training.run.disk_faults import WriteFailedError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return pretrain_workspace(tmp_path_factory.mktemp("pretrain"))


def full_disk_on_save(monkeypatch, failing_call: int, error: Exception) -> list:
    """``Accelerator.save_state`` writes part of its files, then fails as a full disk does, on its
    ``failing_call``-th call."""
    real_save_state = Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == failing_call:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"half a model")
            raise error
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    return calls


def test_a_full_disk_names_the_path_cleans_up_and_loses_nothing(workspace, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "uninterrupted"
    assert run_in_process("run_pretrain.py", pretrain_args(workspace, reference)) == 0
    output = tmp_path / "full-disk"
    calls = full_disk_on_save(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    capsys.readouterr()
    assert run_in_process("run_pretrain.py", pretrain_args(workspace, output)) == 3
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("run_pretrain.py: stopped:")]
    assert "no space left on device" in line and str(output / "checkpoints" / ".tmp-checkpoint-4") in line
    assert "the partial checkpoint was removed; the previous checkpoints are intact" in line
    assert "Traceback" not in err and len(calls) == 2
    assert not list((output / "checkpoints").glob(".tmp-*"))
    assert [step for step, _ in list_checkpoints(output / "checkpoints")] == [2]
    verify_checkpoint(output / "checkpoints" / "checkpoint-2")
    # space freed: the same command continues from step 2 and ends where the uninterrupted run ended
    monkeypatch.undo()
    assert run_in_process("run_pretrain.py", pretrain_args(workspace, output)) == 0
    expected, actual = load_file(reference / "model.safetensors"), load_file(output / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("free", "cause"), [(0, "no space left on device"), (2**40, "the write failed")])
def test_a_write_error_without_errno_is_classified_by_free_space(tmp_path, monkeypatch, free, cause):
    """torch.save reports a full disk as "basic_ios::clear: iostream error", without an errno."""
    accelerator = Accelerator(cpu=True)
    try:
        model = torch.nn.Linear(2, 2)
        model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
        save_checkpoint(accelerator, tmp_path, 1, {})
        full_disk_on_save(monkeypatch, 1, RuntimeError("basic_ios::clear: iostream error"))
        usage = disk_faults.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(disk_faults.shutil, "disk_usage", lambda path: usage._replace(free=free))
        with pytest.raises(WriteFailedError) as failure:
            save_checkpoint(accelerator, tmp_path, 2, {})
    finally:
        AcceleratorState._reset_state(True)
    message = str(failure.value)
    assert message.startswith(f"{cause}: could not write checkpoint checkpoint-2 to {tmp_path / '.tmp-checkpoint-2'}")
    assert "iostream error" in message and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_real_write_failure_stops_the_run_with_one_line(workspace, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) between the size of the weights and of the optimizer state: the first
    checkpoint cannot be written, for real."""
    output = tmp_path / "limited"
    limit = 220_000  # tiny model: weights 125 kB, optimizer state 275 kB, pictures 145 kB

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail (EFBIG)

    result = subprocess.run([sys.executable, str(REPO / "run_scripts" / "run_pretrain.py"),
                             *pretrain_args(workspace, output)], env=script_env(tmp_path), capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_file_size, check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("run_pretrain.py: stopped:")]
    assert f"could not write checkpoint checkpoint-2 to {output / 'checkpoints' / '.tmp-checkpoint-2'}" in line
    assert "Traceback" not in result.stderr
    assert list((output / "checkpoints").iterdir()) == []  # no partial checkpoint left behind


def test_fp16_where_autocast_cannot_run_it_is_refused_and_the_card_records_what_ran(workspace, tmp_path, capsys):
    assert run_in_process("run_pretrain.py", pretrain_args(workspace, tmp_path / "fp16", "--mixed_precision",
                                                          "fp16")) == 2
    ft = finetune_workspace(tmp_path)
    assert run_in_process("run_finetune.py", finetune_args(ft, tmp_path / "ft16", "--mixed_precision", "fp16")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "--mixed_precision fp16 cannot run on the cpu" in line]
    assert len(lines) == 2 and lines[0].startswith("run_pretrain.py: error:")
    assert lines[1].startswith("run_finetune.py: error:")
    assert not (tmp_path / "fp16" / "checkpoints").exists() and not (tmp_path / "ft16" / "checkpoints").exists()
    output = tmp_path / "bf16"
    assert run_in_process("run_pretrain.py", pretrain_args(workspace, output, "--mixed_precision", "bf16",
                                                          steps=2)) == 0
    assert "| mixed precision | bf16 |" in (output / "README.md").read_text()
