"""mkdocs hook: links from the docs to the code.

The docs link each checkable claim to the test or example that checks it, as a path relative to the
page: ``[test_x](../tests/lora/test_properties.py#test_x)``. Read on GitHub, such links work as they
are. The built site holds only the docs, so this hook rewrites them: to the file in the repository
(at the line where ``#name`` is defined) when ``repo_url`` is set in mkdocs.yml, otherwise to plain
text. ``tests/test_docs.py`` checks that every such link points at a file and a name that exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

CODE_LINK = re.compile(r"\[(?P<text>[^\]]+)\]\(\.\./(?P<path>[^)#\s]+)(?:#(?P<name>[^)\s]+))?\)")
ROOT = Path(__file__).resolve().parent.parent


def _line(path: Path, name: str | None) -> int | None:
    """The line where the function or class ``name`` (``Class.method`` allowed) is defined."""
    if not name or path.suffix != ".py" or not path.is_file():
        return None
    scope = ast.parse(path.read_text(encoding="utf-8")).body
    node = None
    for part in name.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    return node.lineno


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = (config.get("repo_url") or "").rstrip("/")

    def rewrite(m: re.Match) -> str:
        if not repo:
            return m.group("text")
        line = _line(ROOT / m.group("path"), m.group("name"))
        anchor = f"#L{line}" if line else ""
        return f"[{m.group('text')}]({repo}/blob/main/{m.group('path')}{anchor})"

    return CODE_LINK.sub(rewrite, markdown)
