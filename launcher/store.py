"""The on-disk layout (DESIGN.md §6) and crash-safe writes.

Every file that must survive a crash is written as: temp file in the same directory, fsync, rename over the
target, fsync of the directory. A reader therefore sees either the old or the new content, never a mix.
These functions block: call them through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

INSTANCES = "instances"
CORRUPT = "corrupt"  # unreadable instance dirs are moved here, never left to block their uuid
INSTANCE_FILE = "instance.json"
LOG_FILE = "launcher.log"
TOKEN_FILE = "api-token"
URL_FILE = "api-url"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write(path, json.dumps(obj, separators=(",", ":"), sort_keys=True).encode(), mode)


def create_instance_dir(path: Path) -> None:
    """mkdir that is durable: the new entry in `instances/` survives a crash. Fails if it exists."""
    path.mkdir(mode=0o755)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove an instance dir durably. Renamed aside first, so a crash never leaves a half-removed dir
    under its uuid (the next start-up finishes the removal)."""
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def move_aside(path: Path, corrupt_dir: Path) -> Path:
    """Move an unreadable instance dir into `corrupt_dir`, keeping it for inspection."""
    corrupt_dir.mkdir(parents=True, exist_ok=True)
    target = corrupt_dir / path.name
    n = 1
    while target.exists():
        target = corrupt_dir / f"{path.name}.{n}"
        n += 1
    os.replace(path, target)
    fsync_dir(path.parent)
    return target
