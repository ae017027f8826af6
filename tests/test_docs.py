"""The documentation holds together: a short README over the docs/ tree, which it maps page by page, and no
relative link in README.md or docs/*.md that leads nowhere (a missing file, or an `#anchor` that no heading of
the target gives). Anchors follow GitHub's rule: the heading's text in lowercase, punctuation dropped except `-`
(and `_`, a word character), each space a `-`, and `-1`, `-2`, ... on repeated headings.

Links that leave the repository (`../shared/...`) are not checked: what lies outside is not in a clone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 220

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a markdown file outside fenced code blocks, with their numbers."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]*>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every markdown link of the file, outside code."""
    for number, line in prose_lines(path):
        for match in LINK.finditer(_code_spans_blanked(line)):
            yield number, match.group(1)


def _code_spans_blanked(line: str) -> str:
    """The line with each code span's content blanked: no link inside one, and one whose text is code
    ([`docs/x`](x)) is still a link."""
    return CODE_SPAN.sub(lambda span: span.group(1) + "x" * len(span.group(2)) + span.group(1), line)


def relative_links(path: Path) -> Iterator[tuple[int, Path, str]]:
    """(line, target file, anchor or "") of every relative link of the file that stays in the repository."""
    for number, target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if resolved != ROOT and ROOT not in resolved.parents:
            continue
        yield number, resolved, anchor


def test_the_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail to a page of docs/"


def test_the_readme_links_every_page_of_docs() -> None:
    files = {path for path in DOCS.iterdir() if path.is_file() and path.suffix in {".md", ".yaml"}}
    linked = {target for _, target, _ in relative_links(README)}
    assert files, "docs/ has no page"
    missing = sorted(str(path.relative_to(ROOT)) for path in files - linked)
    assert not missing, f"README.md's map of docs/ lacks {missing}"


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    broken = []
    for number, target, anchor in relative_links(page):
        where = f"{page.relative_to(ROOT)}:{number}"
        if not target.exists():
            broken.append(f"{where}: no file {target.relative_to(ROOT)}")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{where}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_link_reader_sees_what_it_must() -> None:
    """The checks above are only as good as the reading of links and headings."""
    assert slug("ATTACH / DETACH on a running guest") == "attach--detach-on-a-running-guest"
    assert slug("A START's storage") == "a-starts-storage"
    assert slug("2. Layers and the plugin boundary") == "2-layers-and-the-plugin-boundary"
    assert slug("`launcher_*` and the `/metrics` page") == "launcher_-and-the-metrics-page"
    line = "see [`docs/openapi.yaml`](openapi.yaml), `[not](a-link)` and [After](operations.md#after-a-restart)"
    assert [m.group(1) for m in LINK.finditer(_code_spans_blanked(line))] == \
        ["openapi.yaml", "operations.md#after-a-restart"]
