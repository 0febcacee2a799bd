"""mkdocs hook: the code the docs link to, on the site itself; highlighting that needs no script.

The docs link each checkable claim to the test or example that checks it, as a path relative to the
page: ``[test_x](../tests/lora/test_properties.py#test_x)``. Read on GitHub (or in an editor), such
links work as they are. The built site holds only the docs, so this hook adds one page per linked
file, ``code/tests/lora/test_properties.py/``, its code highlighted and each line anchored
(``#L-42``), and points each link at that page, at the line where ``name`` is defined. The site so
works from the repository alone, offline, and shows the code of the commit it was built from; with
``repo_url`` set in mkdocs.yml each code page also links to its file in the repository.
``tests/test_docs.py`` checks that every such link names a file and a name that exist,
``tests/test_site.py`` that it arrives.

Code blocks are highlighted by Pygments at build time (pymdownx.highlight); this hook writes the
colours, ``css/pygments.css``, from the Pygments installed.
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel

CODE_LINK = re.compile(r"\[(?P<text>[^\]]+)\]\(\.\./(?P<path>[^)#\s]+)(?:#(?P<name>[^)\s]+))?\)")
ROOT = Path(__file__).resolve().parent.parent
CODE_DIR = "code"  # the code pages' folder in the site
STYLE = "default"  # the Pygments style of every code block
EXTRA_CSS = """
/* a linked line sits below the fixed navigation bar, not under it */
.highlight a[id^="L-"] { scroll-margin-top: 9rem; }
.highlight .linenos a { color: #888; text-decoration: none; }
"""


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


def _links(docs_dir: Path) -> dict[str, set[int]]:
    """Each file the docs link to (a path from the repository's root) -> the lines linked."""
    links: dict[str, set[int]] = {}
    for doc in sorted(docs_dir.glob("**/*.md")):
        for m in CODE_LINK.finditer(doc.read_text(encoding="utf-8")):
            if (ROOT / m.group("path")).is_file():
                line = _line(ROOT / m.group("path"), m.group("name"))
                links.setdefault(m.group("path"), set()).update([line] if line else [])
    return links


def _code_page(path: str, lines: set[int], repo: str) -> str:
    """The Markdown of the page that shows ``path``: a heading, then the highlighted code."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_for_filename

    formatter = HtmlFormatter(style=STYLE, linenos="table", lineanchors="L", anchorlinenos=True,
                              hl_lines=sorted(lines), wrapcode=True)
    code = highlight((ROOT / path).read_text(encoding="utf-8"),
                     get_lexer_for_filename(path), formatter)
    where = f" ([in the repository]({repo}/blob/main/{path}))" if repo else ""
    return (f"---\ntitle: {path}\n---\n\n# `{path}`\n\n"
            f"The file as of this site's build{where}; the highlighted lines are the ones the docs "
            f"link to.\n\n{code}\n")


def on_files(files, config):
    from pygments.formatters import HtmlFormatter

    repo = (config.get("repo_url") or "").rstrip("/")
    for path, lines in _links(Path(config["docs_dir"])).items():
        files.append(File.generated(config, f"{CODE_DIR}/{path}.md",
                                    content=_code_page(path, lines, repo),
                                    inclusion=InclusionLevel.NOT_IN_NAV))
    css = HtmlFormatter(style=STYLE).get_style_defs(".highlight") + EXTRA_CSS
    files.append(File.generated(config, "css/pygments.css", content=css))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.startswith(f"{CODE_DIR}/"):
        return markdown
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match) -> str:
        target = posixpath.relpath(f"{CODE_DIR}/{m.group('path')}.md", here or ".")
        line = _line(ROOT / m.group("path"), m.group("name"))
        return f"[{m.group('text')}]({target}{f'#L-{line}' if line else ''})"

    return CODE_LINK.sub(rewrite, markdown)


@event_priority(-100)  # after the search plugin has written its index
def on_post_build(config):
    """Drop the code pages from the search index: a search finds the docs, not each test."""
    index = Path(config["site_dir"]) / "search" / "search_index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["docs"] = [d for d in data["docs"] if not d["location"].startswith(f"{CODE_DIR}/")]
        index.write_text(json.dumps(data), encoding="utf-8")
