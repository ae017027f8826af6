"""The Docker Engine API client: `Engine`, one per backend, over the engine's unix socket.

The client is httpx's `AsyncClient` with a unix-socket transport (httpx is already the launcher's HTTP client;
docs/containers.md says why not docker-py). Its calls are Trio-native I/O: they wait on the socket without a
worker thread, so a call that hangs holds no thread, and cancelling it (a command's bound, a monitor session
ending) closes its connection at once.

Every request/answer call (`call`) is bounded by ``docker.call_timeout_s`` (or the `timeout_s` it is given). A
streaming call (`stream`: events, logs, an image load) is bounded only while it connects and reads the answer's
head; its body is read for as long as its caller wants, and the caller bounds that (an image load by
``docker.image_timeout_s``, a monitor session by its own life).

Failures are two exceptions: `EngineError`, the engine answered with an error status (its ``message``), and
`NoAnswer`, it did not answer at all (no socket, refused, timed out, the connection dropped: an engine that is
down or restarting). A caller tells "no answer" from an answer: a container the engine does not answer about is
not a container that is gone.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import trio

NOT_FOUND = 404
CONFLICT = 409
NOT_MODIFIED = 304
_ERROR_TEXT = 300  # characters of a non-JSON error body kept in the message


class EngineError(Exception):
    """The engine answered a call with an error status; `status` is the HTTP status, `message` the engine's."""

    def __init__(self, what: str, status: int, message: str) -> None:
        """`what` the call (e.g. "POST /containers/create"), the engine's `status` and `message`."""
        super().__init__(f"{what}: the engine answered {status}: {message}")
        self.status = status
        self.message = message


class NoAnswer(Exception):
    """The engine did not answer a call (down, restarting, hung, or no socket): not a verdict on what was asked."""


def path_part(text: str) -> str:
    """`text` (a container name or image reference) quoted for use as one part of an API path."""
    return quote(text, safe=":@")


@attrs.define(eq=False)
class Engine:
    """The Docker Engine at one socket, as API calls (module doc). Opened by `open_engine`."""

    client: httpx.AsyncClient
    socket: str  # for messages
    call_timeout_s: float

    async def call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                   body: Any = None, content: bytes | None = None, headers: Mapping[str, str] | None = None,
                   timeout_s: float | None = None, ok_statuses: tuple[int, ...] = ()) -> Any:
        """One request and its whole answer, within `timeout_s` (default ``call_timeout_s``): the answer's JSON
        (None for an empty one). `body` is sent as JSON, `content` as it is. A 2xx status, or one of
        `ok_statuses`, is success; any other an `EngineError`. `NoAnswer` if the engine does not answer in time."""
        what = f"{method} {path}"
        bound = self.call_timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(bound):
            try:
                answer = await self.client.request(method, path, params=_params(params), json=body, content=content,
                                                   headers=headers)
            except httpx.TransportError as exc:
                raise NoAnswer(f"{what}: no answer from the Docker Engine at {self.socket}: {_describe(exc)}") from exc
            if not answer.is_success and answer.status_code not in ok_statuses:
                raise EngineError(what, answer.status_code, _message(answer.content))
            if not answer.content.strip():
                return None
            try:
                return answer.json()
            except ValueError:
                return answer.text
        raise NoAnswer(f"{what}: no answer from the Docker Engine at {self.socket} within {bound:g} s")

    @asynccontextmanager
    async def stream(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                     content: AsyncIterable[bytes] | bytes | None = None,
                     headers: Mapping[str, str] | None = None) -> AsyncIterator[httpx.Response]:
        """A request whose answer's body is read while the context is open (`httpx.Response.aiter_bytes`,
        `json_lines`). Sending `content` and reading the answer's head are not bounded here (an upload takes as
        long as it takes): the caller bounds the whole. EngineError for an error status; NoAnswer if the engine
        does not answer or the connection drops (also while the body is read, through `json_lines` / `chunks`)."""
        what = f"{method} {path}"
        request = self.client.build_request(method, path, params=_params(params), content=content, headers=headers)
        try:
            answer = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise NoAnswer(f"{what}: no answer from the Docker Engine at {self.socket}: {_describe(exc)}") from exc
        try:
            if not answer.is_success:
                body = await self._read_error(answer)
                raise EngineError(what, answer.status_code, _message(body))
            yield answer
        finally:
            with trio.CancelScope(shield=True):
                await answer.aclose()

    async def _read_error(self, answer: httpx.Response) -> bytes:
        with trio.move_on_after(self.call_timeout_s):
            try:
                return await answer.aread()
            except httpx.TransportError:
                pass
        return b""

    async def chunks(self, answer: httpx.Response) -> AsyncIterator[bytes]:
        """The body of a streamed answer, as it comes; NoAnswer if the connection drops mid-way."""
        try:
            async for chunk in answer.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise NoAnswer(f"the Docker Engine at {self.socket} dropped a stream: {_describe(exc)}") from exc

    async def json_lines(self, answer: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects of a streamed answer (the engine sends one a line: events, load and pull progress);
        a line that is not a JSON object is skipped. NoAnswer if the connection drops mid-way."""
        try:
            async for line in answer.aiter_lines():
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    yield value
        except httpx.TransportError as exc:
            raise NoAnswer(f"the Docker Engine at {self.socket} dropped a stream: {_describe(exc)}") from exc


@asynccontextmanager
async def open_engine(socket_url: str, api_version: str, call_timeout_s: float) -> AsyncIterator[Engine]:
    """An `Engine` for the socket `socket_url` (``unix:///path``), speaking API `api_version`; its connections
    are closed when the context exits. No I/O until the first call."""
    socket = socket_url.removeprefix("unix://")
    # connect and pool bounds only: `call` bounds the whole of a call, and streams are read for as long as needed
    timeout = httpx.Timeout(connect=call_timeout_s, read=None, write=None, pool=call_timeout_s)
    # One connection per monitored container's log stream, and one for the event stream: no pool limit.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    transport = httpx.AsyncHTTPTransport(uds=socket, limits=limits)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://docker/v{api_version}",
                                 timeout=timeout) as client:
        yield Engine(client, socket, call_timeout_s)


def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Query parameters as the engine reads them: booleans as 1/0, mappings (filters) as JSON."""
    if params is None:
        return None
    out = {}
    for key, value in params.items():
        if isinstance(value, bool):
            out[key] = "1" if value else "0"
        elif isinstance(value, (dict, list)):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


def _message(body: bytes) -> str:
    """The engine's error message from an error answer's body ({"message": ...}), or the body's start."""
    try:
        value = json.loads(body)
        if isinstance(value, dict) and isinstance(value.get("message"), str):
            return str(value["message"]).strip()
    except ValueError:
        pass
    return body.decode(errors="replace").strip()[:_ERROR_TEXT] or "(no message)"


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "No such file" in text:
        return "no such socket (is dockerd running? bash .ci/docker-up)"
    return text
