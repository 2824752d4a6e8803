"""Release tooling: folder checks, dry run, idempotent publishing (to a local stand-in for the Hub), and the model
card's loading snippets run against a converted folder. No network."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from modeling_mfm.conversion.checkpoint_loading import load_official_checkpoint
from modeling_mfm.conversion.convert_original import convert_checkpoint, write_converted
from modeling_mfm.conversion.release import release_card, write_card
from modeling_mfm.publishing.hub import LocalHubMirror, plan_upload, publish_folder


def release_cli(argv: list[str]) -> int:
    return load_script("run_scripts/release.py").main(argv)


def convert_cli(argv: list[str]) -> int:
    return load_script("run_scripts/convert_original.py").main(argv)


GOLDEN_PTH = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_vit_p16_official.pth"
EXPECTED_FILES = {
    "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_mfm.py",
    "modeling_mfm.py", "frequency.py", "corruptions.py",  # the model's definition: what remote code ships
    "backbone/config.json",
    "backbone/model.safetensors",
    "backbone/preprocessor_config.json",
}


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release") / "mfm-tiny"
    write_converted(convert_checkpoint(GOLDEN_PTH), folder)
    return folder


@pytest.fixture
def folder(converted_folder, tmp_path) -> Path:
    copy = tmp_path / "mfm-tiny"
    shutil.copytree(converted_folder, copy)
    return copy


def _card(folder: Path, repo_id: str = "me/mfm-tiny") -> None:
    from modeling_mfm import MFMConfig

    write_card(folder, release_card("mfm-vit-base", config=MFMConfig.from_pretrained(folder), repo_id=repo_id))


class _Untouchable:
    """Any use of the Hub client fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the Hub client was used ({name}) during a dry run")


class LocalHub(HfApi):
    """A stand-in for the Hub service that keeps repos in a local folder. Like the Hub, a commit whose files are
    all unchanged is skipped; file selection uses huggingface_hub's own pattern filter."""

    def __init__(self, root: Path) -> None:
        super().__init__(endpoint="http://localhost.invalid")
        self.root = root
        self.commits: list[str] = []
        self.create_calls: list[dict] = []

    def create_repo(self, repo_id, *, repo_type=None, private=False, exist_ok=False, **kwargs):
        self.create_calls.append({"repo_id": repo_id, "repo_type": repo_type, "exist_ok": exist_ok})
        path = self.root / repo_id
        if path.exists() and not exist_ok:
            raise FileExistsError(f"{repo_id} exists")
        path.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, revision=None, commit_message=None,
                      ignore_patterns=None, allow_patterns=None, **kwargs):
        source, target = Path(folder_path), self.root / repo_id
        if not target.is_dir():
            raise FileNotFoundError(f"repository {repo_id} not found")
        files = [p.relative_to(source).as_posix() for p in sorted(source.rglob("*")) if p.is_file()]
        selected = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        changed = [
            f for f in selected if not (target / f).is_file() or (target / f).read_bytes() != (source / f).read_bytes()
        ]
        for name in changed:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        if changed:
            self.commits.append(commit_message)
        return SimpleNamespace(commit_url=f"local://{repo_id}/commit/{len(self.commits)}")


