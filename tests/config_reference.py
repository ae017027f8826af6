"""The configuration reference of docs/configuration.md, generated from the shipped, commented config file.

`configs/launcher.yaml` states every setting with its default and a comment (tests/test_config.py checks that it
names every setting of the config classes, the qemu and simulation sections included, and that its values are
the defaults). This turns it into the page's table, one row per setting, so the page cannot drift from the code:
tests/test_config.py checks that the page holds exactly this table. After a change to a setting, print it with
`.venv/bin/python tests/config_reference.py` and paste it under "Reference" in docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "launcher.yaml"
_ENTRY = re.compile(r"^(?P<indent> *)(?P<key>[a-z_]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_CONTINUED = re.compile(r"^ +#\s?(?P<comment>.*)$")


def rows(text: str) -> list[tuple[str, str, str]]:
    """(dotted setting or section, default as written, its comment) for each key of the file, in file order; a
    section (a key with no value of its own) has the default "". Comment lines under an entry continue it."""
    found: list[tuple[str, str, str]] = []
    parents: list[tuple[int, str]] = []
    for line in text.splitlines():
        continued = _CONTINUED.match(line)
        if continued and found:
            path, value, comment = found[-1]
            found[-1] = (path, value, f"{comment} {continued['comment'].strip()}".strip())
            continue
        entry = _ENTRY.match(line)
        if entry is None:
            continue
        indent = len(entry["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([p for _, p in parents] + [entry["key"]])
        value = entry["value"].strip()
        found.append((path, value, (entry["comment"] or "").strip()))
        if not value:
            parents.append((indent, entry["key"]))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_table(text: str | None = None) -> str:
    """The markdown table of every setting of the shipped file."""
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    for path, value, comment in rows(SHIPPED.read_text() if text is None else text):
        shown = f"`{_cell(value)}`" if value else "(section)"
        lines.append(f"| `{path}` | {shown} | {_cell(comment)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
