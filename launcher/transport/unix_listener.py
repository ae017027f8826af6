"""The optional unix-socket listener (`listen_unix:`), for controllers on the same node.

The socket is mode 0600 from the moment anyone can connect to it: it is bound under a temporary name in the
target's directory, chmod-ed, then renamed over the target (rename is atomic). Only the launcher's user (root)
can connect. The bearer token is still required: the socket's mode is a second fence, not a replacement."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

import trio

from launcher.plugin.errors import SetupError

MAX_PATH_BYTES = 100  # sun_path holds 108 bytes; the temporary name adds a few


async def open_unix_listener(path: Path) -> trio.SocketListener:
    """Listen on `path` (mode 0600). A stale socket left by a killed launcher is replaced; a live one, or
    anything that is not a socket, is a SetupError."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise SetupError(f"listen_unix: {path} is too long for a unix socket path (at most {MAX_PATH_BYTES} bytes)")
    _check_not_in_use(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        temporary.unlink(missing_ok=True)
        await sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise SetupError(f"listen_unix: cannot listen on {path}: {exc}") from exc
    return trio.SocketListener(sock)


def remove_socket(path: Path) -> None:
    """Remove the socket file at `path` (when the launcher stops)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def _check_not_in_use(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SetupError(f"listen_unix: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return  # nobody listens: a stale socket of a killed launcher, replaced by the rename
    finally:
        probe.close()
    raise SetupError(f"listen_unix: another process serves on {path}")
