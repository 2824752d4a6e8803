"""An output folder belongs to one run: the lock, the resume rule and the settings check every resumable script uses.

* **Lock.** The main process holds an OS lock (``fcntl.flock``) on ``<output_dir>/run.lock`` for the run's life; the
  file records who holds it (pid, host, start time) for the message a second run gets. The operating system
  drops the lock when the process ends, however it ends, so the lock of a run killed with SIGKILL is simply taken
  over. A second run on the same folder stops at once with one line; in a multi-process run the other processes
  stop with it.
* **Resume rule, the same in every script.** ``--resume_from_checkpoint latest`` (the default) continues from the
  newest complete checkpoint in ``<output_dir>/checkpoints`` and starts fresh when there is none, so re-running a
  command continues it; a checkpoint folder resumes from that folder; ``none`` starts fresh and is refused when the
  folder holds checkpoints, unless ``--overwrite_output_dir`` (which deletes them and the logs first, saying so).
  Every file of the checkpoint is checked before it is loaded (`checkpoint_verification`).
* **Settings.** A checkpoint's ``trainer_state.json`` records the settings that determine the run's trajectory
  (seed, learning rates, batch, schedule length, data, model configuration, ...). A resume whose settings differ
  stops and lists the differences, unless ``--allow_changed_settings``: then they are logged, kept in the trainer
  state and written to the model card. A checkpoint of an older version is read under today's names
  (`_upgraded_settings`), so that renaming a flag does not stop its run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import torch

from ...cli import ScriptError
from ...publishing.folder_layout import CHECKPOINTS_FOLDER, LOGS_FOLDER
from .checkpoint_verification import verify_checkpoint
from .checkpointing import (
    TrainerState,
    list_checkpoints,
    read_trainer_state,
    remove_stale_temporaries,
    resolve_checkpoint,
)
from .monitoring import precision_in_effect


@dataclasses.dataclass(kw_only=True)
class RunFolderArguments:
    """The resume rule's flags, one wording for every script that resumes (pre-training, fine-tuning, segmentation)."""

    resume_from_checkpoint: str = dataclasses.field(
        default="latest",
        metadata={"help": "'latest' (the newest checkpoint in output_dir/checkpoints; starts fresh if there is none, "
                          "so re-running a command continues it), a checkpoint folder, or 'none' (start fresh; "
                          "refused when output_dir holds checkpoints, unless --overwrite_output_dir)."},
    )
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={"help": "Start a new run in output_dir: delete the checkpoints and logs of the run that was there."},
    )
    allow_changed_settings: bool = dataclasses.field(
        default=False,
        metadata={"help": "Resume even if settings that change the training (seed, learning rates, batch, schedule, "
                          "data, model configuration...) differ from the checkpoint's; the differences are logged "
                          "and recorded with the results (model card or all_results.json)."},
    )

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl
    fcntl = None

__all__ = [
    "LOCK_NAME",
    "OutputFolderLock",
    "RunFolderError",
    "check_settings",
    "claim_output_dir",
    "config_settings",
    "describe_changes",
    "describe_settings_changes",
    "find_resume_checkpoint",
    "hold_output_dir",
    "resume_run",
    "trajectory_settings",
]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
ABSENT = "(absent)"


class RunFolderError(ScriptError):
    """The run cannot use its output folder as asked (busy, checkpoints in the way, changed settings): exit code 2."""


