"""Seq-numbered events and the durable journal they are kept in (docs/architecture.md §4.5).

Every event is a flat JSON object ``{"seq": n, "time": "<RFC 3339 UTC, ms>", "type": ..., ...}``. Seqs are
gap-free and keep counting across restarts and file rotation, so a client that remembers the last seq it saw can
resume with ``since=<seq>`` and miss nothing.

:class:`EventJournal` appends events to ``<directory>/events.jsonl`` with *group commit*: :meth:`~EventJournal.emit`
only queues, and one writer task writes and fsyncs everything queued so far in a single worker-thread call. The reader
(:meth:`~EventJournal.events_since`) only ever sees events that are already durable, so
nothing a client has been shown can be lost by a crash. Recent events are served from memory; older ones are read
back from the journal files in a worker thread.

On disk the journal is ``events.jsonl`` plus up to ``keep_files`` rotated files; their layout, and everything
done to them in a worker thread (appending, rotating, recovering, reading back), is
:mod:`launcher.durable.journal_files`. This module keeps the seqs, the queue, the writer task and the readers.

A write that fails (a full disk) never ends the launcher and never leaves half an event behind: the file is cut
back to its last whole event, the batch goes back to the head of the queue, and the writer tries again with a
growing pause (up to ``_RETRY_MAX_SECONDS``) until the disk takes it. Meanwhile events wait in memory, not yet
durable, so no reader sees them and ``wait_durable`` waits. A line that is not an event (garbage written
behind the launcher's back) is skipped by readers, with a warning, and never hides the events after it.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from launcher.durable.journal_files import (
    JOURNAL_FILE,
    Cursor,
    Event,
    append_batch,
    journal_path,
    read_events,
    recover,
    rotate_files,
)

log = logging.getLogger(__name__)

# Bound on how long a cancelled run() may spend writing out what is still queued.
_FINAL_FLUSH_SECONDS = 1.0
# Pauses between attempts to write the journal while the disk refuses (doubling from the first).
_RETRY_MIN_SECONDS = 0.2
_RETRY_MAX_SECONDS = 5.0

_last_second: tuple[int, str] = (-1, "")


def utc_timestamp() -> str:
    """The current time as RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T02:05:59.123Z``."""
    global _last_second
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached_seconds, prefix = _last_second
    if seconds != cached_seconds:
        # strftime is the slow part, and emit() runs tens of thousands of times a second: once per second is enough.
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, prefix)
    return f"{prefix}.{nanos // 1_000_000:03d}Z"


class EventsExpired(Exception):
    """The requested events have been rotated away; ``oldest_seq`` is the oldest one still kept."""

    def __init__(self, oldest_seq: int) -> None:
        """The oldest event still kept is ``oldest_seq``: a reader may resume from ``since=oldest_seq - 1``."""
        super().__init__(f"events before seq {oldest_seq} are no longer kept")
        self.oldest_seq = oldest_seq


class EventJournal:
    """The durable, rotated event journal in ``directory``.

    Start :meth:`run` in a nursery (``await nursery.start(journal.run)``) before calling anything else; it recovers
    the seq from disk and then commits emitted events until it is cancelled, at which point it writes out what is
    still queued (best effort, bounded to about a second).

    Seqs are assigned by :meth:`emit` and become *durable* once written and fsync'd; :attr:`durable_seq` only
    grows. :meth:`wait_durable` and :meth:`events_since` are defined in terms of durable events.
    """

    def __init__(
        self,
        directory: Path,
        *,
        rotate_bytes: int = 64 << 20,
        keep_files: int = 4,
        memory_events: int = 20000,
        memory_bytes: int = 16 << 20,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """A journal in ``directory`` (made by :meth:`run` if missing); nothing is read or written before then.

        ``events.jsonl`` is rotated once it passes ``rotate_bytes``, and ``keep_files`` rotated files are kept
        (ValueError if fewer than 1). The newest durable events, at most ``memory_events`` of them and at most
        ``memory_bytes`` encoded, are served from memory. Worker-thread calls go through ``limiter``.
        """
        if keep_files < 1:
            raise ValueError("keep_files must be at least 1")
        self._directory = Path(directory)
        self._rotate_bytes = rotate_bytes
        self._keep_files = keep_files
        self._limiter = limiter
        # Newest durable events, bounded by count and by encoded size: a `stats` event carries every
        # instance, so at 10 000 instances a ring bounded by count alone would hold gigabytes.
        self._ring: collections.deque[Event] = collections.deque()
        self._ring_sizes: collections.deque[int] = collections.deque()
        self._ring_bytes = 0
        self._memory_events = memory_events
        self._memory_bytes = memory_bytes
        self._pending: list[Event] = []
        self._last_seq = 0
        self._durable_seq = 0
        # First seq of each journal file, oldest first; the last entry is events.jsonl (for an empty file: the seq
        # it will get next). Changed only by the writer, under _files_lock.
        self._segments: list[int] = [1]
        self._files_lock = trio.Lock()
        self._fd = -1
        self._size = 0
        self._accepting = False
        self._stopped = False
        self._work = trio.Event()  # set by emit(): there is something to commit
        self._committed = trio.Event()  # set and replaced after every commit (and when the journal stops)

    @property
    def last_seq(self) -> int:
        """The seq of the last emitted event, durable or not."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Every event up to and including this seq is on disk."""
        return self._durable_seq

    @property
    def oldest_seq(self) -> int:
        """The oldest seq that can still be read, or ``last_seq + 1`` when there is none."""
        return self._segments[0]

    # -- writing -------------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the journal, report started, then commit emitted events until cancelled."""
        self._fd, self._size, self._segments, self._last_seq = await trio.to_thread.run_sync(
            recover, self._directory, self._keep_files, limiter=self._limiter
        )
        self._durable_seq = self._last_seq
        self._accepting = True
        task_status.started()
        try:
            while True:
                await self._work.wait()
                self._work = trio.Event()
                await self._commit_until_written()
                if self._size > self._rotate_bytes:
                    await self._rotate()
        except trio.Cancelled:
            # Only a cancellation leaves the file in a known state (nothing half-written), so only then is it
            # safe to write once more.
            with trio.move_on_after(_FINAL_FLUSH_SECONDS, shield=True):
                try:
                    await self._commit()
                except OSError as exc:
                    log.error("event journal: %d events not written at shutdown: %s", len(self._pending), exc)
            raise
        finally:
            self._accepting = False
            self._stopped = True
            os.close(self._fd)
            self._committed.set()

    def emit(self, type: str, **fields: Any) -> int:
        """Queue an event and return its seq. Never blocks; the event becomes durable at the next commit.

        ``fields`` should be JSON values; anything else is written as its ``str()``. They are merged last, so a
        ``time`` field replaces the journal's timestamp; ``seq`` is reserved.
        """
        if not self._accepting:
            raise RuntimeError("EventJournal.emit() called while run() is not running")
        if "seq" in fields:
            raise ValueError("'seq' is assigned by the journal")
        seq = self._last_seq + 1
        self._last_seq = seq
        event: Event = {"seq": seq, "time": utc_timestamp(), "type": type, **fields}
        self._pending.append(event)
        self._work.set()
        return seq

    async def wait_durable(self, seq: int) -> None:
        """Return once event ``seq`` is on disk. Raises :exc:`trio.ClosedResourceError` if the journal stops
        first."""
        if seq > self._last_seq:
            raise ValueError(f"event {seq} has not been emitted (last seq is {self._last_seq})")
        while self._durable_seq < seq:
            if self._stopped:
                raise trio.ClosedResourceError(f"event journal stopped before event {seq} was written")
            await self._committed.wait()

    async def _commit_until_written(self) -> None:
        """Commit what is queued; while the disk refuses, keep trying with a growing pause (module doc)."""
        pause = _RETRY_MIN_SECONDS
        failing_since: float | None = None
        while True:
            try:
                await self._commit()
            except OSError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.error("event journal: cannot write %s: %s; retrying, %d events wait in memory",
                              JOURNAL_FILE, exc, len(self._pending))
                await trio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_SECONDS)
                continue
            if failing_since is not None:
                log.warning("event journal: written again after %.1f s", time.monotonic() - failing_since)
            return

    async def _commit(self) -> None:
        """Write and fsync the queued events. OSError if the disk refuses: the batch is queued again and the
        file is as it was."""
        batch = self._pending
        if not batch:
            return
        self._pending = []
        try:
            sizes = await trio.to_thread.run_sync(append_batch, self._fd, self._size, batch,
                                                  limiter=self._limiter)
        except (trio.Cancelled, OSError):
            # With abandon_on_cancel=False a cancellation can only arrive before the thread starts: nothing was
            # written. A failed write was cut back. Either way the batch goes back to the head of the queue.
            self._pending[:0] = batch
            raise
        self._size += sum(sizes)
        self._durable_seq = batch[-1]["seq"]
        self._remember(batch, sizes)
        self._committed.set()
        self._committed = trio.Event()

    def _remember(self, batch: list[Event], sizes: list[int]) -> None:
        self._ring.extend(batch)
        self._ring_sizes.extend(sizes)
        self._ring_bytes += sum(sizes)
        while self._ring and (len(self._ring) > self._memory_events or self._ring_bytes > self._memory_bytes):
            self._ring.popleft()
            self._ring_bytes -= self._ring_sizes.popleft()

    async def _rotate(self) -> None:
        async with self._files_lock:
            try:
                self._fd = await trio.to_thread.run_sync(rotate_files, self._directory, self._keep_files, self._fd,
                                                        limiter=self._limiter)
            except OSError as exc:
                log.error("event journal: cannot rotate %s: %s; trying again after the next commit", JOURNAL_FILE,
                          exc)
                return
            self._size = 0
            self._segments.append(self._durable_seq + 1)
            del self._segments[: -(self._keep_files + 1)]

    # -- reading -------------------------------------------------------------------------------------------------

    async def events_since(self, since: int, *, follow: bool = False) -> AsyncIterator[Event]:
        """Yield every durable event with seq > since, in order and without gaps; with ``follow``, keep waiting
        for new ones until cancelled (or until the journal stops).

        Raises :exc:`EventsExpired` before yielding anything if events after ``since`` have been rotated away; a
        follower that falls behind the in-memory events continues from the files, and gets EventsExpired only if
        it falls behind everything kept on disk too.
        """
        if since < self.oldest_seq - 1:
            raise EventsExpired(self.oldest_seq)
        next_seq = since + 1
        cursor: Cursor | None = None
        while True:
            if next_seq > self._durable_seq:
                if not follow or self._stopped:
                    return
                await self._committed.wait()
                continue
            events = self._from_memory(next_seq - 1)
            if events is None:
                events, cursor = await self._from_disk(next_seq, cursor)
            for event in events:
                yield event
            next_seq = events[-1]["seq"] + 1

    def _from_memory(self, since: int) -> list[Event] | None:
        """Durable events after since from the ring, or None if the ring does not reach back that far."""
        count = self._durable_seq - since
        if count <= 0:
            return []
        if count > len(self._ring):
            return None
        # Walk from the newest end: followers are usually near it, and deque indexing is O(n).
        events = list(itertools.islice(reversed(self._ring), count))
        events.reverse()
        return events

    async def _from_disk(self, next_seq: int, cursor: Cursor | None) -> tuple[list[Event], Cursor]:
        # The lock keeps rotation from renaming files between choosing a file and opening it.
        async with self._files_lock:
            segments = list(self._segments)
            if next_seq < segments[0]:
                raise EventsExpired(segments[0])
            if cursor is None or cursor.next_seq != next_seq or cursor.first_seq < segments[0]:
                cursor = Cursor(segments[bisect.bisect_right(segments, next_seq) - 1], 0, next_seq)
            paths = [journal_path(self._directory, k) for k in range(len(segments) - 1, -1, -1)]
            events, cursor = await trio.to_thread.run_sync(
                read_events, paths, segments, cursor, self._durable_seq, limiter=self._limiter
            )
        if not events or cursor is None:
            raise RuntimeError(f"event journal in {self._directory} is missing event {next_seq}")
        return events, cursor

