"""A small blocking client of the launcher's HTTP API, used by the `launcher` command."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from launcher.durable import datadir
from launcher.plugin.errors import LauncherError

DEFAULT_DATA_DIR = Path("/var/lib/launcher")
DEFAULT_WAIT_S = 600.0  # `?wait=1` without a timeout: as long as the launcher's default `timeouts.wait_s`
WAIT_MARGIN_S = 30.0  # a waited-for answer may arrive this long after the wait's own timeout


class ClientError(LauncherError):
    """The launcher refused or failed a request; `code` is its ciao error code."""

    def __init__(self, code: str, reason: str, instance_uuid: str = "", status: int = 0) -> None:
        super().__init__(code, reason, instance_uuid)
        self.status = status


class Client:
    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        self.unix_path = parts.path if parts.scheme == "unix" and parts.path else ""
        if not self.unix_path and (parts.scheme != "http" or not parts.hostname):
            raise ValueError(f"launcher URL must be http://HOST:PORT or unix:///PATH, got {url!r}")
        self.host, self.port = parts.hostname or "localhost", parts.port or 80
        self.where = f"unix://{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        self.token = token
        self.timeout = timeout

    @classmethod
    def discover(cls, url: str | None, data_dir: Path | None, token: str | None = None) -> Client:
        """URL and token from the arguments, else LAUNCHER_URL / LAUNCHER_TOKEN, else the data dir's files."""
        directory = data_dir or Path(os.environ.get("LAUNCHER_DATA_DIR", DEFAULT_DATA_DIR))
        url = url or os.environ.get("LAUNCHER_URL") or _read(directory / datadir.URL_FILE, "URL")
        token = token or os.environ.get("LAUNCHER_TOKEN") or _read(directory / datadir.TOKEN_FILE, "token")
        return cls(url, token)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "",
                **query: Any) -> Any:
        """One call; the decoded JSON answer, or ClientError with the launcher's code and reason.

        With `wait`, the launcher answers only once the command has finished or `timeout` (sent explicitly,
        DEFAULT_WAIT_S if not given) has passed, so the socket waits that long plus WAIT_MARGIN_S."""
        read_timeout = self.timeout
        if query.get("wait"):
            query["timeout"] = query.get("timeout") or DEFAULT_WAIT_S
            read_timeout = max(read_timeout, float(query["timeout"]) + WAIT_MARGIN_S)
        conn = self._send(method, path, body, content_type, query, read_timeout)
        try:
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            raise ClientError("no_answer", f"the launcher at {self.where} did not answer within "
                                           f"{read_timeout:g} s") from None
        finally:
            conn.close()
        answer = json.loads(data) if data else {}
        if response.status >= 400:
            raise ClientError(answer.get("error", "http_error"), answer.get("reason", data.decode(errors="replace")),
                              answer.get("instance_uuid", ""), response.status)
        return answer

    def stream(self, path: str, read_timeout: float | None = None, method: str = "GET",
               **query: Any) -> Iterator[bytes]:
        """A streamed answer (events, logs, import progress), chunk by chunk, until the server ends it.
        `read_timeout` bounds each wait for data (None: wait as long as it takes, as `events -f` should)."""
        conn = self._send(method, path, None, "", query, timeout=read_timeout)
        try:
            response = conn.getresponse()
            if response.status >= 400:
                answer = json.loads(response.read() or b"{}")
                raise ClientError(answer.get("error", "http_error"), answer.get("reason", ""), "", response.status)
            while chunk := response.read1(65536):
                yield chunk
        finally:
            conn.close()

    def _send(self, method: str, path: str, body: bytes | None, content_type: str, query: dict[str, Any],
              timeout: float | None) -> http.client.HTTPConnection:
        conn = (_UnixHTTPConnection(self.unix_path, timeout) if self.unix_path
                else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        params = {k: _query_value(v) for k, v in query.items() if v is not None and v is not False}
        target = path + (f"?{urlencode(params)}" if params else "")
        try:
            conn.request(method, target, body=body, headers=headers)
        except OSError as exc:
            conn.close()
            raise ClientError("unreachable", f"cannot reach the launcher at {self.where}: {exc}") from exc
        return conn


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the launcher's unix socket (`listen_unix:`)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _query_value(value: Any) -> str:
    return "1" if value is True else str(value)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ClientError("no_launcher", f"no launcher {what}: give --url/--data-dir or set LAUNCHER_URL and "
                          f"LAUNCHER_TOKEN ({exc})") from exc
