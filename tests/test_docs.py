"""The docs are claims; these tests make them checked ones.

1. Every ```python block in docs/*.md and README.md runs: a file's blocks in order, in one
   namespace, in a fresh temporary directory (so a block may write files). Illustrative code that
   should not run goes in a ```text block instead.
2. A ```python block right after a ``<!-- quote: PATH::NAME -->`` line is a quotation of the
   function (or method, ``Class.method``) NAME in PATH. It is not run; it must equal the source as
   it is now, so the engine tour never shows stale code. After changing such a function, refresh
   the quotations with ``python tests/test_docs.py --refresh``.
3. Every link from the docs to the code (``../tests/...``, ``../examples/...``, ``../minilora/...``)
   points at a file that exists, and a ``#name`` after it at a function or class in that file. The
   docs link each checkable statement to the test or example that checks it; a renamed test must not
   leave a dead link behind.
4. Every ``#anchor`` link to a page (``theory.md#notation``, ``#bad-user-input``, the README's
   ``docs/reliability.md#...``) names a heading of that page, slugged as the site's table of
   contents slugs it. ``mkdocs build --strict`` checks the docs' own links, not the README's.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:^<!-- quote: (?P<quote>\S+) -->\n)?"
                   r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
CODE_LINK = re.compile(r"\]\(\.\./(?P<path>[^)#\s]+)(?:#(?P<name>[^)\s]+))?\)")
PAGE_ANCHOR = re.compile(r"\]\((?P<path>[^)#\s]*\.md)?#(?P<anchor>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}[ \t]+(?P<text>.+?)[ \t#]*$", re.MULTILINE)

DOC_FILES = sorted(DOCS.glob("**/*.md"))
RUN_FILES = [*DOC_FILES, ROOT / "README.md"]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the first code line, code, quoted ``PATH::NAME`` or None) per ```python block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("quote"))
            for m in BLOCK.finditer(text)]


def quoted_source(reference: str) -> str:
    """The current source of ``PATH::NAME`` (decorators included), dedented."""
    path, _, name = reference.partition("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    scope: list[ast.stmt] = ast.parse(source).body
    node = None
    for part in name.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"{path} has no {name}")
        scope = node.body
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    lines = source.splitlines()[first - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines)) + "\n"


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_in_docs_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    for line, code, quote in python_blocks(path):
        if quote is None:
            # pad with newlines so a traceback points at the line in the .md file
            exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)


QUOTES = [(path, line, code, quote) for path in DOC_FILES
          for line, code, quote in python_blocks(path) if quote]


@pytest.mark.parametrize("path, line, code, quote", QUOTES,
                         ids=[f"{q[0].name}:{q[3]}" for q in QUOTES])
def test_quoted_code_is_the_code_as_it_is_now(path, line, code, quote):
    assert code == quoted_source(quote), (
        f"{path.name}, line {line}: the quotation of {quote} differs from the source; if the "
        f"code changed on purpose, run `python tests/test_docs.py --refresh` and reread the prose "
        f"around it")


def test_every_link_to_the_code_points_at_something_that_exists():
    checked = 0
    for path in DOC_FILES:
        for m in CODE_LINK.finditer(path.read_text(encoding="utf-8")):
            target = (path.parent / ".." / m.group("path")).resolve()
            assert target.is_file(), f"{path.name}: link to missing file ../{m.group('path')}"
            if m.group("name"):
                quoted_source(f"{target.relative_to(ROOT)}::{m.group('name')}")  # LookupError
            checked += 1
    assert checked > 0


def slug(heading: str) -> str:
    """The id Python-Markdown's toc extension (mkdocs' default) gives a heading: its text without
    inline markup, folded to ASCII, lower case, punctuation dropped, runs of spaces and hyphens
    made one hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The ids of a page's headings, a repeated one numbered ``_1``, ``_2``... as the toc does."""
    found: set[str] = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = candidate = slug(m.group("text"))
        n = 0
        while candidate in found:
            n += 1
            candidate = f"{base}_{n}"
        found.add(candidate)
    return found


def test_every_anchor_link_to_a_page_names_one_of_its_headings():
    checked, dead = 0, []
    for path in RUN_FILES:
        for m in PAGE_ANCHOR.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
            target = (path.parent / m.group("path")).resolve() if m.group("path") else path
            where = f"{path.relative_to(ROOT)}: link to {m.group(0)[2:-1]}"
            assert target.is_file(), f"{where}: no such page"
            generated = "\n::: " in target.read_text(encoding="utf-8")  # mkdocstrings' ids
            if m.group("anchor") not in anchors(target) and not (
                    generated and re.fullmatch(r"minilora(\.\w+)+", m.group("anchor"))):
                dead.append(where)
            checked += 1
    assert dead == [], "links to headings that do not exist:\n" + "\n".join(dead)
    assert checked > 30


def test_a_heading_is_slugged_as_the_site_slugs_it(tmp_path):
    assert slug("The scaling: alpha / r") == "the-scaling-alpha-r"
    assert slug("Adapting `q` and `v` of GPT-2's fused `c_attn`") == \
        "adapting-q-and-v-of-gpt-2s-fused-c_attn"
    assert slug("Do the tests catch bugs? Mutation testing") == \
        "do-the-tests-catch-bugs-mutation-testing"
    page = tmp_path / "p.md"
    page.write_text("# Top\n## Notes\n```python\n# not a heading\n```\n## Notes\n")
    assert anchors(page) == {"top", "notes", "notes_1"}


def test_the_block_finder_finds_what_it_should(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\na = 1\n```\n```text\nnot run\n```\n```python\nb = a\n```\n"
                   "<!-- quote: minilora/tensor.py::no_grad -->\n```python\nquoted\n```\n")
    assert python_blocks(doc) == [(3, "a = 1\n", None), (9, "b = a\n", None),
                                  (13, "quoted\n", "minilora/tensor.py::no_grad")]
    assert (DOCS / "lora.md") in DOC_FILES


def test_a_quotation_is_found_by_its_qualified_name():
    assert quoted_source("minilora/tensor.py::Tensor.backward").startswith("def backward(self")
    assert quoted_source("minilora/tensor.py::no_grad").startswith("@contextlib.contextmanager")
    with pytest.raises(LookupError):
        quoted_source("minilora/tensor.py::Tensor.no_such_method")


def test_the_readme_and_the_docs_index_list_every_example():
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    readme_row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                      if line.startswith("| `examples/` |"))
    assert sorted(re.findall(r"`(\w+\.py)`", readme_row)) == examples, "README.md's examples row"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"^\| `examples/(\w+\.py)` \|", index, re.M)) == examples, (
        "docs/index.md's table of the examples")


def refresh() -> None:
    """Rewrite every quotation in docs/*.md from the current source."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")

        def fresh(m: re.Match) -> str:
            if not m.group("quote"):
                return m.group(0)
            quote = m.group("quote")
            return f"<!-- quote: {quote} -->\n```python\n{quoted_source(quote)}```"

        new = BLOCK.sub(fresh, text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"refreshed {path.relative_to(ROOT)}")


if __name__ == "__main__" and sys.argv[1:] == ["--refresh"]:
    refresh()
