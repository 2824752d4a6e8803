"""An output folder belongs to one run: a second run is refused at once (also under a multi-process launch), the lock
of a killed run is taken over, every resumable script follows one resume rule, and a resume that would change the
run's settings stops unless told (then the changes are recorded)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from classification_fixtures import script_env
from reliability_fixtures import (
    REPO,
    finetune_args,
    finetune_workspace,
    free_port,
    pretrain_args,
    pretrain_workspace,
    run_in_process,
    segmentation_args,
    segmentation_workspace,
)

from modeling_mfm.training.run.checkpointing import read_trainer_state
from modeling_mfm.training.run.run_folder import (
    OutputFolderLock,
    RunFolderError,
    check_settings,
    describe_changes,
    trajectory_settings,
)
from modeling_mfm.training.run.trackers import read_metrics

pytestmark = pytest.mark.slow

HOLD_LOCK = """
import sys, time
from modeling_mfm.training.run.run_folder import OutputFolderLock
lock = OutputFolderLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def error_lines(err: str, script: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{script}: error:")]


@pytest.fixture(scope="module")
def pretrain_ws(tmp_path_factory):
    return pretrain_workspace(tmp_path_factory.mktemp("pretrain"))


def test_lock_refuses_a_second_holder_and_is_taken_over_after_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=script_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"is in use by another run \(pid {holder.pid} on "):
            OutputFolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with OutputFolderLock(tmp_path) as lock:  # the dead holder's lock is gone with its process
        lock.acquire()
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_a_second_run_on_the_same_folder_stops_at_once(pretrain_ws, tmp_path, capsys):
    output = tmp_path / "shared"
    steps = 60
    first = subprocess.Popen([sys.executable, str(REPO / "run_scripts" / "run_pretrain.py"),
                              *pretrain_args(pretrain_ws, output, "--checkpointing_steps", "0", steps=steps)],
                             env=script_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (output / "run.lock").is_file() or str(first.pid) not in (output / "run.lock").read_text():
        assert first.poll() is None and time.time() < deadline, "the first run ended before locking its folder"
        time.sleep(0.05)
    code = run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output, "--seed", "1"))
    err = capsys.readouterr().err
    # "at once": refused while the first run is still going, before it read any data or built a model
    assert first.poll() is None, "the first run finished before the second one tried: make it longer"
    assert code == 2, code
    assert "Generating train split" not in err and "pre-training" not in err, err[-2000:]
    lines = error_lines(err, "run_pretrain.py")
    assert len(lines) == 1 and f"is in use by another run (pid {first.pid} on " in lines[0]
    assert "Traceback" not in err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    # the first run's log is its own: each step once, in order
    assert [r["step"] for r in read_metrics(output / "logs" / "metrics.jsonl")] == list(range(1, steps + 1))


def test_every_process_of_a_launch_stops_when_the_folder_is_taken(pretrain_ws, tmp_path):
    output = tmp_path / "taken"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    with OutputFolderLock(output) as lock:
        lock.acquire()
        result = subprocess.run([*launch, str(REPO / "run_scripts" / "run_pretrain.py"),
                                 *pretrain_args(pretrain_ws, output)], env=dict(script_env(tmp_path),
                                ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=240,
                                check=False)
    assert result.returncode != 0
    lines = error_lines(result.stderr, "run_pretrain.py")
    assert len(lines) == 2, result.stderr[-3000:]  # the main process and the other one, each one line
    assert f"is in use by another run (pid {os.getpid()} on " in lines[0] + lines[1]
    assert not (output / "checkpoints").exists() and not (output / "logs").exists()


SCRIPTS = {
    "run_pretrain.py": (pretrain_workspace, pretrain_args),
    "run_finetune.py": (finetune_workspace, finetune_args),
    "run_segmentation.py": (segmentation_workspace, segmentation_args),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_one_resume_rule_in_every_script(script, tmp_path, capsys):
    make_workspace, make_args = SCRIPTS[script]
    workspace = make_workspace(tmp_path)
    output = tmp_path / "run"
    assert run_in_process(script, make_args(workspace, output)) == 0
    checkpoints = sorted((output / "checkpoints").iterdir())
    saved = {p: (p / "model.safetensors").read_bytes() for p in checkpoints}
    capsys.readouterr()
    # the same command again continues the run (here: finds it complete) and keeps its checkpoints
    assert run_in_process(script, make_args(workspace, output)) == 0
    assert {p: (p / "model.safetensors").read_bytes() for p in checkpoints} == saved
    capsys.readouterr()
    # a fresh start over the checkpoints is refused ...
    assert run_in_process(script, make_args(workspace, output, "--resume_from_checkpoint", "none")) == 2
    lines = error_lines(capsys.readouterr().err, script)
    assert len(lines) == 1 and "holds checkpoints of an earlier run" in lines[0]
    # ... and so is a resume that would change the trajectory, naming each change
    assert run_in_process(script, make_args(workspace, output, "--seed", "5")) == 2
    lines = error_lines(capsys.readouterr().err, script)
    assert len(lines) == 1 and "would change the run: seed 0 -> 5" in lines[0]
    assert {p: (p / "model.safetensors").read_bytes() for p in checkpoints} == saved


def test_changed_settings_are_listed_or_recorded(pretrain_ws, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output)) == 0
    changed = ["--seed", "1", "--mask_radius", "3", "--base_learning_rate", "0.1"]
    capsys.readouterr()
    assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output, *changed)) == 2
    (line,) = error_lines(capsys.readouterr().err, "run_pretrain.py")
    for change in ("model.mask_radius 4 -> 3", "schedule.peak_lr 0.000390625 -> 0.00078125", "seed 0 -> 1"):
        assert change in line
    assert "--allow_changed_settings" in line
    # allowed: the run continues from step 2 with the new settings, which the trainer state and the card record
    resumed = pretrain_args(pretrain_ws, output, *changed, "--allow_changed_settings",
                            "--resume_from_checkpoint", str(output / "checkpoints" / "checkpoint-2"))
    assert run_in_process("run_pretrain.py", resumed) == 0
    state = read_trainer_state(output / "checkpoints" / "checkpoint-4")
    assert state["settings"]["seed"] == 1 and state["settings_changes"][0]["step"] == 2
    assert "seed 0 -> 1" in state["settings_changes"][0]["changes"]
    card = (output / "README.md").read_text()
    assert "settings changed on resume" in card and "at step 2: " in card and "seed 0 -> 1" in card


