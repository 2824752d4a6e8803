"""The experiment trackers of every training loop: ``--report_to`` (TensorBoard, W&B, both or none) plus a JSON-lines
file that is always written, and one way to record the run's configuration.

The JSON-lines tracker (``<output_dir>/logs/metrics.jsonl``) needs no dependency, survives restarts (append mode),
and gives scripts and tests the exact logged values (`read_metrics`). Every training script names its metrics
``train/<name>`` and ``eval/<name>``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import is_tensorboard_available, is_wandb_available

from ...publishing.folder_layout import LOGS_FOLDER
from .disk_faults import write_faults

__all__ = [
    "METRICS_FILE",
    "RENAMED_METRICS",
    "REPORT_TO",
    "JSONLinesTracker",
    "build_trackers",
    "check_report_to",
    "read_metrics",
    "start_trackers",
]

METRICS_FILE = "metrics.jsonl"
REPORT_TO = ("tensorboard", "wandb", "all", "none")
_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}

# What pre-training logged without a prefix before 0.2.0 -> the name since; a run resumed across the upgrade holds
# both spellings in its metrics.jsonl (`read_metrics` with ``upgrade=True`` reads them all under the new names).
RENAMED_METRICS = {
    **{name: f"train/{name}" for name in ("loss", "lr", "grad_norm", "img_per_s", "peak_memory_mib",
                                          "skipped_images", "epoch")},
    **{name: f"eval/{name}" for name in ("knn_top1", "gain_low_pass_db", "gain_high_pass_db")},
}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class JSONLinesTracker(GeneralTracker):
    """Appends ``{"step": step, **values}`` to ``path`` for each `Accelerator.log` call (main process only); the run
    configuration goes to ``<path without extension>_config.json``."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)

    @property
    def tracker(self) -> str:
        return self.path

    @on_main_process
    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        config_path = os.path.splitext(self.path)[0] + "_config.json"
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(_plain(values), f, indent=2, sort_keys=True)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        with write_faults(self.path, "the metrics log"), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **_plain(values)}) + "\n")


def read_metrics(path: str | os.PathLike, upgrade: bool = False) -> list[dict[str, Any]]:
    """The records of a `JSONLinesTracker` file, in order (a restarted run appends after the killed one); with
    ``upgrade``, the metrics an older version logged under another name get their current one (`RENAMED_METRICS`)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed process
                    continue
                if upgrade:
                    record = {RENAMED_METRICS.get(key, key): value for key, value in record.items()}
                records.append(record)
    return records


def check_report_to(report_to: str) -> None:
    """A ValueError naming ``--report_to`` when it is unknown or names a tracker whose package is missing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to in _AVAILABLE and not _AVAILABLE[report_to]():
        raise ValueError(f"--report_to {report_to} needs the {report_to} package (pip install {report_to})")


def build_trackers(report_to: str, output_dir: str | os.PathLike) -> list[Any]:
    """Accelerate's ``log_with`` for ``--report_to``: `JSONLinesTracker` on ``<output_dir>/logs/metrics.jsonl``, plus
    TensorBoard and / or W&B (``all``: those installed)."""
    check_report_to(report_to)
    wanted = list(_AVAILABLE) if report_to == "all" else [report_to] if report_to in _AVAILABLE else []
    named = [name for name in wanted if _AVAILABLE[name]()]
    return [JSONLinesTracker(os.path.join(output_dir, LOGS_FOLDER, METRICS_FILE)), *named]


def start_trackers(accelerator: Any, project_name: str, arguments: Any, **derived: Any) -> None:
    """Starts the trackers with the run's configuration: the ``arguments`` dataclass (credentials left out) and the
    ``derived`` values (total batch, steps, precision in effect...), as the scalars and strings trackers take."""
    values = {k: v for k, v in dataclasses.asdict(arguments).items() if not k.endswith("token")}
    values.update(derived)
    config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}
    accelerator.init_trackers(project_name, config=config)
