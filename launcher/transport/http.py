"""A small HTTP/1.1 server on Trio streams, with h11 doing the protocol work.

Why not an ASGI server: hypercorn's layers (ASGI wrapping, a task group per request, idle-timeout tasks) cost
about 1.2 ms of CPU per request on the target machine, half of the budget of a START at 500/s. h11 is the
HTTP/1.1 state machine hypercorn itself uses; this module keeps only the connection loop around it.

Contract: `serve(handler, listeners, max_body=..., limits=...)` calls `handler(request)` once per request, with
the body already read. The handler returns a `Response` (sent with Content-Length) or a `Stream` (sent chunked
until its iterator ends or the client goes away). Connections are kept alive.

Whatever a client does, only its own connection suffers (docs/api.md, "HTTP robustness"):
- Every error of a connection (a reset, a half-close, a broken pipe, even a bug in a stream's source) ends in
  that connection's task; Trio's ExceptionGroups are unwrapped there with `except*`.
- A request HTTP cannot parse is answered `400 invalid_payload` (431 for a head over `MAX_HEADER_BYTES`), a
  body over `max_body` `400 invalid_payload`, and the connection is closed.
- Every wait on a client is bounded (`HttpLimits`): the head of a request (keep-alive idle time), its body, and
  every write (a reader that does not take what it is sent is dropped, so it holds one chunk, never a queue).
- At most `HttpLimits.max_connections` connections are open: a new one closes the one idle the longest (waiting
  for a request head), or is answered `503 too_many_connections` when none is idle.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio

from launcher.core.config import HttpLimits
from launcher.plugin.errors import INVALID_PAYLOAD, REQUEST_TIMEOUT, TOO_MANY_CONNECTIONS, LauncherError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # a request head longer than this (plus at most RECEIVE_BYTES) is answered 431
RECEIVE_BYTES = 16 * 1024  # h11 checks the head's size between receives, so this bounds the overshoot
LINGER_S = 2.0  # after an error answer, how long the client's remaining bytes are read and dropped
LINGER_BYTES = 1 << 20  # ... and at most this many
DEFAULT_LIMITS = HttpLimits()  # the `http:` section's defaults (launcher.core.config)


@attrs.frozen
class Request:
    """One request as a handler sees it: the method, the path (percent-decoded, without the query), the query's
    parameters (the last value of a repeated one), the headers, the whole body (within the HTTP limits) and the
    path parameters the router matched."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    params: dict[str, str] = attrs.field(factory=dict)  # filled by the router


@attrs.frozen
class Response:
    """A whole answer: status, body and content type (JSON unless said otherwise)."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj: Any) -> Response:
        """A JSON answer: `obj` compactly encoded, with a final newline."""
        return cls(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    @classmethod
    def error(cls, status: int, code: str, reason: str) -> Response:
        """The JSON error answer ``{"error": code, "reason": reason, "instance_uuid": ""}`` with `status`."""
        return cls.json(status, LauncherError(code, reason).as_dict())


Write = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class Stream:
    """A streamed answer (events, logs, import progress) until its source ends or the client goes away.

    The source is either `chunks`, an async iterator, or `produce`, an async function that is given a `write`
    and returns when the answer is complete (for producers that need tasks of their own, which an async
    generator cannot hold across a yield). If the client goes away, either is cancelled. A `write` returns
    once the client's socket has taken the chunk, so a producer never runs ahead of a slow reader."""

    content_type: str
    chunks: AsyncIterator[bytes] | None = None
    produce: Callable[[Write], Awaitable[None]] | None = None


Handler = Callable[[Request], Awaitable[Response | Stream]]

# What a client can do to its own connection; nothing to answer, nothing to log.
CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, ConnectionError)


