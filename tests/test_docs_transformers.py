"""Every ```python block of README.md's "Use with transformers" section, docs/transformers.md and docs/performance.md
runs (each document's blocks in order, in one namespace, in an empty folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next heading of the same or a higher level (outside code blocks)."""
    lines, inside, fenced, level = [], False, False, len(heading.split(" ")[0])
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            if inside:
                break
            inside = line.strip() == heading
            continue
        if inside:
            lines.append(line)
    return "".join(lines)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


DOCUMENTS = {
    "README.md#use-with-transformers": lambda: section((ROOT / "README.md").read_text(), "### Use with transformers"),
    "docs/transformers.md": lambda: (ROOT / "docs" / "transformers.md").read_text(),
    "docs/performance.md": lambda: (ROOT / "docs" / "performance.md").read_text(),
}


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_python_snippets_run(document, tmp_path, monkeypatch):
    blocks = python_blocks(DOCUMENTS[document]())
    assert blocks, f"no python block in {document}"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for number, code in enumerate(blocks, start=1):
        exec(compile(code, f"{document} block {number}", "exec"), namespace)  # noqa: S102 -- our own docs
