"""The container's output (stdout and stderr, interleaved as they come) in the instance's ``console.log``,
bounded as virtlogd bounds a VM's: once it would pass ``docker.console_max_bytes``, ``console.log`` becomes
``console.log.1`` (the older ones shift to ``.2`` .. ``.<docker.console_backups>``, the oldest goes) and a new one
begins.

`follow` reads the engine's log stream of the container (``follow=1``) and appends it; the stream ends when the
container stops. It starts from the time ``console.log`` was last written (its mtime), so a monitor session that
starts again (a launcher restart, a RESTART of the instance) neither repeats nor loses what the file has, to the
engine's time resolution. The engine multiplexes the two streams in frames (an 8-byte header: stream, 3 zero
bytes, big-endian length); `Demux` takes them apart. File writes run in worker threads under the host's limiter.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import attrs
import trio

from virtualizers.docker.engine import Engine, path_part

CONSOLE_LOG = "console.log"
_HEADER = struct.Struct(">BxxxI")


@attrs.define(eq=False)
class Demux:
    """Takes the engine's multiplexed log stream apart: `feed` bytes as they come, get the payloads whole."""

    _buffer: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes) -> bytes:
        """The payload bytes of every frame completed by `data` (stdout's and stderr's alike), in order."""
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= _HEADER.size:
            _, size = _HEADER.unpack_from(self._buffer)
            if len(self._buffer) < _HEADER.size + size:
                break
            out += self._buffer[_HEADER.size:_HEADER.size + size]
            del self._buffer[:_HEADER.size + size]
        return bytes(out)


@attrs.define(eq=False)
class ConsoleFile:
    """An instance's console.log and its backups (module doc). Its methods block: run them in worker threads."""

    path: Path
    max_bytes: int
    backups: int

    def append(self, data: bytes) -> None:
        """Append `data`, rotating first if the file would pass `max_bytes`."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data[-self.max_bytes:])
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def last_written(self) -> float:
        """When the file was last written (epoch seconds), 0 if it does not exist."""
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0


async def follow(engine: Engine, name: str, console: ConsoleFile, limiter: trio.CapacityLimiter, *,
                 follow: bool = True) -> None:
    """Append container `name`'s output to `console` until its log stream ends (with `follow`: when the
    container stops; without: once what it has written so far is read) or this is cancelled. EngineError /
    NoAnswer pass (the caller may follow again)."""
    since = await trio.to_thread.run_sync(console.last_written, limiter=limiter)
    demux = Demux()
    params = {"follow": follow, "stdout": True, "stderr": True, "since": f"{since:.6f}"}
    async with engine.stream("GET", f"/containers/{path_part(name)}/logs", params=params) as answer:
        async for chunk in engine.chunks(answer):
            data = demux.feed(chunk)
            if data:
                await trio.to_thread.run_sync(console.append, data, limiter=limiter)