async def serve(handler: Handler, listeners: Sequence[trio.SocketListener], *, max_body: int,
                limits: HttpLimits = DEFAULT_LIMITS,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP on `listeners` until cancelled; each connection in a task of its own, whose errors stay there."""
    connections = _Connections(limits.max_connections)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            await connections.serve(_Connection(stream, handler, max_body, limits))
        except* CLIENT_GONE:
            pass  # the client went away or spoke nonsense: nothing to answer
        except* Exception:
            log.exception("an HTTP connection failed (a bug; only this connection was closed)")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, connection, list(listeners)))
        task_status.started()


async def open_tcp(host: str, port: int) -> tuple[list[trio.SocketListener], str]:
    """Listeners on host:port (port 0: a free one) and the URL actually bound."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    return listeners, f"http://{bound[0]}:{bound[1]}"


class _Phase(enum.Enum):
    HEAD = "waiting for a request head"
    BODY = "reading a request body"
    HANDLER = "handling a request"
    SEND = "sending"


class _Connections:
    """The open connections, and which of them wait for a request head (oldest first): those can be closed
    without losing a request, to make room at `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.idle: dict[_Connection, None] = {}  # insertion order: the longest idle first

    async def serve(self, connection: _Connection) -> None:
        """Run `connection` if there is room, making room by closing the longest idle connection if needed."""
        if self.count >= self.limit and not self._close_longest_idle():
            await connection.refuse(503, TOO_MANY_CONNECTIONS,
                                    f"the launcher already has {self.count} open connections, none of them idle "
                                    "(http.max_connections)")
            return
        self.count += 1
        connection.idle = self.idle
        try:
            await connection.run()
        finally:
            self.count -= 1
            self.idle.pop(connection, None)

    def _close_longest_idle(self) -> bool:
        """Cancel the connection that has waited longest for a request head; it closes at once (so the limit is
        exceeded only until then)."""
        for victim in self.idle:
            del self.idle[victim]
            victim.scope.cancel()
            return True
        return False


class _Connection:
    """One client connection: requests in turn, under one cancel scope whose deadline bounds each phase."""

    def __init__(self, stream: trio.SocketStream, handler: Handler, max_body: int, limits: HttpLimits) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.scope = trio.CancelScope()
        self.phase = _Phase.HEAD
        self.answering_head = False  # the request is a HEAD: answers get their head only (RFC 9110 §9.3.2)
        self.idle: dict[_Connection, None] = {}  # where it is listed while it waits for a request head

    async def run(self) -> None:
        with self.scope:
            await self._serve()
        if self.scope.cancelled_caught and self.phase is _Phase.BODY:
            await self.refuse(408, REQUEST_TIMEOUT,
                              f"the request body did not arrive within {self.limits.body_timeout_s:g} s")

    def _enter(self, phase: _Phase, timeout: float) -> None:
        """Start a phase, bounded by `timeout` seconds (inf: unbounded)."""
        self.phase = phase
        self.scope.deadline = trio.current_time() + timeout

    async def _serve(self) -> None:
        while True:
            self._enter(_Phase.HEAD, self.limits.idle_timeout_s)
            self.idle[self] = None
            try:
                event = await self._next_event()
                self.idle.pop(self, None)
                if not isinstance(event, h11.Request):  # ConnectionClosed
                    return
                self.answering_head = event.method == b"HEAD"
                self._enter(_Phase.BODY, self.limits.body_timeout_s)
                request = await self._read_request(event)
            except h11.RemoteProtocolError as exc:
                await self.refuse(exc.error_status_hint, INVALID_PAYLOAD, f"malformed HTTP request: {exc}")
                return
            except _BodyTooLarge:
                await self.refuse(400, INVALID_PAYLOAD, f"payload is larger than the limit of {self.max_body} bytes")
                return
            self._enter(_Phase.HANDLER, math.inf)
            answer = await self.handler(request)
            if isinstance(answer, Stream):
                await (self._send_stream_head(answer) if self.answering_head else self._send_stream(answer))
                return  # a streamed answer ends the connection
            await self._send(answer)
            if self.conn.our_state is h11.MUST_CLOSE:
                return
            self.conn.start_next_cycle()

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self.conn.receive_data(data)  # b"" means the peer closed

    async def _read_request(self, head: h11.Request) -> Request:
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self.max_body:  # h11 checked that it is digits
                raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise _BodyTooLarge
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("the request ended before its body")
        target = head.target.decode("latin-1")
        if target.startswith("/") and not target.startswith("//") and not any(c in target for c in "?#%"):
            path, query = target, {}  # the usual case: urllib's parsing would return it as it is
        else:
            split = urlsplit(target)
            path, query = unquote(split.path), {k: v[-1] for k, v in parse_qs(split.query).items()}
        return Request(
            method=head.method.decode("ascii"),
            path=path,
            query=query,
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
            body=b"".join(chunks),
        )

    async def _send(self, response: Response, close: bool = False) -> None:
        headers = [("content-type", response.content_type), ("content-length", str(len(response.body)))]
        if close:
            headers.append(("connection", "close"))
        data = self.conn.send(h11.Response(status_code=response.status, headers=headers))
        if not self.answering_head:
            data += self.conn.send(h11.Data(data=response.body))
        data += self.conn.send(h11.EndOfMessage())
        self._enter(_Phase.SEND, self.limits.send_timeout_s)
        await self.stream.send_all(data)

    async def _send_stream_head(self, stream: Stream) -> None:
        """A HEAD of a streamed answer: its head, of unknown length, so the connection ends after it."""
        head = h11.Response(status_code=200, headers=[("content-type", stream.content_type), ("connection", "close")])
        self._enter(_Phase.SEND, self.limits.send_timeout_s)
        await self.stream.send_all(self.conn.send(head) + self.conn.send(h11.EndOfMessage()))

    async def _send_stream(self, stream: Stream) -> None:
        head = h11.Response(status_code=200, headers=[("content-type", stream.content_type),
                                                        ("connection", "close")])
        self._enter(_Phase.SEND, self.limits.send_timeout_s)
        await self.stream.send_all(self.conn.send(head))
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while await self.stream.receive_some(4096):
                    pass  # a client sends nothing more; b"" means it went away
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)

            async def write(chunk: bytes) -> None:
                self._enter(_Phase.SEND, self.limits.send_timeout_s)
                await self.stream.send_all(self.conn.send(h11.Data(data=chunk)))
                self._enter(_Phase.HANDLER, math.inf)  # waiting for the source (a follower waits for news)

            self._enter(_Phase.HANDLER, math.inf)
            if stream.produce is not None:
                await stream.produce(write)
            elif stream.chunks is not None:
                async for chunk in stream.chunks:
                    await write(chunk)
            self._enter(_Phase.SEND, self.limits.send_timeout_s)
            await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
            nursery.cancel_scope.cancel()

    async def refuse(self, status: int, code: str, reason: str) -> None:
        """Answer an error and close: the answer bounded by `send_timeout_s`, then a half-close and a bounded
        read of what the client still sends, so that the kernel does not reset the connection (and lose the
        answer) because unread bytes were left when it closed."""
        with trio.move_on_after(self.limits.send_timeout_s):
            await self._send(Response.error(status, code, reason), close=True)
        with trio.move_on_after(LINGER_S):
            await self.stream.send_eof()
            received = 0
            while received < LINGER_BYTES and (data := await self.stream.receive_some(65536)):
                received += len(data)


class _BodyTooLarge(Exception):
    pass
