"""The import order that keeps the layers (docs/architecture.md §2):

    launcher.cli → launcher.transport → launcher.core → launcher.durable → launcher.plugin

A module imports from its own layer or the layers to its right, never to its left; besides:
- the launcher never imports `virtualizers/`: it finds backends only through their entry points;
- a virtualizer imports from the launcher only the plugin API, `launcher.plugin`, and never another virtualizer;
- the transport reads and commands instances through the supervisor (`InstanceView`), never an actor: it imports
  none of the actor's modules (`launcher.core.actor*`) and never reads the supervisor's `actors` table;
- no import circle anywhere in `launcher/` or `virtualizers/`, at module level, in functions or under
  `if TYPE_CHECKING:` alike.

Every `import` and `from ... import` statement counts, at any depth.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = ("launcher.cli", "launcher.transport", "launcher.core", "launcher.durable", "launcher.plugin")
ACTOR_MODULES = "launcher.core.actor"  # and every module whose name begins so (actor_base, actor_start, ...)


def module_name(root: Path, path: Path) -> str:
    """The dotted name of a source file under `root` (a package's `__init__.py` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, package: str) -> Iterator[str]:
    """What a source file of `package` imports, one absolute name per imported thing (`from a.b import c` is
    `a.b.c`); relative imports are resolved against the package."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield from (module if alias.name == "*" else f"{module}.{alias.name}" for alias in node.names)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if _within(name, layer)), None)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module of ours an imported name lives in (`a.b.c` is module `a.b.c` or a name in module `a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every module of `launcher/` and `virtualizers/` under `root` → the modules of ours it imports."""
    paths = sorted((root / "launcher").rglob("*.py")) + sorted((root / "virtualizers").rglob("*.py"))
    files = {module_name(root, p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {_resolve(imported, set(files)) for imported in imported_names(path, package)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected set of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _reads_actor_table(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "actors"
               for node in ast.walk(ast.parse(path.read_text(), str(path))))


def violations(root: Path) -> list[str]:
    """Every import under `root` that breaks one of the rules above, as "module: imports name (rule)"."""
    found = []
    for path in sorted((root / "launcher").rglob("*.py")) + sorted((root / "virtualizers").rglob("*.py")):
        name = module_name(root, path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own_layer = _layer(name)
        own_virtualizer = ".".join(name.split(".")[:2])
        if _within(name, "launcher.transport") and _reads_actor_table(path):
            found.append(f"{name}: reads .actors (the transport reads instances through the supervisor's API)")
        for imported in imported_names(path, package):
            if _within(name, "launcher") and _within(imported, "virtualizers"):
                found.append(f"{name}: imports {imported} (the launcher finds virtualizers by entry point only)")
            elif _within(name, "virtualizers") and _within(imported, "launcher") \
                    and not _within(imported, "launcher.plugin"):
                found.append(f"{name}: imports {imported} (a virtualizer imports only launcher.plugin)")
            elif _within(name, "virtualizers") and _within(imported, "virtualizers") and imported != "virtualizers" \
                    and not _within(imported, own_virtualizer) and name.count(".") > 1:
                found.append(f"{name}: imports {imported} (a virtualizer never imports another)")
            elif _within(name, "launcher") and _within(imported, "launcher") and imported != "launcher":
                theirs = _layer(imported)
                if own_layer is None or theirs is None:
                    found.append(f"{name}: imports {imported} (every module of launcher/ belongs to a layer)")
                elif theirs < own_layer:
                    found.append(f"{name}: imports {imported} ({LAYERS[own_layer]} is below {LAYERS[theirs]})")
                elif _within(name, "launcher.transport") and imported.startswith(ACTOR_MODULES):
                    found.append(f"{name}: imports {imported} (the transport reads instances through the supervisor)")
    found += [f"import circle: {' → '.join(circle)}" for circle in circles(import_graph(root))]
    return found


def test_the_code_keeps_the_layers_and_has_no_import_circle() -> None:
    assert violations(ROOT) == []


def test_every_module_of_the_launcher_is_in_a_layer() -> None:
    modules = [module_name(ROOT, p) for p in (ROOT / "launcher").rglob("*.py")]
    assert [m for m in modules if m != "launcher" and _layer(m) is None] == []


def test_each_rule_catches_its_violation(tmp_path: Path) -> None:
    """The checker is not vacuous: a tree with one violation of each rule yields exactly those."""
    files = {
        "launcher/__init__.py": "",
        "launcher/core/__init__.py": "",
        "launcher/core/a.py": "def f():\n    from virtualizers.qemu import backend\n",
        "launcher/core/b.py": "from launcher.transport.api import Api\n",
        "launcher/durable/__init__.py": "",
        "launcher/durable/c.py": "import typing\nif typing.TYPE_CHECKING:\n    from launcher.durable import d\n",
        "launcher/durable/d.py": "from launcher.durable.c import X\n",
        "launcher/plugin/__init__.py": "",
        "launcher/plugin/spec.py": "from launcher.durable.records import spec_json\nfrom . import errors\n",
        "launcher/plugin/errors.py": "",
        "launcher/transport/__init__.py": "",
        "launcher/transport/api.py": "from launcher.core.actor import InstanceActor\nfrom launcher.core import b\n",
        "launcher/transport/routes.py": "def f(s):\n    return s.actors\n",
        "virtualizers/qemu/backend.py": "from launcher.durable import c\nfrom launcher.plugin import spec\n",
        "virtualizers/simulation/backend.py": "import virtualizers.qemu.domain\nfrom . import simvm\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    expected = [
        "launcher.core.a: imports virtualizers.qemu.backend",
        "launcher.core.b: imports launcher.transport.api.Api (launcher.core is below launcher.transport)",
        "launcher.plugin.spec: imports launcher.durable.records.spec_json (launcher.plugin is below launcher.durable)",
        "launcher.transport.api: imports launcher.core.actor.InstanceActor (the transport reads instances",
        "launcher.transport.routes: reads .actors",
        "virtualizers.qemu.backend: imports launcher.durable.c (a virtualizer imports only launcher.plugin)",
        "virtualizers.simulation.backend: imports virtualizers.qemu.domain (a virtualizer never imports another)",
        "import circle: launcher.core.b → launcher.transport.api",
        "import circle: launcher.durable.c → launcher.durable.d",
    ]
    assert len(found) == len(expected), found
    for line, start in zip(sorted(found), sorted(expected), strict=True):
        assert line.startswith(start), (line, start)


def test_circles_are_found_whatever_their_length() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"]]


MAX_MODULE_LINES = 500


def test_no_module_is_over_500_lines() -> None:
    """One job per file: a module that grows past this is split along its seams (issue 16)."""
    paths = sorted((ROOT / "launcher").rglob("*.py")) + sorted((ROOT / "virtualizers").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
