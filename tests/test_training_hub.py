"""Publishing to the Hub through a local mirror (no network), and the JSON-lines tracker."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from modeling_mfm.conversion.hub import publish_folder
from modeling_mfm.training.trackers import JSONLinesTracker, read_metrics


def make_output_folder(root):
    (root / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (root / "logs").mkdir()
    (root / "logs" / "metrics.jsonl").write_text("{}\n")
    (root / "reconstructions").mkdir()
    (root / "reconstructions" / "step-0000002.png").write_bytes(b"png")
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "config.json").write_text("{}")
    (root / "reconstruction.png").write_bytes(b"png")
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mfm\n---\n\n# model\n")


def test_push_publishes_the_model_not_the_training_byproducts(tmp_path):
    make_output_folder(tmp_path / "out")
    url = publish_folder(tmp_path / "out", "someone/mfm-test", local_dir=tmp_path / "hub")
    published = sorted(p.relative_to(tmp_path / "hub" / "someone" / "mfm-test").as_posix()
                       for p in (tmp_path / "hub").rglob("*") if p.is_file())
    assert published == ["README.md", "config.json", "model.safetensors", "reconstruction.png"]
    assert url.startswith("file://")
    # pushing again updates the same repository
    (tmp_path / "out" / "config.json").write_text('{"v": 2}')
    publish_folder(tmp_path / "out", "someone/mfm-test", local_dir=tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "someone" / "mfm-test" / "config.json").read_text()) == {"v": 2}


def test_push_refuses_bad_metadata_and_ids(tmp_path):
    make_output_folder(tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(Exception, match="(?i)yaml|while parsing|flow"):
        publish_folder(tmp_path / "out", "someone/bad", local_dir=tmp_path / "hub")
    with pytest.raises(ValueError, match="hub_model_id"):
        publish_folder(tmp_path / "out", "a/b/c", local_dir=tmp_path / "hub")


def test_jsonl_tracker_through_accelerate(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    accelerator = Accelerator(cpu=True, log_with=[JSONLinesTracker(path)])
    try:
        accelerator.init_trackers("run", config={"lr": 0.1, "name": "x"})
        accelerator.log({"loss": 0.5, "lr": 0.1}, step=1)
        accelerator.log({"loss": float("nan")}, step=2)
        accelerator.end_training()
    finally:
        AcceleratorState._reset_state(True)
    assert read_metrics(path) == [{"step": 1, "loss": 0.5, "lr": 0.1}, {"step": 2, "loss": "nan"}]
    assert json.loads((tmp_path / "logs" / "metrics_config.json").read_text()) == {"lr": 0.1, "name": "x"}
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a line cut short by a killed process is ignored
    assert len(read_metrics(path)) == 2


def test_one_trackers_helper_and_one_recorded_config(tmp_path):
    """`--report_to` in every loop: the JSON-lines file always, TensorBoard / W&B on request; the run's config is the
    arguments without credentials, plus derived values, as scalars and strings."""
    import dataclasses

    from modeling_mfm.training.trackers import build_trackers, check_report_to, start_trackers

    trackers = build_trackers("tensorboard", tmp_path)
    assert trackers[0].path == str(tmp_path / "logs" / "metrics.jsonl") and trackers[1:] == ["tensorboard"]
    assert len(build_trackers("none", tmp_path)) == 1
    for bad in ("mlflow", "tensorboard,wandb"):
        with pytest.raises(ValueError, match="report_to"):
            check_report_to(bad)

    @dataclasses.dataclass
    class Arguments:
        seed: int = 3
        hub_token: str = "secret"
        crop: tuple = (0.2, 1.0)

    accelerator = Accelerator(cpu=True, log_with=build_trackers("none", tmp_path))
    try:
        start_trackers(accelerator, "run", Arguments(), total_steps=7, data=None)
        accelerator.end_training()
    finally:
        AcceleratorState._reset_state(True)
    assert json.loads((tmp_path / "logs" / "metrics_config.json").read_text()) == {
        "seed": 3, "crop": "(0.2, 1.0)", "total_steps": 7, "data": "None"}
