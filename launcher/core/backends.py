"""The registry of virtualizer backends: the `launcher.virtualizers` entry points (pyproject.toml).

The core finds backends only here, by name, so that `launcher/` never imports `virtualizers/`.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from launcher.plugin.errors import SetupError
from launcher.plugin.protocol import ENTRY_POINT_GROUP, OpenBackend


def available_backends() -> list[str]:
    """The names of the installed virtualizers (the `launcher.virtualizers` entry points), sorted."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_backend(name: str) -> OpenBackend:
    """The backend opener registered under `name` in the `launcher.virtualizers` entry-point group."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            opener: OpenBackend = ep.load()
            return opener
    raise SetupError(f"unknown virtualizer {name!r}; available: {', '.join(available_backends()) or 'none'}")
