"""The docs site as a reader sees it: the built HTML, not the Markdown.

The site is built once per session with ``mkdocs build --strict`` (without ``-q``: quiet mode hides
the warnings that strict mode counts, so a quiet strict build passes with dead references). The
docstrings are Markdown with mkdocs-autorefs cross-references (``[`Tensor.from_op`][]``, resolved
in the scope of the docstring, or ``[`generate`][minilora.models.generation.generate]``), which the
strict build resolves or fails on; Sphinx roles would show as raw text.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import CODE_LINK

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|attr|data|exc|obj|ref):`")
DOCS_EXTRA = 'needs the docs extra: pip install -e ".[docs]"'


def docstrings(path: Path):
    """(line, text) of each docstring in ``path``: modules, classes, functions and attributes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)):
                yield stmt.lineno, stmt.value.value


def test_no_docstring_uses_a_sphinx_role():
    found = [f"{path.relative_to(ROOT)}:{line + text[:m.start()].count(chr(10))}: "
             f"{text[m.start():m.start() + 40]!r}"
             for path in sorted((ROOT / "minilora").rglob("*.py"))
             for line, text in docstrings(path) for m in ROLE.finditer(text)]
    assert not found, ("Sphinx roles show as raw text on the site; write [`name`][] (an autorefs "
                       "cross-reference) instead:\n" + "\n".join(found))


def test_the_docstring_finder_sees_attribute_and_method_docstrings(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""m"""\nX = 1\n"""x"""\nclass C:\n    def f(self):\n        """f"""\n')
    assert sorted(text for _, text in docstrings(source)) == ["f", "m", "x"]


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason=DOCS_EXTRA)
    pytest.importorskip("mkdocstrings_handlers.python", reason=DOCS_EXTRA)
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(out)], cwd=ROOT, capture_output=True, text=True)
    warnings = [line for line in run.stderr.splitlines() if not line.startswith("INFO")]
    assert run.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings)
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def prose(html: str) -> str:
    """The page without its code listings (the API page shows each object's source)."""
    html = re.sub(r'<details class="mkdocstrings-source">.*?</details>', "", html, flags=re.DOTALL)
    return re.sub(r"<pre\b.*?</pre>", "", html, flags=re.DOTALL)


def test_the_api_page_shows_no_sphinx_role_and_no_unresolved_reference(site):
    api = prose(page(site, "api"))
    assert not ROLE.search(api), ROLE.search(api)
    unresolved = re.findall(r"\[[^\]<>]*(?:<code>[^<]*</code>)?\]\[(?:[\w.]*[A-Za-z_][\w.]*)?\]",
                            api)
    assert not unresolved, unresolved[:5]
    assert api.count('class="autorefs autorefs-internal"') > 90


def test_the_api_page_names_each_package_once_in_its_contents(site):
    html = page(site, "api")
    toc = html[html.index('id="toc-collapse"'):html.index('role="main"')]
    entries = re.findall(r'data-bs-level="([23])"><a href="[^"]*" class="nav-link">([^<]*)</a>',
                         toc)
    sections = [label for level, label in entries if level == "2"]
    assert "minilora" in sections and "minilora.ops" in sections
    assert len(sections) == len(set(sections)), sections
    modules = [label for level, label in entries if level == "3"]
    assert "elementwise" in modules and not set(modules) & {"minilora", "ops", "backend"}


def test_code_blocks_are_highlighted_when_built_with_no_script_from_elsewhere(site):
    theory = page(site, "theory")
    python = (ROOT / "docs" / "theory.md").read_text(encoding="utf-8").count("```python\n")
    blocks = re.findall(r'<div class="highlight"><pre>.*?</pre>', theory, re.DOTALL)
    assert python > 0 and sum('<span class="k' in block for block in blocks) == python  # keywords
    assert 'href="../css/pygments.css"' in theory
    assert ".highlight .k " in (site / "css" / "pygments.css").read_text(encoding="utf-8")
    assert not re.search(r'<script[^>]+src="https?:', theory)  # highlight.js came from a CDN


def code_line(site: Path, path: str, line: int) -> str:
    """The text of line ``line`` of ``path`` as its code page on the site shows it."""
    html = (site / "code" / path / "index.html").read_text(encoding="utf-8")
    start = html.index(f'<a id="L-{line}" name="L-{line}"></a>')
    end = html.find('<a id="L-', start + 1)
    return re.sub(r"<[^>]+>", "", html[start:end if end > 0 else None])


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_each_link_to_the_code_arrives_at_the_name_it_names(site, doc):
    links = CODE_LINK.findall((ROOT / "docs" / doc).read_text(encoding="utf-8"))
    built_page = site / ("" if doc == "index.md" else doc[:-3]) / "index.html"
    html = built_page.read_text(encoding="utf-8")
    up = "" if doc == "index.md" else "../"
    built = re.findall(rf'<a href="{up}code/([^"#]+)/(?:#L-(\d+))?"', html)
    assert len(built) == len(links), f"{doc}: {len(links)} links to the code, {len(built)} built"
    for (path, name), (built_path, line) in zip(links, built, strict=True):
        assert built_path == path
        if name:
            assert re.match(rf"\s*(?:async )?(?:def|class) {name.split('.')[-1]}\b",
                            code_line(site, path, int(line))), (doc, path, name, line)


def test_search_finds_the_docs_not_the_code_pages(site):
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    locations = [entry["location"] for entry in index["docs"]]
    assert "theory/" in locations and (site / "code" / "tests").is_dir()
    assert not [loc for loc in locations if loc.startswith("code/")]
