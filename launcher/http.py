"""A small HTTP/1.1 server on Trio streams, with h11 doing the protocol work.

Why not an ASGI server: hypercorn's layers (ASGI wrapping, a task group per request, idle-timeout tasks) cost
about 1.2 ms of CPU per request on the target machine, half of the budget of a START at 500/s. h11 is the
HTTP/1.1 state machine hypercorn itself uses; this module keeps only the connection loop around it.

Contract: `serve(handler, host, port, max_body=...)` calls `handler(request)` once per request, with the
body already read (a body over `max_body` is answered 400 here). The handler returns a `Response` (sent with
Content-Length) or a `Stream` (sent chunked until its iterator ends or the client goes away). Connections
are kept alive; an idle or slow client is dropped after `IDLE_TIMEOUT_S`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio

from launcher.errors import INVALID_PAYLOAD, LauncherError

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 75.0  # keep-alive: a connection with no complete request for this long is closed
MAX_HEADER_BYTES = 64 * 1024


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    params: dict[str, str] = attrs.field(factory=dict)  # filled by the router


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj: Any) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


Write = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class Stream:
    """A streamed answer (events, logs, import progress) until its source ends or the client goes away.

    The source is either `chunks`, an async iterator, or `produce`, an async function that is given a `write`
    and returns when the answer is complete (for producers that need tasks of their own, which an async
    generator cannot hold across a yield). If the client goes away, either is cancelled."""

    content_type: str
    chunks: AsyncIterator[bytes] | None = None
    produce: Callable[[Write], Awaitable[None]] | None = None


Handler = Callable[[Request], Awaitable[Response | Stream]]


class BodyTooLarge(Exception):
    pass


async def serve(handler: Handler, host: str, port: int, *, max_body: int,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on host:port and serve until cancelled; task_status gets the URL actually bound."""

    async def connection(stream: trio.SocketStream) -> None:
        try:
            await _Connection(stream, handler, max_body).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, ConnectionError):
            pass  # the client went away or spoke nonsense: nothing to answer
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        task_status.started(f"http://{bound[0]}:{bound[1]}")


class _Connection:
    def __init__(self, stream: trio.SocketStream, handler: Handler, max_body: int) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def run(self) -> None:
        # One cancel scope for the connection, armed only while waiting for a request's head: moving a deadline
        # costs about half as much as a new scope per request.
        with trio.CancelScope() as idle:
            await self._serve(idle)

    async def _serve(self, idle: trio.CancelScope) -> None:
        while True:
            idle.deadline = trio.current_time() + IDLE_TIMEOUT_S
            event = await self._next_event()
            idle.deadline = math.inf
            if not isinstance(event, h11.Request):  # ConnectionClosed, or nonsense
                return
            try:
                request = await self._read_request(event)
            except BodyTooLarge:
                error = LauncherError(INVALID_PAYLOAD, f"payload is larger than the limit of {self.max_body} bytes")
                await self._send(Response.json(400, error.as_dict()), close=True)
                return
            answer = await self.handler(request)
            if isinstance(answer, Stream):
                await self._send_stream(answer)
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
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data)  # b"" means the peer closed

    async def _read_request(self, head: h11.Request) -> Request:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise BodyTooLarge
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
        data += self.conn.send(h11.Data(data=response.body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _send_stream(self, stream: Stream) -> None:
        head = h11.Response(status_code=200, headers=[("content-type", stream.content_type),
                                                        ("connection", "close")])
        await self.stream.send_all(self.conn.send(head))
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while await self.stream.receive_some(4096):
                    pass  # a client sends nothing more; b"" means it went away
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)

            async def write(chunk: bytes) -> None:
                await self.stream.send_all(self.conn.send(h11.Data(data=chunk)))

            if stream.produce is not None:
                await stream.produce(write)
            elif stream.chunks is not None:
                async for chunk in stream.chunks:
                    await write(chunk)
            await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
            nursery.cancel_scope.cancel()
