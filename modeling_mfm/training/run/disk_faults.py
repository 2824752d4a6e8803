"""A failed write says what happened: which path, and "no space left on device" when the disk is full.

torch.save reports a full disk as ``basic_ios::clear: iostream error`` or ``PytorchStreamWriter failed writing
file``, without an errno; safetensors and json report ``OSError(ENOSPC)``. `write_failure` turns either into a
`WriteFailedError` whose message names the path and, when the error is ENOSPC / EDQUOT or the filesystem has (almost)
no free space left, says "no space left on device".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...cli import RunStopped

__all__ = ["LOW_SPACE_BYTES", "WriteFailedError", "is_disk_full", "write_failure", "write_faults", "write_json"]

# Less free space than this after a failed write: the disk is full (the write that failed needed more).
LOW_SPACE_BYTES = 16 * 2**20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class WriteFailedError(RunStopped, OSError):
    """Writing the run's outputs failed; the message names the path and the cause, on one line (exit code 3)."""


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """True when ``error`` is ENOSPC / EDQUOT, or the filesystem of ``path`` has less than `LOW_SPACE_BYTES` free."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    free = _free_bytes(Path(path))
    return free is not None and free < LOW_SPACE_BYTES


def write_failure(error: BaseException, path: str | os.PathLike, what: str, aftermath: str = "") -> WriteFailedError:
    """A `WriteFailedError` for ``error`` raised while writing ``what`` to ``path`` (call before freeing space)."""
    detail = " ".join(str(error).split()) or type(error).__name__
    cause = "no space left on device" if is_disk_full(error, path) else "the write failed"
    message = f"{cause}: could not write {what} to {path} ({detail})"
    if aftermath:
        message += f"; {aftermath}"
    return WriteFailedError(message)


@contextlib.contextmanager
def write_faults(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raises the OSError / RuntimeError of a write under the block as a `WriteFailedError`."""
    try:
        yield
    except WriteFailedError:
        raise
    except (OSError, RuntimeError) as error:
        raise write_failure(error, path, what) from error


def write_json(path: str | os.PathLike, payload: Any, what: str = "the results", sort_keys: bool = False) -> None:
    """Writes ``payload`` as indented JSON to ``path``, creating its folder; a failed write is a `WriteFailedError`."""
    path = Path(path)
    with write_faults(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
