"""Bugs become 500 answers, never a dead launcher; an unknown virtualizer is refused at start-up."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from harness import running_node

from launcher.core.stats import StatsReporter
from launcher.transport.api import Api
from launcher.transport.http import Request

TOKEN = "t" * 32


def request(method: str, path: str, token: str = TOKEN, body: bytes = b"") -> Request:
    return Request(method=method, path=path, query={}, body=body,
                   headers={"authorization": f"Bearer {token}", "content-type": "application/yaml"})


async def test_unexpected_exception_is_500_logged_and_serving_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async with running_node(tmp_path) as node:
        api = Api(node.supervisor, node.journal, node.logs, StatsReporter(node.supervisor, None, "n"), TOKEN)

        def broken(command: object, bid: str = "") -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(node.supervisor, "dispatch", broken)
        with caplog.at_level(logging.ERROR):
            answer = await api.handle(request("POST", "/v1/instances", body=b"start:\n  instance_uuid: ab\n"
                                                                            b"  image_uuid: i\n"))
        assert answer.status == 500 and b"internal_error" in answer.body and b"a bug" in answer.body
        assert "Traceback" in caplog.text and "RuntimeError: a bug" in caplog.text
        monkeypatch.undo()
        assert (await api.handle(request("GET", "/v1/instances"))).status == 200
        assert (await api.handle(request("GET", "/v1/instances", token="bad"))).status == 401


def test_unknown_virtualizer_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "serve", "--data-dir", str(tmp_path), "--virtualizer", "vmware",
         "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown virtualizer 'vmware'" in result.stderr and "simulation" in result.stderr