def test_plan_lists_the_release_files_and_skips_caches(folder):
    _card(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_mfm.cpython-311.pyc").write_bytes(b"\0")
    planned = dict(plan_upload(folder))
    assert set(planned) == EXPECTED_FILES
    assert planned["README.md"] == (folder / "README.md").stat().st_size


def test_dry_run_prints_the_plan_and_contacts_nothing(folder, capsys):
    _card(folder)
    assert publish_folder(folder, "me/mfm-tiny", dry_run=True, api=_Untouchable()) is None
    printed = capsys.readouterr().out
    assert "would create me/mfm-tiny" in printed
    for name in EXPECTED_FILES:
        assert re.search(rf"^  {re.escape(name)}  \(\d+ bytes\)$", printed, re.MULTILINE), name


def test_incomplete_folders_are_refused(folder):
    (folder / "modeling_mfm.py").unlink()
    with pytest.raises(ValueError, match=r"modeling_mfm\.py \(remote code named in auto_map\)"):
        publish_folder(folder, "me/x", dry_run=True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model weights"):
        publish_folder(folder, "me/x", dry_run=True)
    with pytest.raises(ValueError, match="not a directory"):
        publish_folder(folder / "nope", "me/x", dry_run=True)
    with pytest.raises(ValueError, match="hub_model_id"):
        publish_folder(folder, "a/b/c", dry_run=True)


def test_training_byproducts_are_never_uploaded(folder):
    _card(folder)
    for name in ("checkpoints/checkpoint-2/model.safetensors", "checkpoints/checkpoint-2/optimizer.bin",
                 "checkpoints/checkpoint-2/random_states_0.pkl", "logs/metrics.jsonl",
                 "logs/events.out.tfevents.1.host", "reconstructions/step-0000002.png", ".tmp-checkpoint-4/x",
                 "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scaler.pt",
                 "run.lock"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    assert set(dict(plan_upload(folder))) == EXPECTED_FILES


def test_a_plain_save_pretrained_folder_gets_a_generated_card_and_a_dry_run_writes_nothing(folder, tmp_path, capsys):
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert not (folder / "README.md").exists()
    assert publish_folder(folder, "me/plain", dry_run=True) is None
    assert re.search(r"^  README\.md  \(\d+ bytes\)  \[generated card\]$", capsys.readouterr().out, re.MULTILINE)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before  # nothing written
    url = publish_folder(folder, "me/plain", local_dir=tmp_path / "hub")
    card = ModelCard.load(tmp_path / "hub" / "me" / "plain" / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "MFM" in card.text
    assert url.startswith("file://")


def test_relative_local_targets_work_from_another_directory(folder, tmp_path, monkeypatch):
    _card(folder)
    monkeypatch.chdir(tmp_path)
    mirror = LocalHubMirror("previews")  # created here, used after the working directory changed
    monkeypatch.chdir(folder)
    url = publish_folder(folder, "me/rel", api=mirror)
    assert url.startswith("file://") and (tmp_path / "previews" / "me" / "rel" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)
    publish_folder(folder.relative_to(tmp_path), "me/rel2", local_dir="previews")
    assert (tmp_path / "previews" / "me" / "rel2" / "model.safetensors").is_file()


def test_publishing_twice_changes_nothing_the_second_time(folder, tmp_path):
    _card(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    hub = LocalHub(tmp_path / "hub")
    first = publish_folder(folder, "me/mfm-tiny", api=hub, commit_message="release")
    second = publish_folder(folder, "me/mfm-tiny", api=hub, commit_message="release")
    assert hub.commits == ["release"] and first == second
    assert all(call["exist_ok"] and call["repo_type"] == "model" for call in hub.create_calls)
    repo = tmp_path / "hub" / "me" / "mfm-tiny"
    stored = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert stored == EXPECTED_FILES
    write_card(folder, (folder / "README.md").read_text() + "\nUpdated.\n")
    publish_folder(folder, "me/mfm-tiny", api=hub, commit_message="card")
    assert hub.commits == ["release", "card"]


def test_release_cli_writes_the_card_and_dry_runs(folder, capsys):
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert release_cli(["--model_name_or_path", str(folder), "--hub_model_id", "me/mfm-vit-base",
                        "--release", "mfm-vit-base", "--dry_run"]) == 0
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before  # the dry run wrote nothing
    assert release_cli(["--model_name_or_path", str(folder), "--hub_model_id", "me/mfm-vit-base",
                        "--release", "mfm-vit-base", "--hub_local_dir", str(folder.parent / "hub")]) == 0
    card = ModelCard.load(folder.parent / "hub" / "me" / "mfm-vit-base" / "README.md")
    assert card.data.license == "other" and card.data.license_name == "s-lab-license-1.0"
    assert 'from_pretrained("me/mfm-vit-base"' in card.text
    assert "README.md" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        release_cli(["--model_name_or_path", str(folder), "--hub_model_id", "me/x", "--release", "mfm-vit-huge"])
    assert exit_info.value.code == 2 and "unknown release 'mfm-vit-huge'" in capsys.readouterr().err


def test_convert_cli_push_dry_run_writes_a_card(tmp_path, capsys):
    out = tmp_path / "converted"
    assert convert_cli(["--checkpoint", str(GOLDEN_PTH), "--output_dir", str(out),
                        "--push_to_hub", "--hub_model_id", "me/tiny", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "would create me/tiny" in printed and "model.safetensors" in printed
    card = ModelCard.load(out / "README.md")  # not in the catalogue: generic card, official licence, no results
    assert card.data.license_name == "s-lab-license-1.0" and card.data.eval_results is None
    assert card.data.pipeline_tag == "image-feature-extraction"


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


def test_pretraining_card_snippets_run_against_the_converted_folder(folder, monkeypatch):
    """The card's loading code, pointed at a local folder instead of the Hub id, runs as written."""
    from PIL import Image

    _card(folder, repo_id="me/mfm-tiny")
    blocks = _code_blocks((folder / "README.md").read_text())
    assert len(blocks) == 3  # package, trust_remote_code, native encoder
    monkeypatch.chdir(folder.parent)
    for block in blocks:
        namespace = {"image": Image.new("RGB", (48, 40), (120, 30, 200))}
        exec(block.replace('"me/mfm-tiny"', f'"{folder.name}"'), namespace)
        assert any(name in namespace for name in ("features", "out", "encoder"))
    assert namespace["encoder"].__class__.__name__ == "BeitModel"


def test_classification_card_snippets_run_against_a_converted_classifier(tmp_path, monkeypatch):
    from PIL import Image

    official = load_official_checkpoint(GOLDEN_PTH).state_dict
    fine_tuned = {k[len("encoder."):]: v for k, v in official.items() if k.startswith("encoder.blocks")
                  or k in ("encoder.cls_token", "encoder.pos_embed") or k.startswith("encoder.patch_embed")}
    g = torch.Generator().manual_seed(0)
    fine_tuned.update({"fc_norm.weight": 1 + 0.1 * torch.randn(64, generator=g), "fc_norm.bias": torch.zeros(64),
                       "head.weight": torch.randn(5, 64, generator=g), "head.bias": torch.zeros(5)})
    path = tmp_path / "finetuned.pth"
    torch.save({"model": fine_tuned, "epoch": 99}, path)
    folder = tmp_path / "classifier"
    write_converted(convert_checkpoint(path, num_heads=2), folder)
    from modeling_mfm import MFMConfig

    write_card(folder, release_card("mfm-vit-base-ft-in1k", config=MFMConfig.from_pretrained(folder),
                                    repo_id="me/classifier"))
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    blocks = _code_blocks((folder / "README.md").read_text())
    assert len(blocks) == 3  # package, pipeline with trust_remote_code, native encoder
    namespaces = []
    for block in blocks:
        namespaces.append({"image": Image.open(tmp_path / "image.jpg")})
        exec(block.replace('"me/classifier"', '"classifier"'), namespaces[-1])
    assert namespaces[0]["logits"].shape == (1, 5)
    predictions = namespaces[1]["classifier"]("image.jpg", top_k=5)
    assert sorted(p["label"] for p in predictions) == [f"LABEL_{i}" for i in range(5)]
    assert namespaces[2]["encoder"].__class__.__name__ == "BeitModel"
