"""Listing image folders: every image file found, every entry that could not be listed counted, no name refused.

A folder of images is walked here with ``os.scandir`` rather than by the ``imagefolder`` builder of ``datasets``,
because one odd entry must not stop or silently shrink a run:

* an entry that cannot be listed (a broken symbolic link, a link that loops back to a folder above it, a folder that
  cannot be read, a folder reached twice through links, an image outside the class folders) is skipped and reported
  in `FolderListing.problems`, which the scripts log and write to their model card or results;
* a file name that is not valid UTF-8 (Arrow, which stores ``datasets`` tables, accepts only UTF-8 text) is kept as
  a ``file://`` URI whose odd bytes are percent-encoded (`arrow_safe_path`); `local_path` turns it back into the
  name the operating system knows, so the file trains like any other;
* hidden entries (names starting with ``.``) are left out, as ``datasets`` does.

`folder_dataset` turns a listing into a ``datasets.Dataset`` with an undecoded ``image`` column (and a ``label``
``ClassLabel`` column when the listing is by class): decoding, and skipping what cannot be decoded, happens in the
loaders.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote_from_bytes, unquote_to_bytes

import datasets

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderListing",
    "arrow_safe_path",
    "folder_dataset",
    "list_image_folder",
    "local_path",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
FILE_URI = "file://"
MAX_REPORTED = 5  # problems named in the log line; all of them are counted


def arrow_safe_path(path: str) -> str:
    """``path`` itself when it is valid UTF-8, else a ``file://`` URI with its non-ASCII bytes percent-encoded."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return FILE_URI + quote_from_bytes(raw, safe="/")
    return path


def local_path(stored: str) -> str:
    """The inverse of `arrow_safe_path`: the path to open."""
    if stored.startswith(FILE_URI):
        return os.fsdecode(unquote_to_bytes(stored[len(FILE_URI):]))
    return stored


def _printable(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class FolderListing:
    """What `list_image_folder` found under ``root``."""

    root: str
    files: list[str] = field(default_factory=list)  # arrow-safe paths, sorted
    classes: list[str] | None = None  # per file: its class folder, when listed by class
    problems: list[str] = field(default_factory=list)  # one line per entry that could not be listed

    @property
    def class_names(self) -> list[str]:
        return sorted(set(self.classes or []))

    def log_problems(self) -> None:
        if self.problems:
            shown = "; ".join(self.problems[:MAX_REPORTED])
            more = f"; and {len(self.problems) - MAX_REPORTED} more" if len(self.problems) > MAX_REPORTED else ""
            logger.warning("skipped %d entries that could not be listed in %s: %s%s", len(self.problems),
                           _printable(self.root), shown, more)


def list_image_folder(root: str | os.PathLike, by_class: bool = False) -> FolderListing:
    """Every image file under ``root`` (any depth, links followed); with ``by_class`` the class of a file is the
    first folder below ``root`` on its path (``root/<class>/**/<file>``). Raises ValueError when ``root`` is not a
    readable folder or holds no image file."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"{_printable(root)!r} is not a directory")
    listing = FolderListing(root=root, classes=[] if by_class else None)
    found: list[tuple[bytes, str, str | None]] = []
    visited: set[tuple[int, int]] = set()
    # (folder, class, identities of the folders above it, for loop detection)
    pending: list[tuple[str, str | None, frozenset]] = [(root, None, frozenset())]
    while pending:
        folder, label, ancestors = pending.pop()
        try:
            identity = _identity(os.stat(folder))
        except OSError as error:
            listing.problems.append(f"{_printable(folder)}: {error.strerror or error}")
            continue
        if identity in ancestors:
            listing.problems.append(f"{_printable(folder)}: a symbolic link loop")
            continue
        if identity in visited:
            listing.problems.append(f"{_printable(folder)}: already listed through another path")
            continue
        visited.add(identity)
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError as error:
            listing.problems.append(f"{_printable(folder)}: unreadable folder ({error.strerror or error})")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_symlink():  # followed; the entry's own type needs no system call otherwise
                    mode = os.stat(entry.path).st_mode
                    is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
                else:
                    is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
            except OSError as error:
                kind = "broken link" if entry.is_symlink() else "unreadable entry"
                listing.problems.append(f"{_printable(entry.path)}: {kind} ({error.strerror or error})")
                continue
            if is_dir:
                pending.append((entry.path, label if label is not None else entry.name, ancestors | {identity}))
            elif is_file and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if by_class and label is None:
                    listing.problems.append(f"{_printable(entry.path)}: not inside a class folder")
                    continue
                found.append((os.fsencode(entry.path), arrow_safe_path(entry.path), label))
    found.sort()
    listing.files = [path for _, path, _ in found]
    if by_class:
        listing.classes = [_printable(label) for _, _, label in found]
    if not listing.files:
        raise ValueError(
            f"{_printable(root)!r} contains no image files (looked for {sorted(IMAGE_EXTENSIONS)})"
            + (f"; {len(listing.problems)} entries could not be listed" if listing.problems else "")
        )
    return listing


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def folder_dataset(listing: FolderListing, class_names: Sequence[str] | None = None) -> datasets.Dataset:
    """``image`` (``Image(decode=False)``, the path) and, for a listing by class, ``label`` (a ``ClassLabel`` over
    ``class_names``, by default the listing's own)."""
    columns = {"image": [{"bytes": None, "path": path} for path in listing.files]}
    features = {"image": datasets.Image(decode=False)}
    if listing.classes is not None:
        names = list(class_names) if class_names is not None else listing.class_names
        index = {name: i for i, name in enumerate(names)}
        columns["label"] = [index[name] for name in listing.classes]
        features["label"] = datasets.ClassLabel(names=names)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
