"""The trackers every loop uses: the JSON-lines tracker through Accelerate and the one trackers helper."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from modeling_mfm.training.run.trackers import JSONLinesTracker, read_metrics


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


def test_read_metrics_upgrades_the_names_older_pre_training_runs_logged(tmp_path):
    """A pre-training run resumed across 0.2.0 logged ``loss``... before and ``train/loss``... after."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5, "lr": 0.1, "img_per_s": 9.0}\n{"step": 2, "knn_top1": 40.0}\n'
                    '{"step": 3, "train/loss": 0.4, "eval/top1": 50.0}\n')
    assert read_metrics(path)[0] == {"step": 1, "loss": 0.5, "lr": 0.1, "img_per_s": 9.0}  # as written
    assert read_metrics(path, upgrade=True) == [
        {"step": 1, "train/loss": 0.5, "train/lr": 0.1, "train/img_per_s": 9.0},
        {"step": 2, "eval/knn_top1": 40.0},
        {"step": 3, "train/loss": 0.4, "eval/top1": 50.0},
    ]


def test_one_trackers_helper_and_one_recorded_config(tmp_path):
    """`--report_to` in every loop: the JSON-lines file always, TensorBoard / W&B on request; the run's config is the
    arguments without credentials, plus derived values, as scalars and strings."""
    import dataclasses

    from modeling_mfm.training.run.trackers import build_trackers, check_report_to, start_trackers

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
