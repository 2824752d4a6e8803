"""A JSON-lines experiment tracker for Accelerate: every logged step appended as one JSON object to a local file.

Always on, next to TensorBoard / W&B: it needs no dependency, survives restarts (append mode), and gives scripts and
tests the exact logged values (``read_metrics``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

from .disk_faults import write_faults

__all__ = ["JSONLinesTracker", "read_metrics"]


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


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `JSONLinesTracker` file, in order (a restarted run appends after the killed one)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed process
                    continue
    return records
