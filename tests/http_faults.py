"""Raw-socket tools for injecting client faults into a real `launcher serve`: resets, half-closes, garbage."""

from __future__ import annotations

import json
import socket
import struct
import time
from urllib.parse import urlsplit

from conftest import LauncherProcess


def address(launcher: LauncherProcess) -> tuple[str, int]:
    url = urlsplit((launcher.data_dir / "api-url").read_text().strip())
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def token(launcher: LauncherProcess) -> str:
    return (launcher.data_dir / "api-token").read_text().strip()


def connect(launcher: LauncherProcess, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(address(launcher), timeout=timeout)
    return sock


def head(launcher: LauncherProcess, method: str, target: str, extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: launcher\r\nAuthorization: Bearer {token(launcher)}\r\n"
            f"{extra}\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed client, a killed curl or a proxy does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


def read_all(sock: socket.socket) -> bytes:
    """Everything until the launcher closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_for(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What arrives within `seconds`, and whether the launcher closed the connection by then."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return data, True
        data += chunk
    return data, False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def json_body(answer: bytes) -> dict[str, object]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def assert_serving(launcher: LauncherProcess) -> None:
    """The launcher process is alive and answers an authenticated call."""
    time.sleep(0.2)  # let a crash, if any, reach the process's exit
    assert launcher.proc is not None and launcher.proc.poll() is None, launcher.output()[-3000:]
    assert "instances" in launcher.client().request("GET", "/v1/instances")
    assert launcher.client().request("GET", "/healthz") == {"status": "ok"}


def is_closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the launcher closed this (otherwise silent) connection, waiting up to `timeout` for it."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def is_open(sock: socket.socket) -> bool:
    """Whether this silent connection is open now (nothing to read, no end of stream)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(timeout)
    return False
