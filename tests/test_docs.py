"""Every ```python block in docs/*.md runs: a file's blocks in order, in one namespace.

A doc's examples are claims; this makes them checked ones. Illustrative code that should not run
goes in a ```text block instead. Each file runs in a fresh temporary directory, so a block may
write files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the first code line, code) for each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


DOC_FILES = sorted(DOCS.glob("**/*.md"))


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_in_docs_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    for line, code in python_blocks(path):
        # pad with newlines so a traceback points at the line in the .md file
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


def test_the_block_finder_finds_what_it_should(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\na = 1\n```\n```text\nnot run\n```\n```python\nb = a\n```\n")
    assert python_blocks(doc) == [(3, "a = 1\n"), (9, "b = a\n")]
    assert (DOCS / "lora.md") in DOC_FILES
