"""The data dir's layout: file names, instance dir privacy, moving unreadable dirs aside, the data dir lock.

Crash-safe single-file writes (`atomic_write`) are in `launcher.plugin.files`, shared with virtualizers.
These functions block: call them through `trio.to_thread.run_sync`. Instance files go through
`launcher.durable.persist.Persister`, which makes many of them durable together.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from launcher.plugin.errors import SetupError
from launcher.plugin.files import INSTANCE_DIR_MODE, INSTANCE_FILE_MODE, fsync_dir

INSTANCES = "instances"
CORRUPT = "corrupt"  # unreadable instance dirs are moved here, never left to block their uuid
INSTANCE_FILE = "instance.json"
LOG_FILE = "launcher.log"
TOKEN_FILE = "api-token"
URL_FILE = "api-url"
LOCK_FILE = "launcher.lock"  # held (flock) by the one process that owns the data dir


def make_private(instance_dir: Path) -> None:
    """Take from an instance dir made by an older launcher every permission others had: the dir keeps at most
    search for its group (see INSTANCE_DIR_MODE), instance.json becomes INSTANCE_FILE_MODE."""
    mode = stat.S_IMODE(instance_dir.stat().st_mode)
    if mode & ~(INSTANCE_DIR_MODE | stat.S_IXGRP):
        os.chmod(instance_dir, mode & (INSTANCE_DIR_MODE | stat.S_IXGRP))
    record = instance_dir / INSTANCE_FILE
    if stat.S_IMODE(record.stat().st_mode) & ~INSTANCE_FILE_MODE:
        os.chmod(record, INSTANCE_FILE_MODE)


def doomed_path(directory: Path) -> Path:
    """Where a directory is renamed before it is removed, so a crash never leaves it half-removed under its
    own name (the next start-up finishes the removal)."""
    return directory.with_name(f".deleting-{directory.name}")


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


class DataDirBusy(SetupError):
    """Another launcher process owns this data dir."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock; the returned fd holds it until closed (or the process ends).

    DataDirBusy if another process holds it: two launchers on one data dir would corrupt each other."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirBusy(f"another launcher (pid {holder}) is using the data dir {data_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
