"""Per-instance operator logs: ``<instance dir>/launcher.log`` (docs/architecture.md §4.5).

Each instance's log is a readable timeline of what the launcher did for it, one ``<RFC 3339 UTC, ms> message``
line per step. With ten thousand instances the launcher cannot keep a file open per instance, nor block the event
loop on file I/O, so :class:`InstanceLogs` buffers lines in memory and a background flusher appends them in rounds:
one worker-thread call per round, and in it one open-append-close per file that has new lines. No descriptor stays
open between rounds.

Logs are an operator aid, not a record that must survive a crash: they are not fsync'd, and lines for an instance
whose directory has gone are dropped. Each log is bounded: when ``launcher.log`` would grow past ``max_bytes`` it
becomes ``launcher.log.1`` (replacing the previous one), so an instance keeps at most about twice ``max_bytes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import trio

from launcher.durable.datadir import LOG_FILE
from launcher.durable.events import utc_timestamp

logger = logging.getLogger(__name__)

ROTATED_LOG_FILE = LOG_FILE + ".1"
# Bound on how long a cancelled run() may spend writing out what is still buffered.
_FINAL_FLUSH_SECONDS = 1.0
_POLL_SECONDS = 0.25
_READ_CHUNK_BYTES = 1 << 20


class InstanceLogs:
    """Buffered, size-bounded ``launcher.log`` files for many instance directories.

    :meth:`write` and :meth:`discard` are synchronous and cheap; :meth:`run` (started in a nursery) writes the
    buffers out every ``flush_interval`` seconds, and :meth:`flush` does so on demand. Rounds never overlap, so
    the lines of one instance reach its file in the order they were written.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 1 << 20,
        flush_interval: float = 0.2,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """``launcher.log`` is rotated to ``launcher.log.1`` before it would pass ``max_bytes``; buffers are written
        every ``flush_interval`` seconds, in worker threads bounded by ``limiter``. Nothing is written until
        :meth:`run` or :meth:`flush`."""
        self._max_bytes = max_bytes
        self._flush_interval = flush_interval
        self._limiter = limiter
        self._buffers: dict[Path, list[str]] = {}
        self._flush_lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every ``flush_interval`` until cancelled, then flush what is left (best effort, bounded)."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self._flush_interval)
                await self.flush()
        finally:
            with trio.move_on_after(_FINAL_FLUSH_SECONDS, shield=True):
                await self.flush()

    def write(self, instance_dir: Path, message: str) -> None:
        """Buffer a timestamped line for ``instance_dir``'s log."""
        line = f"{utc_timestamp()} {message}\n"
        lines = self._buffers.get(instance_dir)
        if lines is None:
            self._buffers[instance_dir] = [line]
        else:
            lines.append(line)

    def discard(self, instance_dir: Path) -> None:
        """Drop the lines buffered for ``instance_dir`` (it is being deleted)."""
        self._buffers.pop(instance_dir, None)

    async def flush(self) -> None:
        """Return once every line buffered before the call is in its file (or dropped, if its dir is gone)."""
        # The lock makes a caller wait for a round already in flight, which may hold some of its lines.
        async with self._flush_lock:
            if not self._buffers:
                return
            batch, self._buffers = self._buffers, {}
            try:
                await trio.to_thread.run_sync(_append_all, batch, self._max_bytes, limiter=self._limiter)
            except trio.Cancelled:
                # Cancelled before the thread started (abandon_on_cancel=False), so nothing was written: put the
                # lines back ahead of any written since.
                for instance_dir, lines in self._buffers.items():
                    batch.setdefault(instance_dir, []).extend(lines)
                self._buffers = batch
                raise

    async def follow(self, instance_dir: Path, *, follow: bool) -> AsyncIterator[bytes]:
        """Yield the content of ``instance_dir``'s launcher.log, then, with ``follow``, new bytes as they are
        appended, across rotations, until cancelled or the directory disappears."""
        await self.flush()
        log = instance_dir / LOG_FILE
        tail = _Tail(None, 0)
        while True:
            data, tail, dir_exists = await trio.to_thread.run_sync(_read_new, log, tail, limiter=self._limiter)
            if data:
                yield data
            if not dir_exists:
                return
            if len(data) < _READ_CHUNK_BYTES:  # caught up
                if not follow:
                    return
                await trio.sleep(_POLL_SECONDS)


def _append_all(batch: dict[Path, list[str]], max_bytes: int) -> None:
    for instance_dir, lines in batch.items():
        try:
            _append(instance_dir / LOG_FILE, "".join(lines).encode(errors="replace"), max_bytes)
        except FileNotFoundError:
            pass  # the instance was deleted; its lines go with it (and its dir must not come back)
        except OSError as exc:
            logger.warning("dropped %d log lines for %s: %s", len(lines), instance_dir, exc)


def _append(log: Path, data: bytes, max_bytes: int) -> None:
    # Plain os calls: open(log, "ab") adds an ioctl, an lseek and a buffer per file, and every system call in
    # this thread is a chance for it to take the GIL from the event loop.
    # O_CREAT never creates missing parent dirs: a deleted instance dir raises FileNotFoundError here. Mode 0o666
    # (less the umask) is what open() gives a new file.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and size + len(data) > max_bytes:
            os.replace(log, log.with_name(ROTATED_LOG_FILE))
            fresh = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            os.close(fd)
            fd = fresh
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class _Tail(NamedTuple):
    """How far a follower has read: which file (device, inode) and the offset in it."""

    ident: tuple[int, int] | None
    offset: int


def _read_new(log: Path, tail: _Tail) -> tuple[bytes, _Tail, bool]:
    """The bytes appended to ``log`` since ``tail``, the new tail, and whether the instance dir still exists."""
    try:
        with open(log, "rb") as file:
            stat = os.fstat(file.fileno())
            ident = (stat.st_dev, stat.st_ino)
            data, offset = b"", tail.offset
            if ident != tail.ident:
                # Rotated since the last read: finish the old file (now launcher.log.1), then start the new one.
                data = _rest_of_rotated(log, tail) if tail.ident is not None else b""
                offset = 0
            elif stat.st_size < offset:
                offset = 0  # truncated in place
            file.seek(offset)
            new = file.read(_READ_CHUNK_BYTES)
    except FileNotFoundError:
        return b"", tail, log.parent.is_dir()
    return data + new, _Tail(ident, offset + len(new)), True


def _rest_of_rotated(log: Path, tail: _Tail) -> bytes:
    try:
        with open(log.with_name(ROTATED_LOG_FILE), "rb") as file:
            stat = os.fstat(file.fileno())
            if (stat.st_dev, stat.st_ino) != tail.ident:
                return b""  # rotated more than once since the last read: that part is gone
            file.seek(tail.offset)
            return file.read()
    except FileNotFoundError:
        return b""
