"""The documentation cannot rot: every ```python block of README.md and docs/ runs, and every model card's "How to use"
snippets run against a tiny checkpoint of the card's kind.

Shrinking for CI: the blocks of one page run in order in one namespace, in a fresh working folder, on the CPU. An HTML
comment right before a block (invisible on rendered pages) may rewrite the block for the test only:
``<!-- docs-test: replace "mfm-vit-base" with "mfm-vit-tiny"; replace 224 with 32 -->`` replaces text, so the
snippet runs with small models and images. Nothing else is changed or skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
CARDS = sorted((REPO / "model_cards").glob("*.md"))
BLOCK = re.compile(r"(?:<!--\s*docs-test:(?P<directive>.*?)-->\s*\n)?```python\n(?P<code>.*?)```", re.DOTALL)
REPLACE = re.compile(r"replace\s+(\S+)\s+with\s+(\S+)")


def python_blocks(markdown: str) -> list[str]:
    """The page's python blocks, each rewritten by the docs-test directive before it, if any."""
    blocks = []
    for match in BLOCK.finditer(markdown):
        code = match.group("code")
        for old, new in REPLACE.findall(match.group("directive") or ""):
            if old not in code:
                raise AssertionError(f"docs-test directive replaces {old!r}, which the block does not contain")
            code = code.replace(old, new)
        blocks.append(code)
    return blocks


def test_directives_rewrite_only_their_block():
    page = '<!-- docs-test: replace 224 with 32 -->\n```python\nx = 224\n```\n\n```python\ny = 224\n```\n'
    assert python_blocks(page) == ["x = 32\n", "y = 224\n"]
    with pytest.raises(AssertionError, match="does not contain"):
        python_blocks('<!-- docs-test: replace 512 with 32 -->\n```python\nx = 224\n```\n')


def run_blocks(blocks: list[str], namespace: dict, name: str) -> None:
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{name}[block {index}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{name}, python block {index} failed: {error!r}\n{code}") from error


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_python_blocks_of_the_docs_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_blocks(blocks, {"__name__": "__docs__"}, page.name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_at_files_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def _tiny_checkpoint(folder: Path, card: str) -> None:
    """A tiny save_pretrained folder (with backbone/) of the card's kind: ViT or ResNet, pre-training or classifier."""
    from modeling_mfm import MFMConfig, MFMForImageClassification, MFMForPreTraining

    vit = "vit" in card
    backbone = (
        {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 8}
        if vit else {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 16, 32, 32], "embedding_size": 8}
    )
    preset = "mfm-vit-base" if vit else "mfm-resnet50"
    if "ft-in1k" in card:
        labels = {i: f"class {i}" for i in range(3)}
        config = MFMConfig.from_preset(preset, image_size=32, backbone_overrides=backbone, num_labels=3,
                                       id2label=labels, label2id={v: k for k, v in labels.items()})
        model = MFMForImageClassification(config)
    else:
        model = MFMForPreTraining(MFMConfig.from_preset(preset, image_size=32, mask_radius=4,
                                                        backbone_overrides=backbone))
    model.save_pretrained(folder)
    model.export_backbone(folder / "backbone")


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_model_card_snippets_run(card, tmp_path, monkeypatch):
    text = card.read_text(encoding="utf-8")
    usage = text.split("## How to use", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(usage)
    assert blocks, f"{card.name} has no python snippets under 'How to use'"
    repo_id = re.search(r'from_pretrained\("([^"]+)"', usage).group(1)
    _tiny_checkpoint(tmp_path / repo_id, card.stem)
    Image.new("RGB", (40, 36), (120, 30, 200)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    for code in blocks:  # each snippet on its own, as a reader would run it
        run_blocks([code], {"image": Image.open(tmp_path / "image.jpg").convert("RGB")}, card.name)
