"""Nothing read from disk is unpickled unrestricted: a payload planted in any file of a checkpoint never runs, the
resume stops with one line naming the file; no code path of the scripts (ours or Accelerate's) reaches an
unrestricted unpickler; and our sources contain none."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch
from reliability_fixtures import (
    REPO,
    MarkerPayload,
    copy_tree,
    finetune_args,
    finetune_workspace,
    payload_bytes,
    pretrain_args,
    pretrain_workspace,
    run_in_process,
    segmentation_args,
    segmentation_workspace,
)

from modeling_mfm.training.run.checkpoint_verification import CheckpointVerificationError, verify_checkpoint

pytestmark = pytest.mark.slow

SCRIPTS = {
    "pretrain": ("run_pretrain.py", pretrain_workspace, pretrain_args),
    "finetune": ("run_finetune.py", finetune_workspace, finetune_args),
    "segmentation": ("run_segmentation.py", segmentation_workspace, segmentation_args),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run of each resumable script: {name: (script, args builder, workspace, output folder)}."""
    runs = {}
    for name, (script, make_workspace, make_args) in SCRIPTS.items():
        root = tmp_path_factory.mktemp(name)
        workspace = make_workspace(root)
        output = root / "run"
        assert run_in_process(script, make_args(workspace, output)) == 0
        runs[name] = (script, make_args, workspace, output)
    return runs


def newest_checkpoint(output: Path) -> Path:
    return max((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_the_payload_runs_when_unpickled_unrestricted(tmp_path):
    """The planted bytes are live: an unrestricted unpickler executes them (so the tests below can fail)."""
    marker = tmp_path / "executed"
    pickle.loads(payload_bytes(marker, zipped=False))
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "payload.bin"
    path.write_bytes(payload_bytes(marker))
    torch.load(path, weights_only=False)  # noqa: S614 - proving the payload works, on a file this test wrote
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_payload_in_any_checkpoint_file_never_runs(trained, name, tmp_path, capsys):
    script, make_args, workspace, output = trained[name]
    files = sorted(p.name for p in newest_checkpoint(output).iterdir())
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(files)
    # every file of the checkpoint in turn, the file Accelerate reads with weights_only=False when an object is
    # registered for checkpointing, and a bare (not zipped) pickle
    plants = [(f, True) for f in files] + [("custom_checkpoint_0.pkl", True), ("optimizer.bin", False)]
    for file_name, zipped in plants:
        tampered = copy_tree(output, tmp_path / f"{file_name}-{zipped}")
        target = newest_checkpoint(tampered) / file_name
        marker = tmp_path / f"executed-{file_name}-{zipped}"
        target.write_bytes(payload_bytes(marker, zipped))
        capsys.readouterr()
        code = run_in_process(script, make_args(workspace, tampered))  # the same command: resumes "latest"
        err = capsys.readouterr().err
        assert not marker.exists(), f"the payload in {file_name} ran"
        assert code == 2, (file_name, err[-2000:])
        errors = [line for line in err.splitlines() if f"{script}: error:" in line]
        assert len(errors) == 1 and str(target) in errors[0], (file_name, err[-2000:])
        assert "Traceback" not in err


def test_a_tampered_rng_state_is_refused_not_skipped(trained, tmp_path):
    """Accelerate skips an RNG file it cannot use (logging at INFO); a resume must not continue differently."""
    _, _, _, output = trained["pretrain"]
    tampered = copy_tree(output, tmp_path / "rng")
    target = newest_checkpoint(tampered) / "random_states_0.pkl"
    torch.save({"step": 0, "random_state": "not a state", "numpy_random_seed": None, "torch_manual_seed": None},
               target)
    with pytest.raises(CheckpointVerificationError, match="random_states_0.pkl does not hold usable"):
        verify_checkpoint(newest_checkpoint(tampered))
    target.unlink()
    with pytest.raises(CheckpointVerificationError, match="random_states_0.pkl is missing"):
        verify_checkpoint(newest_checkpoint(tampered))
    verify_checkpoint(newest_checkpoint(output))  # the untouched checkpoint passes


class UnpicklingGuard:
    """Records every torch.load and fails on any unrestricted one or on pickle's own loaders."""

    def __init__(self, monkeypatch) -> None:
        self.calls = []
        real_load = torch.load

        def guarded_load(*args, **kwargs):
            self.calls.append(kwargs.get("weights_only"))
            if kwargs.get("weights_only") is not True:
                raise AssertionError(f"torch.load without weights_only=True: {args[:1]} {kwargs}")
            return real_load(*args, **kwargs)

        def refuse(*args, **kwargs):
            raise AssertionError("an unrestricted pickle loader was called")

        monkeypatch.setattr(torch, "load", guarded_load)
        monkeypatch.setattr(torch.serialization, "load", guarded_load)
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(pickle, name, refuse)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_save_and_resume_never_unpickle_unrestricted(name, tmp_path, monkeypatch, capsys):
    script, make_workspace, make_args = SCRIPTS[name]
    workspace = make_workspace(tmp_path)
    guard = UnpicklingGuard(monkeypatch)
    output = tmp_path / "run"
    first = ["--stop_after_steps", "2"] if name == "finetune" else []
    assert run_in_process(script, make_args(workspace, output, *first)) == 0, capsys.readouterr().err[-3000:]
    loads_before_resume = len(guard.calls)
    assert run_in_process(script, make_args(workspace, output)) == 0, capsys.readouterr().err[-3000:]
    # the resume loaded the optimizer and RNG states (our checks, then Accelerate), all through the guard
    assert len(guard.calls) >= loads_before_resume + 4 and all(guard.calls)


# ---------------------------------------------------------------------------------------------------- sources
UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "loads"),
}


def python_sources() -> list[Path]:
    folders = [REPO / "modeling_mfm", REPO / "run_scripts", REPO / "benchmarks"]
    return sorted(p for folder in folders if folder.is_dir() for p in folder.rglob("*.py"))


def unsafe_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in ("register_for_checkpointing", "load_custom_state"):
            found.append(f"{path.name}:{node.lineno} {node.attr}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        keywords = {k.arg: k.value for k in node.keywords}
        if (owner, name) in UNSAFE_CALLS:
            found.append(f"{path.name}:{node.lineno} {owner}.{name}")
        for keyword, unsafe in (("weights_only", False), ("trust_remote_code", True)):  # from_pretrained & co
            value = keywords.get(keyword)
            if isinstance(value, ast.Constant) and value.value is unsafe:
                found.append(f"{path.name}:{node.lineno} {keyword}={unsafe}")
        if (owner, name) == ("torch", "load"):
            safe = keywords.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{path.name}:{node.lineno} numpy.load with allow_pickle")
    return found


def test_sources_have_no_unrestricted_unpickling():
    sources = python_sources()
    assert len(sources) > 20
    found = [use for path in sources for use in unsafe_uses(path)]
    assert not found, found


def test_the_source_check_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch\npickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                   "accelerator.register_for_checkpointing(s)\nAutoModel.from_pretrained('x', trust_remote_code=True)\n")
    assert sorted(use.split(" ", 1)[1] for use in unsafe_uses(bad)) == [
        "pickle.loads", "register_for_checkpointing", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "trust_remote_code=True", "weights_only=False"]
    assert MarkerPayload  # the payload class the checkpoint tests plant
