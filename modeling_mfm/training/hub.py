"""Publishing a trained model folder to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

`push_folder_to_hub` takes the Hub client as a parameter. `LocalHubMirror` is a client with the same two methods
that writes into a local directory instead: the same file selection as ``upload_folder`` (its pattern filter and
default ignores), the README's YAML metadata parsed as the Hub would. It serves dry runs (``--hub_local_dir``:
see exactly what a push would publish) and tests, with no network.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import HfApi
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

__all__ = ["PUSH_IGNORE_PATTERNS", "HubClient", "LocalHubMirror", "push_folder_to_hub"]

# Training by-products that stay local: resumable checkpoints, tracker logs, the per-step pictures.
PUSH_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "reconstructions/*", "*.tmp", ".tmp-*", ".old-*", "run.lock"]


class HubClient(Protocol):
    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> Any: ...


class LocalHubMirror:
    """A Hub client that "publishes" into ``root/<repo_id>/`` (a dry run of `push_folder_to_hub`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def create_repo(self, repo_id: str, *, exist_ok: bool = False, **kwargs: Any) -> str:
        target = self.root / repo_id
        if target.exists() and not exist_ok:
            raise ValueError(f"repository {repo_id!r} already exists in {self.root}")
        target.mkdir(parents=True, exist_ok=True)
        return target.as_uri()

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str | os.PathLike,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        **kwargs: Any,
    ) -> str:
        target = self.root / repo_id
        if not target.is_dir():
            raise ValueError(f"repository {repo_id!r} does not exist in {self.root}; call create_repo first")
        folder = Path(folder_path).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(f"folder_path {str(folder_path)!r} is not a directory")
        ignore = list([ignore_patterns] if isinstance(ignore_patterns, str) else ignore_patterns or [])
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
        selected = list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                            ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS))
        if "README.md" in selected:
            metadata_load(files["README.md"])  # the Hub refuses a README whose YAML header does not parse
        for relative in selected:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(files[relative], destination)
        return target.as_uri()


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload MFM pre-trained model",
    ignore_patterns: list[str] | None = None,
    client: HubClient | None = None,
) -> str:
    """Creates ``repo_id`` if needed and uploads ``folder`` except the training by-products
    (`PUSH_IGNORE_PATTERNS`). ``client`` defaults to ``HfApi(token=token)``; returns the commit / folder URL."""
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"hub_model_id must look like 'name' or 'user/name', got {repo_id!r}")
    client = client if client is not None else HfApi(token=token)
    client.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    result = client.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns,
        repo_type="model",
    )
    return str(result)
