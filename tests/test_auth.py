"""The API token (`<data_dir>/api-token`): the rules `launcher serve` checks before it starts, and the bearer
check of a real `launcher serve` process."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import LauncherProcess
from test_setup import refusal, serve

from launcher.transport import api_token

SIMULATION = {"virtualizer": "simulation"}


def token_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "api-token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def assert_never_served(tmp_path: Path) -> None:
    assert not (tmp_path / "data" / "api-url").exists()


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n\t\n"], ids=["empty", "newline", "whitespace"])
def test_an_empty_token_is_refused(tmp_path: Path, content: bytes) -> None:
    path = token_file(tmp_path, content)
    line = refusal(serve(tmp_path, SIMULATION))
    assert line.startswith(f"launcher: {path} is empty: an empty API token would let anyone in")
    assert_never_served(tmp_path)
    assert path.read_bytes() == content  # refused, not replaced


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path, b"x" * (api_token.MIN_LENGTH - 1) + b"\n")
    line = refusal(serve(tmp_path, SIMULATION))
    assert line.startswith(f"launcher: {path} holds a token of 31 characters: at least 32 are needed")
    assert_never_served(tmp_path)


def test_a_token_with_spaces_inside_is_refused(tmp_path: Path) -> None:
    token_file(tmp_path, b"correct horse battery staple and more words\n")
    assert "visible ASCII characters only" in refusal(serve(tmp_path, SIMULATION))
    assert_never_served(tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_token_file_others_can_access_is_refused_and_left_alone(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path, b"k" * 43 + b"\n", mode)
    line = refusal(serve(tmp_path, SIMULATION))
    assert line == (f"launcher: {path} has mode {mode:04o}: other users may have read the API token; delete "
                    "the file (a new token is generated at the next start) or, if it cannot have leaked, "
                    f"chmod 600 {path}")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert_never_served(tmp_path)


def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file away needs root")
    path = token_file(tmp_path, b"k" * 43 + b"\n")
    os.chown(path, 65534, 65534)
    line = refusal(serve(tmp_path, SIMULATION))
    assert line.startswith(f"launcher: {path} is owned by uid 65534, not by the launcher's user (uid 0)")
    assert_never_served(tmp_path)


def test_a_symlinked_token_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"k" * 43)
    target.chmod(0o600)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api-token").symlink_to(target)
    assert "is a symlink" in refusal(serve(tmp_path, SIMULATION))
    assert_never_served(tmp_path)


def test_a_generated_token_is_private_and_long(launcher: LauncherProcess) -> None:
    path = launcher.data_dir / "api-token"
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    token = path.read_text().strip()
    assert len(token) == 43 and token == api_token.read(path)
    assert [p.name for p in launcher.data_dir.iterdir() if p.name.startswith(".api-token")] == []  # no temp left
    launcher.kill()
    launcher.start()  # the same token, read again
    assert path.read_text().strip() == token


def test_an_echoed_token_is_used_and_only_it_opens_the_api(tmp_path: Path) -> None:
    """`echo $TOKEN > api-token`: the trailing newline is not part of the token; the bearer check accepts that
    token only (not an empty one, not a prefix, not with more after it)."""
    token = "0123456789abcdefghijklmnopqrstuvwxyz-_ABCD"
    token_file(tmp_path, f"{token}\n".encode())
    launcher = LauncherProcess(tmp_path / "data", {})
    url = ""
    try:
        launcher.start()
        url = (tmp_path / "data" / "api-url").read_text()

        def status(authorization: str | None) -> int:
            """The status of GET /v1/node with this Authorization header, sent byte for byte (an HTTP client
            library would refuse to send `Bearer ` with its trailing space)."""
            host, port = urlsplit(url).hostname, urlsplit(url).port
            header = "" if authorization is None else f"Authorization: {authorization}\r\n"
            with socket.create_connection((host, port), timeout=30) as conn:
                conn.sendall(f"GET /v1/node HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n".encode())
                answer = b""
                while b"\r\n" not in answer:
                    chunk = conn.recv(4096)
                    assert chunk, "the launcher closed the connection without an answer"
                    answer += chunk
            return int(answer.split(b" ", 2)[1])

        assert status(f"Bearer {token}") == 200
        assert status(f"bearer {token}") == 200  # the scheme is case-insensitive (RFC 9110)
        for wrong in (None, "", "Bearer", "Bearer ", f"Bearer {token[:-1]}", f"Bearer {token}x",
                      f"Bearer {token} x", f"Bearer  {token}x", f"Basic {token}", token):
            assert status(wrong) == 401, wrong
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    finally:
        launcher.kill()
