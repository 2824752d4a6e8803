"""Publishing a model folder on the Hugging Face Hub: the one publisher of training runs, conversions and releases.

`publish_folder` checks the folder (config, weights, the remote code its ``auto_map`` names), gives it a model card
if it has none, then calls huggingface_hub's ``create_repo(exist_ok=True)`` and ``upload_folder``. Re-running it is
safe: the Hub skips files whose content it already has. What is never published: resumable checkpoints, optimizer
and RNG states, tracker logs and per-step pictures (`PUBLISH_IGNORE_PATTERNS`). ``dry_run=True`` prints what would
be uploaded and writes nothing; ``local_dir`` publishes into a local folder instead of the Hub (`LocalHubMirror`:
the same file selection and the same README metadata check), for previews and tests without a network.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import HfApi
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .folder_layout import CHECKPOINTS_FOLDER, LOGS_FOLDER, MODEL_CARD_FILE, PICTURES_FOLDER

__all__ = [
    "PUBLISH_IGNORE_PATTERNS",
    "HubClient",
    "LocalHubMirror",
    "check_repo_id",
    "plan_upload",
    "publish_folder",
]

# Training by-products and caches: they stay local. (fnmatch patterns: "*" also matches "/".)
PUBLISH_IGNORE_PATTERNS = [
    f"{CHECKPOINTS_FOLDER}/*",  # resumable training states
    f"{LOGS_FOLDER}/*",  # TensorBoard events, metrics.jsonl
    f"{PICTURES_FOLDER}/*",  # per-step pictures
    ".tmp-*",
    ".old-*",
    "*.lock",
    "*optimizer*.bin",
    "*scheduler*.bin",
    "*random_states_*.pkl",
    "*custom_checkpoint_*.pkl",
    "*scaler.pt",
    "*events.out.tfevents*",
    "*__pycache__*",
    "*.pyc",
    "*.DS_Store",
    ".cache/*",
]


class HubClient(Protocol):
    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> Any: ...


def check_repo_id(repo_id: str | None) -> str:
    """``repo_id`` if it looks like ``name`` or ``user/name``; a ValueError naming it otherwise."""
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(f"hub_model_id must look like 'name' or 'user/name', got {repo_id!r}")
    return repo_id


class LocalHubMirror:
    """A Hub client that publishes into ``root/<repo_id>/`` instead of the Hub (same selection, same card check)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()  # relative targets stay valid whatever the cwd later

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
        files = _selected_files(Path(folder_path), allow_patterns, ignore_patterns)
        if MODEL_CARD_FILE in files:
            metadata_load(files[MODEL_CARD_FILE])  # the Hub refuses a README whose YAML header does not parse
        for relative, source in files.items():
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        return target.as_uri()


def _selected_files(
    folder: Path, allow_patterns: list[str] | str | None = None, ignore_patterns: list[str] | str | None = None
) -> dict[str, Path]:
    """The files ``upload_folder`` would send: relative POSIX path -> file, after its pattern filter."""
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not a directory")
    ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    ignore += DEFAULT_IGNORE_PATTERNS
    selected = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore)
    return {relative: files[relative] for relative in selected}


def plan_upload(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The files `publish_folder` uploads from ``folder``, as (path in the repository, size in bytes), sorted."""
    files = _selected_files(Path(folder), ignore_patterns=PUBLISH_IGNORE_PATTERNS)
    return [(relative, path.stat().st_size) for relative, path in files.items()]


def _check_publishable(folder: Path, planned: list[tuple[str, int]]) -> None:
    """A loadable model: config.json, weights, and every remote-code module its ``auto_map`` names."""
    names = {path for path, _ in planned}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(name.endswith((".safetensors", ".bin")) and "/" not in name for name in names):
        missing.append("model weights (*.safetensors)")
    if "config.json" in names:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{folder / 'config.json'} is not valid JSON: {error}") from None
        auto_map = (config.get("auto_map") or {}) if isinstance(config, dict) else {}
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                module = str(reference).split("--")[-1].rsplit(".", 1)[0] + ".py" if reference else None
                if module and module not in names:
                    missing.append(f"{module} (remote code named in auto_map)")
    if missing:
        raise ValueError(f"{folder} cannot be published: missing {', '.join(sorted(set(missing)))}")


def _default_card(folder: Path, repo_id: str) -> str:
    """The card of a folder that has none: the MFM template for MFM checkpoints, a short one for native encoders."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "mfm":
        from ..configuration_mfm import MFMConfig
        from .model_card import render_model_card

        architectures = config.get("architectures") or []
        task = "classification" if any("Classification" in name for name in architectures) else "pretraining"
        return render_model_card(repo_id, MFMConfig.from_pretrained(folder), task=task)
    model_type = config.get("model_type", "transformers")
    return (
        "---\nlibrary_name: transformers\npipeline_tag: image-feature-extraction\n"
        f"tags:\n- mfm\n- {model_type}\n---\n\n"
        f"# {repo_id}\n\nAn image encoder ({model_type}) pre-trained with Masked Frequency Modeling, as a native "
        f"transformers checkpoint:\n\n```python\nfrom transformers import AutoModel\n"
        f'encoder = AutoModel.from_pretrained("{repo_id}")\n```\n'
    )


def publish_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card: str | None = None,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    local_dir: str | os.PathLike | None = None,
    api: HubClient | None = None,
) -> str | None:
    """Publishes ``folder`` to the Hub model repository ``repo_id`` (created if missing) and returns the commit URL.

    ``card`` becomes README.md (default: the folder's own README.md, else a generated card). ``dry_run`` prints the
    plan and returns None without writing or contacting anything. ``local_dir`` publishes into that folder instead
    of the Hub; ``api`` is any client with ``create_repo`` / ``upload_folder`` (default ``HfApi(token=token)``).
    """
    check_repo_id(repo_id)
    folder = Path(folder).expanduser().resolve()
    planned = plan_upload(folder)
    _check_publishable(folder, planned)
    readme = folder / MODEL_CARD_FILE
    if card is None and not readme.is_file():
        card = _default_card(folder, repo_id)
    if dry_run:
        sizes = dict(planned)
        if card is not None:
            sizes[MODEL_CARD_FILE] = len(card.encode("utf-8"))
        total = sum(sizes.values())
        target = f"{local_dir}/{repo_id}" if local_dir else repo_id
        print(f"dry run: would create {target} (model repo{', private' if private else ''}) if missing and upload "
              f"{len(sizes)} files ({total / 1e6:.1f} MB) from {folder}:")
        for path, size in sorted(sizes.items()):
            print(f"  {path}  ({size} bytes)" + ("  [generated card]" if path == MODEL_CARD_FILE and card else ""))
        return None
    if card is not None:
        readme.write_text(card, encoding="utf-8")
    if api is None:
        api = LocalHubMirror(local_dir) if local_dir is not None else HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=os.fspath(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name}",
        ignore_patterns=PUBLISH_IGNORE_PATTERNS,
    )
    return getattr(commit, "commit_url", None) or str(commit)
