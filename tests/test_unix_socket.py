"""The optional unix-socket listener (`listen_unix:`): mode 0600, served beside TCP, used by the CLI."""

from __future__ import annotations

import json
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from launcher.cli.client import Client, ClientError


def test_the_unix_socket_is_0600_and_serves_the_api_and_the_cli(launcher_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "launcher.sock"
    launcher = launcher_factory({"listen_unix": str(path)})
    mode = path.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    token = (launcher.data_dir / "api-token").read_text().strip()
    client = Client(f"unix://{path}", token)
    assert client.request("GET", "/v1/instances") == {"instances": []}
    with pytest.raises(ClientError) as refused:
        Client(f"unix://{path}", "wrong").request("GET", "/v1/instances")
    assert refused.value.code == "unauthorized"  # the socket's mode does not replace the token
    assert launcher.client().request("GET", "/healthz") == {"status": "ok"}  # TCP too
    listed = launcher.cli("ls", "--json", "--url", f"unix://{path}")
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"instances": []}
    launcher.kill(signal.SIGTERM)
    assert not path.exists()  # removed when the launcher stops


def test_a_stale_socket_of_a_killed_launcher_is_replaced(launcher_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "launcher.sock"
    launcher = launcher_factory({"listen_unix": str(path)})
    launcher.kill()  # SIGKILL: the socket file stays
    assert path.exists()
    launcher.start()
    token = (launcher.data_dir / "api-token").read_text().strip()
    assert Client(f"unix://{path}", token).request("GET", "/healthz") == {"status": "ok"}


def test_a_socket_another_launcher_serves_on_is_refused(launcher_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "launcher.sock"
    launcher_factory({"listen_unix": str(path)})
    with pytest.raises(RuntimeError, match="another process serves on"):
        launcher_factory({"listen_unix": str(path)}, name="second")
