"""Training checkpoints: Accelerate state written atomically, rotated, and found again on restart.

A checkpoint is written by `Accelerator.save_state` into a hidden temporary folder, completed with
``trainer_state.json`` (step, epoch, counters), and only then renamed to ``checkpoint-<step>``. A rename within one
filesystem is atomic, so a run killed at any moment leaves either the previous checkpoints or the new one — never a
half-written folder under a checkpoint name. Temporary leftovers are ignored by `list_checkpoints` and removed at
the next start. (This guards against crashed or killed processes; surviving a power cut would also need fsync.)
A save that fails (a full disk...) removes its temporary folder and raises `disk_faults.WriteFailedError` naming
the path: the previous checkpoints stay as they were.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .disk_faults import write_failure

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE_NAME",
    "TrainerState",
    "list_checkpoints",
    "read_trainer_state",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".old-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


@dataclass
class TrainerState:
    """A loop's progress, saved as a checkpoint's ``trainer_state.json`` (plain JSON: nothing is unpickled to
    resume). Each loop uses the fields it needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the pass over the data in progress (fine-tuning)
    batches_in_epoch: int = 0  # micro-batches of that pass done (fine-tuning)
    skipped_images: int = 0  # unreadable training images replaced so far
    best: dict[str, Any] = field(default_factory=dict)  # the best evaluation so far
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation
    settings: dict[str, Any] = field(default_factory=dict)  # what a resume must keep (run_folder)
    settings_changes: list[dict[str, Any]] = field(default_factory=list)  # what --allow_changed_settings let change


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_checkpoint(spec: str | None, root: str | os.PathLike) -> Path | None:
    """``"latest"``: the newest complete checkpoint under ``root`` (None if there is none yet, so that the same
    command starts a run and continues it); ``None``/``"none"``: no resume; anything else: a checkpoint folder."""
    if spec is None or spec.lower() == "none":
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(root)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint {spec!r} is not a folder (use 'latest', 'none' or a checkpoint)")
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"resume_from_checkpoint {spec!r} is not a complete checkpoint (no {TRAINER_STATE_NAME})")
    return path


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    with open(Path(checkpoint) / TRAINER_STATE_NAME, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Deletes the temporary folders that an interrupted save left behind (call on the main process only)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.startswith((TEMPORARY_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def rotate_checkpoints(root: str | os.PathLike, keep: int | None) -> list[Path]:
    """Deletes all but the newest ``keep`` complete checkpoints (``None`` keeps everything)."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"the number of checkpoints to keep must be >= 1 or None, got {keep}")
    doomed = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _failed_anywhere(accelerator: Any, failed: bool) -> bool:
    """Whether any process failed (every process must take the same branch, or the others would wait forever)."""
    if accelerator.num_processes == 1:
        return failed
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([int(failed)], device=accelerator.device), reduction="sum").item())


def save_checkpoint(
    accelerator: Any, root: str | os.PathLike, step: int, trainer_state: dict[str, Any], keep: int | None = None
) -> Path:
    """Saves the Accelerate state (model, optimizer, grad scaler, RNG of every process) and ``trainer_state`` as
    ``root/checkpoint-<step>``, atomically, then keeps the newest ``keep``. Call on every process."""
    root = Path(root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    temporary = root / f"{TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            _write_json(temporary / TRAINER_STATE_NAME, {**trainer_state, "step": step})
    except (OSError, RuntimeError) as raised:  # torch.save reports a full disk as a RuntimeError
        error = raised
    if _failed_anywhere(accelerator, error is not None):
        failure = None
        if error is not None:
            failure = write_failure(error, temporary, f"checkpoint {final.name}",
                                    "the partial checkpoint was removed; the previous checkpoints are intact")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        if failure is None:
            failure = write_failure(RuntimeError("another process failed"), temporary, f"checkpoint {final.name}",
                                    "the partial checkpoint was removed")
        raise failure from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # an older run reached this step: swap it out, never leave the name empty of a checkpoint
            trash = root / f"{TRASH_PREFIX}{step}"
            os.replace(final, trash)
            os.replace(temporary, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temporary, final)
        removed = rotate_checkpoints(root, keep)
        logger.info("saved %s%s", final, f" (removed {', '.join(p.name for p in removed)})" if removed else "")
    accelerator.wait_for_everyone()
    return final
