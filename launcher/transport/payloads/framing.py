"""ciao's multi-document framing of a YAML START body (`splitYaml`): which lines are the start document,
the cloud-init user-data and the meta-data. Text in, text out; nothing here parses YAML.
"""

from __future__ import annotations

import re

import attrs

# --------------------------------------------------------------------------------------------------------------------
# splitYaml
# --------------------------------------------------------------------------------------------------------------------

# Go's RE2 \s is [\t\n\f\r ]; keep exactly that set rather than Python's Unicode-aware \s.
_START_LINE_RE = re.compile(r"start[\t\n\f\r ]*:[\t\n\f\r ]*\Z")
_BLOCK_CONTINUATION = frozenset("\t\n\f\r ")


@attrs.frozen
class _Framed:
    start: str
    user_data: str
    meta_data: str
    has_start_line: bool  # a line matched the start regex (even if it ended up in an ignored document)
    start_line: int  # 0-based body line at which `start` begins (for error positions)


@attrs.frozen
class _Doc:
    lines: list[str]  # the document's lines including its markers and directives
    offset: int  # body line index of lines[0]
    real_start: int  # content is lines[real_start:real_end]
    real_end: int

    def content(self) -> list[str]:
        return self.lines[self.real_start:self.real_end]


def _split_lines(text: str) -> list[str]:
    """Lines as Go's bufio.ScanLines yields them: no final empty line, one trailing "\\r" dropped per line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _find_document(lines: list[str], end: int) -> tuple[_Doc, int]:
    """The last document of lines[:end], and where the document before it ends (ciao's findDocument)."""
    doc_start_found = doc_end_found = False
    real_end = end
    start = end - 1
    if lines[start].startswith("..."):
        doc_end_found = True
        real_end = start
        start -= 1
    while start >= 0:
        line = lines[start]
        if line.startswith("---"):
            doc_start_found = True
            break
        if line.startswith("..."):
            start += 1
            break
        start -= 1
    if doc_start_found:
        real_start = start + 1
        start -= 1
        while start >= 0 and lines[start].startswith("%"):
            start -= 1
        start += 1
    else:
        start = max(start, 0)
        real_start = start
    if not doc_end_found:
        real_end = end
    return _Doc(lines[start:end], start, real_start - start, real_end - start), start


def _split_start_block(doc: _Doc, start: int) -> tuple[list[str], list[str]]:
    """(start block, user-data lines) of a document holding the start line at doc.lines[start]."""
    lines = doc.lines
    content_start = 0
    for i in range(start):
        if lines[i].startswith("---"):
            content_start = i + 1
            break
    user = lines[content_start:start]
    i = start + 1
    while i < len(lines) and (lines[i] == "" or lines[i][0] in _BLOCK_CONTINUATION):
        i += 1
    block = lines[start:i]
    if i < len(lines) and not lines[i].startswith("..."):
        user = user + lines[i:]
    return block, user


def frame(text: str) -> _Framed:
    """`split_yaml`'s three texts, plus whether a start line was found at all and the body line `start` begins
    at (for error positions). Never raises: a body that frames to nothing gives three empty texts."""
    lines = _split_lines(text)
    found = next((i for i, line in enumerate(lines) if line.startswith("start") and _START_LINE_RE.match(line)), -1)
    docs: list[_Doc] = []
    end = len(lines)
    while end > 0:
        doc, end = _find_document(lines, end)
        docs.insert(0, doc)
    has_start = found != -1
    if len(docs) == 1:
        if not has_start:
            return _Framed("", _join(docs[0].content()), "", False, 0)
        block, user = _split_start_block(docs[0], found)
        return _Framed(_join(block), _join(user), "", True, found)
    if len(docs) == 2:
        if not has_start:
            return _Framed("", _join(docs[0].content()), _join(docs[1].content()), False, 0)
        holder, other = (docs[0], docs[1]) if found < len(docs[0].lines) else (docs[1], docs[0])
        block, user = _split_start_block(holder, found - holder.offset)
        return _Framed(_join(block), _join(user), _join(other.content()), True, found)
    first_three = docs[:3]
    if has_start and found < sum(len(d.lines) for d in first_three):
        holder = next(d for d in first_three if d.offset <= found < d.offset + len(d.lines))
        user_doc, meta_doc = (d for d in first_three if d is not holder)
        return _Framed(_join(holder.content()), _join(user_doc.content()), _join(meta_doc.content()), True,
                       holder.offset + holder.real_start)
    return _Framed("", "", "", has_start, 0)  # blank body, or the start line is in the 4th or a later document


def split_yaml(text: str) -> tuple[str, str, str]:
    """Split a START body into (start, user_data, meta_data), as ciao-launcher's `splitYaml` did.

    The body holds up to three YAML-ish documents: the ``start:`` section, the cloud-init user-data and the
    cloud-init meta-data. Lines are split on "\\n" (a trailing "\\r" is dropped, as Go's bufio.Scanner does), and
    every output line is re-terminated with "\\n". Documents are cut from the end backwards: a last line starting
    with ``...`` ends a document, a line starting with ``---`` opens it (with any ``%`` directive lines directly
    before it), and a ``...`` reached first ends the previous document. Routing then depends on the count:

    - 1 document: the start block (the first line matching ``^start\\s*:\\s*$`` plus the lines that follow it and
      are empty or indented) is `start`; the document's other lines are user-data (those after a leading ``---``
      and before the start line, and the rest after the block unless it begins with ``...``).
    - 2 documents: the one holding the start line is split as above; the other one is meta-data. With no start
      line, the first is user-data and the second meta-data.
    - 3 or more: only the first three count. The one holding the start line is `start` as a whole, the other
      two are user-data then meta-data. A start line in a later document yields three empty strings.

    Deliberate fix of a ciao quirk: ciao's "indented" test was the unanchored regex ``\\s+.*``, so any line
    containing a space (``package_upgrade: true``) right after the start block was swallowed into `start`.
    Here a line continues the start block only if it is empty or *starts* with whitespace (``^\\s+``), so such
    a top-level line goes to user-data. All of ciao's start_test.go vectors still hold.
    """
    framed = frame(text)
    return framed.start, framed.user_data, framed.meta_data
