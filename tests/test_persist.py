"""The instance-file persister: group commit through a write-ahead log, and its replay after a crash."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from launcher.durable.persist import ROOM_MARGIN_BYTES, WAL_FILE, Persister


async def run_persister(data_dir: Path, nursery: trio.Nursery, **kw: int) -> Persister:
    persister = Persister(data_dir, trio.CapacityLimiter(4), **kw)
    await nursery.start(persister.run)
    return persister


async def test_create_write_remove(tmp_path: Path) -> None:
    acknowledged = []
    async with trio.open_nursery() as nursery:
        p = await run_persister(tmp_path, nursery)
        target = tmp_path / "instances" / "ab" / "instance.json"
        (tmp_path / "instances").mkdir()
        await p.create(target, b"one", on_durable=lambda: acknowledged.append(target.exists() or "logged"))
        assert target.read_bytes() == b"one" and acknowledged
        with pytest.raises(FileExistsError):
            await p.create(target, b"again")
        await p.write(target, b"two")
        assert target.read_bytes() == b"two"
        await p.remove(target.parent)
        assert not target.parent.exists()
        nursery.cancel_scope.cancel()


async def test_many_concurrent_writes_share_one_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round logs every operation queued since the last one with one fdatasync of the log (module doc).
    The 200 writers run in one scheduling batch, before the persister's first round: one round, one fdatasync
    (none would mean the writes are not durable), and nothing but the log is synced."""
    synced: list[Path] = []  # the file each fdatasync was for
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))), real(fd)))
    (tmp_path / "instances").mkdir()
    async with trio.open_nursery() as nursery:
        p = await run_persister(tmp_path, nursery)
        async with trio.open_nursery() as writers:
            for n in range(200):
                writers.start_soon(p.create, tmp_path / "instances" / f"{n:04x}" / "instance.json", b"{}")
        nursery.cancel_scope.cancel()
    assert len(list((tmp_path / "instances").iterdir())) == 200
    assert synced == [tmp_path / WAL_FILE]


async def test_replay_after_a_crash_restores_every_acknowledged_write(tmp_path: Path) -> None:
    """Simulate a crash that lost the applied (not fsynced) changes: only the log survived."""
    instances = tmp_path / "instances"
    (instances / "cc").mkdir(parents=True)
    (instances / "cc" / "instance.json").write_text("stale")
    (instances / "dd").mkdir()
    log = [
        {"write": "instances/aa/instance.json", "data": "A"},  # its dir was lost
        {"write": "instances/bb/instance.json", "data": "B1"},
        {"write": "instances/bb/instance.json", "data": "B2"},  # the later write wins
        {"write": "instances/cc/instance.json", "data": "C"},  # torn or stale on disk
        {"remove": "instances/dd"},  # deleted, but the removal was lost
    ]
    wal = tmp_path / WAL_FILE
    wal.write_text("".join(json.dumps(r) + "\n" for r in log) + '{"write": "instances/ee/inst')  # torn tail
    async with trio.open_nursery() as nursery:
        await run_persister(tmp_path, nursery)
        nursery.cancel_scope.cancel()
    assert (instances / "aa" / "instance.json").read_text() == "A"
    assert (instances / "bb" / "instance.json").read_text() == "B2"
    assert (instances / "cc" / "instance.json").read_text() == "C"
    assert not (instances / "dd").exists() and not (instances / "ee").exists()
    assert wal.read_bytes() == b""  # checkpointed


async def test_log_outside_the_data_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / WAL_FILE).write_text(json.dumps({"write": "../escape", "data": "x"}) + "\n")
    async with trio.open_nursery() as nursery:
        await run_persister(tmp_path, nursery)
        nursery.cancel_scope.cancel()
    assert not (tmp_path.parent / "escape").exists()


async def test_checkpoint_while_running_empties_the_log(tmp_path: Path) -> None:
    (tmp_path / "instances").mkdir()
    async with trio.open_nursery() as nursery:
        p = await run_persister(tmp_path, nursery, checkpoint_bytes=2000)
        for n in range(40):
            await p.create(tmp_path / "instances" / f"{n:04x}" / "instance.json", b"x" * 100)
        nursery.cancel_scope.cancel()
    assert (tmp_path / WAL_FILE).stat().st_size < 2000 + 200
    assert len(list((tmp_path / "instances").iterdir())) == 40


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (the persister's data dir), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_creates_and_writes_need_room_to_be_applied_and_undone_removals_do_not(small_tmpfs: Path) -> None:
    """With less free space than a create needs applied and undone (+ ROOM_MARGIN_BYTES), it fails with ENOSPC
    before anything is logged or made, though its log line alone would fit in the log's last page; a write
    likewise; a removal is logged and done all the same (it is how room is made). With room, a create works."""
    instances = small_tmpfs / "instances"
    instances.mkdir()
    async with trio.open_nursery() as nursery:
        p = await run_persister(small_tmpfs, nursery)
        kept = instances / "aa" / "instance.json"
        await p.create(kept, b"kept")
        filler = small_tmpfs / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - ROOM_MARGIN_BYTES // 2))
        wal_before = (small_tmpfs / WAL_FILE).stat().st_size
        refused = instances / "bb" / "instance.json"
        with pytest.raises(OSError) as full:
            await p.create(refused, b"x" * 100)
        assert full.value.errno == errno.ENOSPC and "bytes free" in str(full.value)
        with pytest.raises(OSError) as full:
            await p.write(kept, b"changed")
        assert full.value.errno == errno.ENOSPC
        assert not refused.parent.exists() and kept.read_bytes() == b"kept"
        assert (small_tmpfs / WAL_FILE).stat().st_size == wal_before  # nothing logged
        await p.remove(kept.parent)  # no room asked: removing is how room is made
        assert not kept.parent.exists()
        filler.unlink()
        await p.create(refused, b"x" * 100)
        assert refused.read_bytes() == b"x" * 100
        nursery.cancel_scope.cancel()