def test_overwrite_output_dir_starts_over_and_foreign_checkpoints_are_refused(pretrain_ws, tmp_path, capsys,
                                                                              caplog):
    output, other = tmp_path / "run", tmp_path / "other"
    assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output)) == 0
    assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, other, "--seed", "3", steps=2)) == 0
    capsys.readouterr()
    # a checkpoint of another folder cannot continue where checkpoints of a different run are
    foreign = ["--resume_from_checkpoint", str(other / "checkpoints" / "checkpoint-2")]
    assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output, *foreign)) == 2
    (line,) = error_lines(capsys.readouterr().err, "run_pretrain.py")
    assert "holds checkpoints of another run" in line
    with caplog.at_level("WARNING"):
        assert run_in_process("run_pretrain.py", pretrain_args(pretrain_ws, output, "--seed", "3",
                                                              "--overwrite_output_dir", steps=2)) == 0
    assert "--overwrite_output_dir: deleting" in caplog.text
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-2"]  # the old run's are gone
    assert read_trainer_state(output / "checkpoints" / "checkpoint-2")["settings"]["seed"] == 3
    assert [r["step"] for r in read_metrics(output / "logs" / "metrics.jsonl")] == [1, 2]


def test_trajectory_settings_keep_no_token_and_compare_local_paths_absolutely(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Arguments:
        train_dir: str = "data"
        train_split: str = "data"  # not a path, even where a folder of that name exists
        hub_token: str = "secret"
        logging_steps: int = 10
        seed: int = 0

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = trajectory_settings(Arguments(), {"logging_steps"}, model={"backbone": {"depth": 2}}, lr=(1, 2))
    assert settings == {"train_dir": str(tmp_path / "data"), "train_split": "data", "seed": 0,
                        "model.backbone.depth": 2, "lr": [1, 2]}


def test_describe_changes():
    assert describe_changes({"a": 1, "b": [1, 2], "c": "x"}, {"a": 1, "b": [1, 3], "d": None}) == [
        "b [1, 2] -> [1, 3]", "c 'x' -> '(absent)'", "d '(absent)' -> None"]


def test_the_settings_of_an_older_version_are_read_under_the_renamed_flags(tmp_path):
    """0.2.0 renamed fine-tuning's clip_grad (None = no clipping) to max_grad_norm (0 = no clipping) and records
    settings older runs did not (AdamW's epsilon, segmentation's betas and clipping): such a run resumes unchanged."""
    now = {"seed": 0, "max_grad_norm": 0.0, "adam_epsilon": 1e-8, "adam_beta1": 0.9, "adam_beta2": 0.999}
    fine_tuning = {"settings": {"seed": 0, "clip_grad": None, "adam_beta1": 0.9, "adam_beta2": 0.999}}
    assert check_settings(tmp_path, fine_tuning, now, allow_changes=False) == []
    segmentation = {"settings": {"seed": 0}}
    assert check_settings(tmp_path, segmentation, now, allow_changes=False) == []
    # a real change is still one: an old run that clipped at 1.0, resumed without clipping
    clipped = {"settings": {**fine_tuning["settings"], "clip_grad": 1.0}}
    with pytest.raises(RunFolderError, match=r"max_grad_norm 1\.0 -> 0\.0"):
        check_settings(tmp_path, clipped, now, allow_changes=False)
    assert check_settings(tmp_path, clipped, {**now, "max_grad_norm": 1.0}, allow_changes=False) == []
    # a setting the current run does not record is not made up for the old one
    assert check_settings(tmp_path, {"settings": {"seed": 0}}, {"seed": 0}, allow_changes=False) == []
