"""The durable event journal: seq continuity, durability, group commit, rotation, recovery and following."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from launcher.durable import events
from launcher.durable.events import EventJournal, EventsExpired
from launcher.durable.journal_files import JOURNAL_FILE

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@asynccontextmanager
async def running(journal: EventJournal) -> AsyncIterator[EventJournal]:
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        yield journal
        nursery.cancel_scope.cancel()


async def collect(journal: EventJournal, since: int) -> list[dict[str, Any]]:
    return [event async for event in journal.events_since(since)]


async def emit_in_commits(journal: EventJournal, count: int, per_commit: int) -> None:
    """Emit `count` events, making each group of `per_commit` durable before the next (so, separate commits)."""
    for _ in range(0, count, per_commit):
        for _ in range(per_commit):
            seq = journal.emit("tick", payload="x" * 20)
        await journal.wait_durable(seq)


async def rotation_done(directory: Path) -> None:
    """Wait for the rotation that follows a commit bigger than rotate_bytes (it runs after wait_durable returns)."""
    with trio.fail_after(2):
        while (directory / JOURNAL_FILE).stat().st_size:
            await trio.sleep(0.01)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [event["seq"] for event in events]


class _ReadFromDisk(Exception):
    pass


async def in_memory(journal: EventJournal, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seqs of the durable events held in memory: the longest tail that `events_since` serves without reading a
    journal file (the file reader is made to fail meanwhile)."""

    def no_disk(*args: object) -> object:
        raise _ReadFromDisk

    since = journal.durable_seq
    with monkeypatch.context() as patch:
        patch.setattr(events, "read_events", no_disk)
        while since > 0:
            try:
                await collect(journal, since - 1)
            except (_ReadFromDisk, EventsExpired):
                break
            since -= 1
    return list(range(since + 1, journal.durable_seq + 1))


async def test_seq_is_gap_free_and_continues_after_restart(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path)) as journal:
        assert (journal.last_seq, journal.oldest_seq) == (0, 1)
        assert [journal.emit("started", instance_uuid=f"u{i}") for i in range(5)] == [1, 2, 3, 4, 5]
        await journal.wait_durable(5)

    async with running(EventJournal(tmp_path)) as journal:
        assert (journal.last_seq, journal.durable_seq, journal.oldest_seq) == (5, 5, 1)
        assert journal.emit("stopped") == 6
        await journal.wait_durable(6)
        events = await collect(journal, 0)

    assert seqs(events) == [1, 2, 3, 4, 5, 6]
    assert events[0]["type"] == "started" and events[0]["instance_uuid"] == "u0"
    assert list(events[0])[:3] == ["seq", "time", "type"]
    assert all(TIME_RE.match(event["time"]) for event in events)
    assert lines_of(tmp_path / JOURNAL_FILE) == events
    assert b", " not in (tmp_path / JOURNAL_FILE).read_bytes()  # compact separators


