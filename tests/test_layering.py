"""The import direction that keeps the plugin boundary (docs/architecture.md, `launcher/plugin/__init__.py`):

- the core (`launcher/`) never imports `virtualizers/`: it finds backends only through their entry points;
- a virtualizer imports from the launcher only the plugin API, `launcher.plugin`;
- the plugin API imports nothing else from the launcher, so a change to the core reaches a plugin only through it;
- a virtualizer never imports another virtualizer.

Every `import` and `from ... import` statement counts, at any depth (imports inside functions too).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, package: list[str]) -> Iterator[str]:
    """What a source file of `package` (its dotted parts) imports, one absolute name per imported thing
    (`from a.b import c` is `a.b.c`); relative imports are resolved against the package."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield from (module if alias.name == "*" else f"{module}.{alias.name}" for alias in node.names)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(root: Path) -> list[str]:
    """Every import under `root` that breaks one of the rules above, as "file: imports module (rule)"."""
    found = []
    for path in sorted(root.glob("launcher/**/*.py")) + sorted(root.glob("virtualizers/**/*.py")):
        relative = path.relative_to(root)
        own = ".".join(relative.with_suffix("").parts[:2])  # launcher.<module> or virtualizers.<backend>
        package = list(relative.parent.parts)
        for module in imported_modules(path, package):
            if relative.parts[0] == "launcher" and _within(module, "virtualizers"):
                found.append(f"{relative}: imports {module} (the core finds virtualizers by entry point only)")
            elif relative.parts[:2] == ("launcher", "plugin") and _within(module, "launcher") \
                    and not _within(module, "launcher.plugin") and module != "launcher":
                found.append(f"{relative}: imports {module} (the plugin API imports only itself)")
            elif relative.parts[0] == "virtualizers" and _within(module, "launcher") \
                    and not _within(module, "launcher.plugin") and module != "launcher":
                found.append(f"{relative}: imports {module} (a virtualizer imports only launcher.plugin)")
            elif relative.parts[0] == "virtualizers" and _within(module, "virtualizers") and module != "virtualizers" \
                    and not _within(module, own) and len(relative.parts) > 2:
                found.append(f"{relative}: imports {module} (a virtualizer never imports another)")
    return found


def test_the_code_keeps_the_import_direction() -> None:
    assert violations(ROOT) == []


def test_each_rule_catches_its_violation(tmp_path: Path) -> None:
    """The checker is not vacuous: a tree with one violation of each rule yields exactly those four."""
    files = {
        "launcher/core.py": "def f():\n    from virtualizers.qemu import backend\n",
        "launcher/plugin/spec.py": "from launcher.durable.records import spec_json\nfrom launcher.plugin import errors\n",
        "virtualizers/qemu/backend.py": "from launcher import store\nfrom launcher.plugin.spec import InstanceSpec\n",
        "virtualizers/simulation/backend.py": "import virtualizers.qemu.domain\nfrom . import simvm\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert [line.split(":")[0] for line in found] == sorted(files, key=lambda n: (n.split("/")[0] != "launcher", n))
    assert "launcher.durable.datadir" in found[2] and "virtualizers.qemu.domain" in found[3]
