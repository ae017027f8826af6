"""The on-disk layout (DESIGN.md §6) and crash-safe writes.

Every file that must survive a crash is written as: temp file in the same directory, fsync, rename over the
target, fsync of the directory. A reader therefore sees either the old or the new content, never a mix.
These functions block: call them through `trio.to_thread.run_sync`. Instance files go through
`launcher.persist.Persister`, which makes many of them durable together.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from launcher.errors import SetupError

INSTANCES = "instances"
CORRUPT = "corrupt"  # unreadable instance dirs are moved here, never left to block their uuid
INSTANCE_FILE = "instance.json"
LOG_FILE = "launcher.log"
TOKEN_FILE = "api-token"
URL_FILE = "api-url"
LOCK_FILE = "launcher.lock"  # held (flock) by the one process that owns the data dir
# Instance dirs and their files hold user-data: the launcher's user only. A virtualizer whose VMs run as another
# user lets that user's group search the dir (not list it), as the qemu virtualizer does for QEMU.
INSTANCE_DIR_MODE = 0o700
INSTANCE_FILE_MODE = 0o600


def make_private(instance_dir: Path) -> None:
    """Take from an instance dir made by an older launcher every permission others had: the dir keeps at most
    search for its group (see INSTANCE_DIR_MODE), instance.json becomes INSTANCE_FILE_MODE."""
    mode = stat.S_IMODE(instance_dir.stat().st_mode)
    if mode & ~(INSTANCE_DIR_MODE | stat.S_IXGRP):
        os.chmod(instance_dir, mode & (INSTANCE_DIR_MODE | stat.S_IXGRP))
    record = instance_dir / INSTANCE_FILE
    if stat.S_IMODE(record.stat().st_mode) & ~INSTANCE_FILE_MODE:
        os.chmod(record, INSTANCE_FILE_MODE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def doomed_path(directory: Path) -> Path:
    """Where a directory is renamed before it is removed, so a crash never leaves it half-removed under its
    own name (the next start-up finishes the removal)."""
    return directory.with_name(f".deleting-{directory.name}")


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file. Private to the
    launcher's user unless `mode` says otherwise (what it writes often holds what users gave it).

    If writing fails, the temp file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