async def test_emit_needs_a_running_journal(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    with pytest.raises(RuntimeError):
        journal.emit("too-early")
    async with running(journal):
        with pytest.raises(ValueError):
            journal.emit("bad", seq=7)
    with pytest.raises(RuntimeError):
        journal.emit("too-late")


async def test_readers_see_only_durable_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(EventJournal(tmp_path)) as journal:
        gate = threading.Event()
        real_fsync = os.fsync

        def gated_fsync(fd: int) -> None:
            gate.wait(timeout=5)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", gated_fsync)
        seen: list[int] = []

        async def follow() -> None:
            async for event in journal.events_since(0, follow=True):
                seen.append(event["seq"])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                seq = journal.emit("created")
                await trio.testing.wait_all_tasks_blocked()
                # Written maybe, but not fsync'd: nobody may see it yet.
                assert (journal.last_seq, journal.durable_seq) == (1, 0)
                assert seen == [] and await collect(journal, 0) == []
                with trio.move_on_after(0.05) as waiting:
                    await journal.wait_durable(seq)
                assert waiting.cancelled_caught

                gate.set()
                with trio.fail_after(30):  # only stops a hang
                    await journal.wait_durable(seq)
                    while not seen:
                        await trio.sleep(0.01)
                assert seen == [1] and seqs(await collect(journal, 0)) == [1]
                nursery.cancel_scope.cancel()
        finally:
            gate.set()


async def test_group_commit_batches_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst emitted without a checkpoint between the emits is queued whole before the writer task runs, and
    the writer writes and fsyncs everything queued in one call (module doc): one fsync, not none, not 1000."""
    async with running(EventJournal(tmp_path)) as journal:
        fsyncs = 0
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            nonlocal fsyncs
            fsyncs += 1
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting_fsync)
        for i in range(1000):
            journal.emit("tick", i=i)
        await journal.wait_durable(1000)
        assert fsyncs == 1
    assert seqs(lines_of(tmp_path / JOURNAL_FILE)) == list(range(1, 1001))


async def test_rotation_keeps_seq_continuous(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=50)) as journal:
        await emit_in_commits(journal, 120, per_commit=8)  # each commit is more than rotate_bytes
        await rotation_done(tmp_path)
        rotated = sorted(tmp_path.glob(JOURNAL_FILE + ".*"), key=lambda p: -int(p.suffix[1:]))
        assert len(rotated) == 15
        on_disk = [event for path in [*rotated, tmp_path / JOURNAL_FILE] for event in lines_of(path)]
        assert seqs(on_disk) == list(range(1, 121))

        journal._ring.clear()  # force the read from the files
        assert seqs(await collect(journal, 0)) == list(range(1, 121))
        assert seqs(await collect(journal, 57)) == list(range(58, 121))

    # events.jsonl is empty after the last rotation: the restart finds the last seq in events.jsonl.1.
    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=50)) as journal:
        assert (journal.last_seq, journal.oldest_seq) == (120, 1)
        assert journal.emit("after-restart") == 121
        await journal.wait_durable(121)
        assert seqs(await collect(journal, 115)) == [116, 117, 118, 119, 120, 121]


async def test_events_expired_when_rotated_away(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=2)) as journal:
        await emit_in_commits(journal, 120, per_commit=8)
        await rotation_done(tmp_path)
        rotated = [tmp_path / f"{JOURNAL_FILE}.{k}" for k in (1, 2)]
        assert not (tmp_path / f"{JOURNAL_FILE}.3").exists()
        oldest = lines_of(rotated[-1])[0]["seq"]
        assert journal.oldest_seq == oldest > 1

        with pytest.raises(EventsExpired) as expired:
            await collect(journal, oldest - 2)
        assert expired.value.oldest_seq == oldest
        assert seqs(await collect(journal, oldest - 1)) == list(range(oldest, 121))

    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=2)) as journal:
        assert journal.oldest_seq == oldest
        with pytest.raises(EventsExpired):
            await collect(journal, 0)


async def test_torn_last_line_is_truncated(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path)) as journal:
        for _ in range(3):
            journal.emit("tick")
        await journal.wait_durable(3)
    path = tmp_path / JOURNAL_FILE
    good = path.read_bytes()
    path.write_bytes(good + b'{"seq":4,"time":"2026-11-21T02:0')  # the crash hit mid-write

    async with running(EventJournal(tmp_path)) as journal:
        assert path.read_bytes() == good
        assert journal.last_seq == 3
        assert journal.emit("tick") == 4
        await journal.wait_durable(4)
        assert seqs(await collect(journal, 0)) == [1, 2, 3, 4]
    assert seqs(lines_of(path)) == [1, 2, 3, 4]


async def test_follow_yields_later_events_until_cancelled(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path)) as journal:
        journal.emit("before")
        await journal.wait_durable(1)
        send, receive = trio.open_memory_channel[dict[str, Any]](100)

        async def follow(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                async for event in journal.events_since(0, follow=True):
                    await send.send(event)

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(follow)
            with trio.fail_after(2):
                assert (await receive.receive())["type"] == "before"
                journal.emit("after", detail=1)
                event = await receive.receive()
            assert (event["seq"], event["type"], event["detail"]) == (2, "after", 1)
            scope.cancel()
        assert receive.statistics().current_buffer_used == 0


async def test_slow_follower_falls_back_to_disk_without_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = EventJournal(tmp_path, rotate_bytes=400, keep_files=100, memory_events=5)
    async with running(journal):
        await emit_in_commits(journal, 3, per_commit=3)
        follower = journal.events_since(0, follow=True)
        seen = [(await follower.__anext__())["seq"]]
        # While the follower dawdles, far more events than the ring holds are committed and rotated.
        await emit_in_commits(journal, 60, per_commit=4)
        assert await in_memory(journal, monkeypatch) == [59, 60, 61, 62, 63]
        with trio.fail_after(2):
            while seen[-1] < 63:
                seen.append((await follower.__anext__())["seq"])
            journal.emit("live")
            seen.append((await follower.__anext__())["seq"])
        await follower.aclose()
    assert seen == list(range(1, 65))


async def start_in_own_scope(nursery: trio.Nursery, journal: EventJournal) -> trio.CancelScope:
    """Start journal.run in `nursery` inside a scope of its own, so a test can cancel only the journal."""
    scope = trio.CancelScope()

    async def run_journal(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await journal.run(task_status=task_status)

    await nursery.start(run_journal)
    return scope


async def test_cancelling_run_flushes_pending_events(tmp_path: Path) -> None:
    limiter = trio.CapacityLimiter(1)
    journal = EventJournal(tmp_path, limiter=limiter)
    async with trio.open_nursery() as nursery:
        run_scope = await start_in_own_scope(nursery, journal)
        await limiter.acquire()  # the writer cannot reach its thread: events stay queued
        for i in range(10):
            journal.emit("pending", i=i)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.durable_seq == 0
        run_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        limiter.release()  # now the shielded final flush can write them

    assert journal.durable_seq == 10
    assert seqs(lines_of(tmp_path / JOURNAL_FILE)) == list(range(1, 11))


async def test_restart_repairs_a_rotation_cut_short(tmp_path: Path) -> None:
    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=10)) as journal:
        await emit_in_commits(journal, 40, per_commit=8)
        await rotation_done(tmp_path)
    # A crash between two renames of a rotation leaves a hole in the numbering.
    for k in (5, 4, 3, 2):
        os.replace(tmp_path / f"{JOURNAL_FILE}.{k}", tmp_path / f"{JOURNAL_FILE}.{k + 1}")

    async with running(EventJournal(tmp_path, rotate_bytes=600, keep_files=3)) as journal:
        names = sorted(path.name for path in tmp_path.glob(JOURNAL_FILE + "*"))
        assert names == [JOURNAL_FILE, f"{JOURNAL_FILE}.1", f"{JOURNAL_FILE}.2", f"{JOURNAL_FILE}.3"]
        assert (journal.last_seq, journal.oldest_seq) == (40, 17)  # keep_files=3 dropped the two oldest
        assert seqs(await collect(journal, 16)) == list(range(17, 41))


async def test_waiters_are_released_when_the_journal_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "_FINAL_FLUSH_SECONDS", 0.01)
    limiter = trio.CapacityLimiter(1)
    journal = EventJournal(tmp_path, limiter=limiter)
    outcomes: list[str] = []

    async def wait_for_event() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await journal.wait_durable(1)
        outcomes.append("waiter released")

    async def follow() -> None:
        assert [event async for event in journal.events_since(0, follow=True)] == []
        outcomes.append("follower ended")

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            run_scope = await start_in_own_scope(nursery, journal)
            await limiter.acquire()  # the event can never be written: the final flush gives up
            journal.emit("stuck")
            nursery.start_soon(wait_for_event)
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            run_scope.cancel()
    limiter.release()
    assert sorted(outcomes) == ["follower ended", "waiter released"]
    assert journal.durable_seq == 0


async def test_memory_ring_is_bounded_by_bytes_and_older_events_come_from_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = EventJournal(tmp_path, memory_events=1000, memory_bytes=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for _ in range(20):
            journal.emit("stats", instances=["x" * 1000])  # ~1 KB each: only ~10 fit in memory
        await journal.wait_durable(journal.last_seq)
        assert len(await in_memory(journal, monkeypatch)) <= 10
        assert [e["seq"] async for e in journal.events_since(0)] == list(range(1, 21))
        nursery.cancel_scope.cancel()
