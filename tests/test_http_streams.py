"""The HTTP server's streams, in-process on real sockets: the shapes that only the qemu virtualizer's routes use
(image import progress: a `produce` stream with a task of its own) and a stream whose source has a bug."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from launcher.transport import http
from launcher.transport.http import Request, Response, Stream, Write


async def produce_with_a_task(write: Write) -> None:
    """As `ImageRoutes.import_image`: a task reports progress through a channel; the stream writes it out."""
    send, receive = trio.open_memory_channel[bytes](64)

    async def progress() -> None:
        async with send:
            for n in range(1_000_000):
                await send.send(b'{"progress": %d}\n' % n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        async with receive:
            async for line in receive:
                await write(line)


async def broken_source() -> AsyncIterator[bytes]:
    yield b"first\n"
    raise RuntimeError("a bug in a stream's source")


async def handler(request: Request) -> Response | Stream:
    if request.path == "/progress":
        return Stream("application/x-ndjson", produce=produce_with_a_task)
    if request.path == "/broken":
        return Stream("text/plain", chunks=broken_source())
    return Response.json(200, {"status": "ok"})


async def get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    listeners, url = await http.open_tcp("127.0.0.1", 0)
    await nursery.start(partial(http.serve, max_body=1024), handler, listeners)
    return int(url.rsplit(":", 1)[1])


async def test_a_reset_in_a_stream_with_its_own_task_stays_in_its_connection(port: int) -> None:
    for _ in range(5):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET /progress HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await sock.recv(65536)).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    await trio.sleep(0.2)
    assert b'{"status":"ok"}' in await get(port, "/healthz")


async def test_a_bug_in_a_stream_source_is_logged_and_ends_only_its_connection(
        port: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        answer = await get(port, "/broken")
    assert b"first" in answer and not answer.endswith(b"0\r\n\r\n")  # cut short: no terminating chunk
    assert "RuntimeError: a bug in a stream's source" in caplog.text
    assert b'{"status":"ok"}' in await get(port, "/healthz")