# ---------------------------------------------------------------------------------------------------- the lock
class OutputFolderLock:
    """An exclusive, non-blocking OS lock on ``<output_dir>/run.lock``, released by `release` or by the end of the
    process."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        """Takes the lock or raises `RunFolderError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run; never truncates
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _describe_holder(handle.read())
                handle.close()
                raise RunFolderError(
                    f"{self.path.parent} is in use by another run ({holder}); wait for it to end or choose another "
                    "--output_dir"
                ) from None
        else:
            logger.warning("no advisory file locks on this platform: nothing stops two runs sharing %s",
                           self.path.parent)
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}, handle)
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


def claim_output_dir(output_dir: str | os.PathLike, accelerator: Any) -> OutputFolderLock:
    """The main process takes the folder's lock; every process raises `RunFolderError` if it could not (call on
    every process, before anything is written to the folder)."""
    lock = OutputFolderLock(output_dir)
    refusal = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunFolderError as error:
            refusal = error
        except OSError as error:  # an output folder that cannot be created or written: stop every process too
            refusal = RunFolderError(f"cannot lock {lock.path}: {error}")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        refused = broadcast(torch.tensor([int(refusal is not None)], device=accelerator.device), from_process=0)
        if refused.item() and refusal is None:
            raise RunFolderError(f"{output_dir} is in use by another run (the main process could not lock it)")
    if refusal is not None:
        raise refusal
    return lock


@contextlib.contextmanager
def hold_output_dir(accelerator: Any, output_dir: str | os.PathLike) -> Iterator[str]:
    """A run's life in its output folder: the mixed precision checked (`precision_in_effect`, yielded), the folder
    locked (`claim_output_dir`), and Accelerate's trackers and process group ended however the run ends. Refusals
    are `ScriptError`s (exit status 2)."""
    try:
        precision = precision_in_effect(accelerator)
        lock = claim_output_dir(output_dir, accelerator)
        with lock:
            yield precision
    finally:
        accelerator.end_training()


# ---------------------------------------------------------------------------------------------------- resuming
def find_resume_checkpoint(
    resume_from_checkpoint: str | None,
    output_dir: str | os.PathLike,
    accelerator: Any,
    overwrite_output_dir: bool = False,
    checkpoints_folder: str = CHECKPOINTS_FOLDER,
    logs_folder: str = LOGS_FOLDER,
) -> tuple[Path | None, dict[str, Any] | None]:
    """Applies the resume rule (module docstring) and returns ``(checkpoint, its trainer state)`` or
    ``(None, None)`` for a fresh start; the checkpoint's files have all been checked. Call on every process."""
    output_dir = Path(output_dir)
    root = output_dir / checkpoints_folder
    spec = (resume_from_checkpoint or "latest").strip()
    existing = list_checkpoints(root)
    if spec.lower() == "none" and existing and not overwrite_output_dir:
        raise RunFolderError(
            f"{root} holds checkpoints of an earlier run (newest: {existing[-1][1].name}); continue it with "
            "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or choose another --output_dir"
        )
    if accelerator.is_main_process:
        if overwrite_output_dir:
            for folder in (root, output_dir / logs_folder):
                if folder.exists():
                    logger.warning("--overwrite_output_dir: deleting %s", folder)
                    shutil.rmtree(folder)
        remove_stale_temporaries(root)
    accelerator.wait_for_everyone()
    checkpoint = resolve_checkpoint("none" if overwrite_output_dir and spec.lower() == "latest" else spec, root)
    if checkpoint is None:
        return None, None
    if existing and not overwrite_output_dir and checkpoint.resolve().parent != root.resolve():
        raise RunFolderError(
            f"{root} holds checkpoints of another run (newest: {existing[-1][1].name}), so {checkpoint} cannot "
            "continue there; resume into another --output_dir, or pass --overwrite_output_dir to replace them"
        )
    verify_checkpoint(checkpoint, accelerator.num_processes)
    return checkpoint, read_trainer_state(checkpoint)


def resume_run(accelerator: Any, arguments: Any, state: TrainerState, settings: dict[str, Any]) -> Path | None:
    """Continues the prepared model, optimizer, RNG... and ``state`` from the checkpoint the resume rule picks, after
    checking that the run keeps its ``settings``; returns that checkpoint (None: a fresh start). ``arguments``: the
    run's (``output_dir``, ``resume_from_checkpoint``, ``overwrite_output_dir``, ``allow_changed_settings``)."""
    checkpoint, saved = find_resume_checkpoint(arguments.resume_from_checkpoint, arguments.output_dir, accelerator,
                                               arguments.overwrite_output_dir)
    state.settings = settings
    if checkpoint is None:
        return None
    changes = check_settings(checkpoint, saved, settings, arguments.allow_changed_settings)
    accelerator.load_state(str(checkpoint))
    for item in dataclasses.fields(state):
        if item.name in saved and item.name != "settings":
            setattr(state, item.name, saved[item.name])
    if changes:
        state.settings_changes.append({"step": state.step, "changes": changes})
    accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    return checkpoint


# ---------------------------------------------------------------------------------------------------- settings
def _plain(value: Any) -> Any:
    """JSON-compatible (what a trainer state stores and gives back)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_CONFIG_NOISE = frozenset({"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                           "return_dict", "output_hidden_states", "output_attentions", "auto_map"})


def config_settings(config: Any) -> dict[str, Any]:
    """A model configuration's values as settings (without bookkeeping such as the transformers version)."""

    def clean(values: Any) -> Any:
        if isinstance(values, Mapping):
            return {k: clean(v) for k, v in values.items() if k not in _CONFIG_NOISE}
        return values

    return clean(config.to_dict())


_PATH_SUFFIXES = ("_dir", "_file", "_path", "model_name_or_path")


def _normalised(name: str, value: Any) -> Any:
    """A local path argument (``train_dir``, ``config_file``, ``model_name_or_path``...) made absolute, so that
    a resume from another working directory compares the same folder."""
    if name.endswith(_PATH_SUFFIXES) and isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def trajectory_settings(arguments: Any, ignore: Collection[str], **extra: Any) -> dict[str, Any]:
    """The settings that determine a run's trajectory: the fields of the ``arguments`` dataclass except ``ignore``
    (logging cadence, worker counts, paths of outputs...) and credentials, plus ``extra`` (derived values, the model
    configuration as a dict...). Nested dicts are flattened into dotted names; local paths are made absolute."""
    values = {k: _normalised(k, v) for k, v in dataclasses.asdict(arguments).items()
              if k not in ignore and not k.endswith("token")}  # credentials never reach a trainer state
    values.update(extra)
    return _plain(_flatten(values))


def describe_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["seed 0 -> 1", ...]``: every setting whose value differs, sorted by name."""
    changes = []
    for name in sorted(set(saved) | set(current)):
        before, after = saved.get(name, ABSENT), current.get(name, ABSENT)
        if before != after:
            changes.append(f"{name} {before!r} -> {after!r}")
    return changes


# Settings renamed in 0.2.0 (one flag vocabulary, `modeling_mfm.cli.RENAMED_FLAGS`): old name -> (new name, the old
# value under the new name). Fine-tuning's clip_grad (None = no clipping) is max_grad_norm (0 = no clipping).
_RENAMED_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "clip_grad": ("max_grad_norm", lambda value: 0.0 if value is None else value),
}
# Settings a script records since 0.2.0, with the value its earlier versions used: AdamW's epsilon (fine-tuning,
# segmentation), betas and gradient clipping (segmentation). The other scripts recorded them already.
_FIRST_RECORDED_SETTINGS = {"adam_epsilon": 1e-8, "adam_beta1": 0.9, "adam_beta2": 0.999, "max_grad_norm": 0.0}


def _upgraded_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded settings under today's names, with the settings it could not record yet, so that a
    run resumed across an upgrade is compared as it ran."""
    upgraded = {}
    for name, value in saved.items():
        if name in _RENAMED_SETTINGS:
            name, convert = _RENAMED_SETTINGS[name]
            value = convert(value)
        upgraded[name] = value
    for name, value in _FIRST_RECORDED_SETTINGS.items():
        if name in current and name not in upgraded:
            upgraded[name] = value
    return upgraded


def check_settings(
    checkpoint: Path, trainer_state: Mapping[str, Any], settings: Mapping[str, Any], allow_changes: bool
) -> list[str]:
    """The differences between the checkpoint's recorded settings (read under today's names) and this run's; raises
    `RunFolderError` listing them unless ``allow_changes`` (then they are logged and returned)."""
    saved = trainer_state.get("settings")
    if saved is None:
        changes = ["the checkpoint records no settings (written by an older version)"]
    else:
        changes = describe_changes(_upgraded_settings(saved, settings), settings)
    if not changes:
        return []
    if not allow_changes:
        raise RunFolderError(
            f"resuming {checkpoint} would change the run: {'; '.join(changes)}. Resume with the same settings, pass "
            "--allow_changed_settings to resume anyway, or choose another --output_dir"
        )
    logger.warning("resuming %s with changed settings (--allow_changed_settings): %s", checkpoint,
                   "; ".join(changes))
    return changes


def describe_settings_changes(history: list[Mapping[str, Any]]) -> str:
    """``[{"step": 4, "changes": [...]}, ...]`` (as kept in the trainer state) -> one line for a model card."""
    return "; ".join(f"at step {entry['step']}: {', '.join(entry['changes'])}" for entry in history)
