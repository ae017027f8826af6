"""Per-instance operator logs: buffering, flushing, size bound, no lingering descriptors, following."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import trio

from launcher.durable import logs
from launcher.durable.datadir import LOG_FILE
from launcher.durable.logs import InstanceLogs

LINE_RE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (.*)$")


def messages(path: Path) -> list[bytes]:
    matches = [LINE_RE.match(line) for line in path.read_bytes().splitlines()]
    assert all(matches), path.read_bytes()
    return [match.group(1) for match in matches if match]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    path = tmp_path / "instances" / "0b1d"
    path.mkdir(parents=True)
    return path


async def test_lines_appear_with_timestamps_after_flush(instance_dir: Path) -> None:
    instance_logs = InstanceLogs()
    instance_logs.write(instance_dir, "start requested")
    instance_logs.write(instance_dir, "backing image ready in 0.12 s")
    assert not (instance_dir / LOG_FILE).exists()  # buffered only
    await instance_logs.flush()
    assert messages(instance_dir / LOG_FILE) == [b"start requested", b"backing image ready in 0.12 s"]
    instance_logs.write(instance_dir, "running")
    await instance_logs.flush()
    assert messages(instance_dir / LOG_FILE)[-1] == b"running"


async def test_run_flushes_periodically_and_on_cancel(instance_dir: Path) -> None:
    instance_logs = InstanceLogs(flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(instance_logs.run)
        instance_logs.write(instance_dir, "periodic")
        with trio.fail_after(2):
            while not (instance_dir / LOG_FILE).exists():
                await trio.sleep(0.01)
        instance_logs.write(instance_dir, "at shutdown")
        nursery.cancel_scope.cancel()
    assert messages(instance_dir / LOG_FILE) == [b"periodic", b"at shutdown"]


async def test_size_is_bounded_by_rotation(instance_dir: Path) -> None:
    instance_logs = InstanceLogs(max_bytes=1000)
    for round_ in range(40):
        for i in range(5):
            instance_logs.write(instance_dir, f"round {round_:02d} step {i} " + "x" * 10)
        await instance_logs.flush()
    current, rotated = instance_dir / LOG_FILE, instance_dir / (LOG_FILE + ".1")
    assert current.stat().st_size <= 1000 and rotated.stat().st_size <= 1000
    assert sorted(p.name for p in instance_dir.iterdir()) == [LOG_FILE, LOG_FILE + ".1"]
    assert messages(current)[-1] == b"round 39 step 4 " + b"x" * 10
    assert messages(rotated)[-1] < messages(current)[0]  # .1 holds the lines just before


async def test_discard_drops_buffered_lines(instance_dir: Path) -> None:
    instance_logs = InstanceLogs()
    instance_logs.write(instance_dir, "never written")
    instance_logs.discard(instance_dir)
    instance_logs.discard(instance_dir)  # nothing buffered: fine too
    await instance_logs.flush()
    assert not (instance_dir / LOG_FILE).exists()


async def test_missing_dir_is_not_recreated(tmp_path: Path, instance_dir: Path) -> None:
    gone = tmp_path / "instances" / "deleted"
    instance_logs = InstanceLogs()
    instance_logs.write(gone, "late line for a deleted instance")
    instance_logs.write(instance_dir, "still here")
    await instance_logs.flush()
    assert not gone.exists()
    assert messages(instance_dir / LOG_FILE) == [b"still here"]


async def test_no_descriptor_stays_open_between_flushes(tmp_path: Path) -> None:
    dirs = [tmp_path / f"i{n:03d}" for n in range(500)]
    for path in dirs:
        path.mkdir()
    instance_logs = InstanceLogs()
    baseline = open_fds()
    for round_ in range(3):
        for path in dirs:
            instance_logs.write(path, f"round {round_}")
        await instance_logs.flush()
        assert open_fds() == baseline
    assert all(messages(path / LOG_FILE) == [b"round 0", b"round 1", b"round 2"] for path in dirs)


async def test_follow_once_returns_current_content(instance_dir: Path) -> None:
    instance_logs = InstanceLogs()
    instance_logs.write(instance_dir, "buffered, not yet flushed")
    chunks = [chunk async for chunk in instance_logs.follow(instance_dir, follow=False)]
    assert LINE_RE.match(b"".join(chunks).rstrip(b"\n")).group(1) == b"buffered, not yet flushed"  # type: ignore[union-attr]


async def test_follow_yields_appended_content_and_ends_with_the_dir(
    instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_POLL_SECONDS", 0.01)
    instance_logs = InstanceLogs(max_bytes=300)
    instance_logs.write(instance_dir, "existing")
    await instance_logs.flush()
    received: list[bytes] = []

    async def follower() -> None:
        async for chunk in instance_logs.follow(instance_dir, follow=True):
            received.append(chunk)

    async def wait_for(text: bytes) -> None:
        while text not in b"".join(received):
            await trio.sleep(0.01)

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower)
            await wait_for(b"existing")
            # Enough lines, flushed one by one, to rotate launcher.log several times under the follower.
            for i in range(20):
                instance_logs.write(instance_dir, f"appended {i:02d}")
                await instance_logs.flush()
                if i % 3 == 0:
                    await wait_for(f"appended {i:02d}".encode())
            await wait_for(b"appended 19")
            shutil.rmtree(instance_dir)
            # The follower returns by itself once the dir is gone: the nursery closes without a cancel.

    lines = [LINE_RE.match(line).group(1) for line in b"".join(received).splitlines()]  # type: ignore[union-attr]
    assert lines == [b"existing"] + [f"appended {i:02d}".encode() for i in range(20)]
