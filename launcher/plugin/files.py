"""Crash-safe, private file writes (part of the plugin API, `launcher.plugin`).

Every file that must survive a crash is written as: temp file in the same directory, fsync, rename over the
target, fsync of the directory. A reader therefore sees either the old or the new content, never a mix.
These functions block: call them through `trio.to_thread.run_sync` (with the host's limiter).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Instance dirs and their files hold user-data: the launcher's user only. A virtualizer whose VMs run as another
# user lets that user's group search the dir (not list it), as the qemu virtualizer does for QEMU.
INSTANCE_DIR_MODE = 0o700
INSTANCE_FILE_MODE = 0o600


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the file descriptor `fd` (os.write may take less than it is given). Blocks;
    OSError (ENOSPC, EDQUOT, ...) if the file system refuses, with part of `data` possibly written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """fsync the directory `path`, so that the names created, renamed or removed in it are durable. Blocks;
    OSError if it fails."""
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """fsync the file `path` (one that another program wrote, e.g. libvirt or qemu-img). Blocks; OSError."""
    _fsync(path, 0)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes, mode: int, flags: int) -> None:
    """Write `data` to `path`, opened with `flags` besides O_WRONLY | O_CREAT, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` with `data`, durably, or raise FileExistsError if it exists: a private temp file, fsync'd,
    then hard-linked into place (link fails if another process linked its own first), then the directory is
    fsync'd. Unlike creating the file empty and then writing it, no crash ever leaves `path` empty or torn. A crash
    can leave the temp file, ``.<name>.<8 hex digits>.tmp``, which its store removes."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_synced(tmp, data, mode, os.O_EXCL)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
        fsync_dir(path.parent)


def make_dirs(path: Path, mode: int = 0o777) -> None:
    """Make the directory `path` and its missing parents (with `mode`, less the umask), each one durably: the
    parent of every directory made is fsync'd, so that a power loss cannot take the directory, and the durable
    files written into it, away. Directories that exist are left as they are. Blocks; OSError if it fails."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
        fsync_dir(directory.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file. Private to the
    launcher's user unless `mode` says otherwise (what it writes often holds what users gave it).

    If writing fails, the temp file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_synced(tmp, data, mode, os.O_TRUNC)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
