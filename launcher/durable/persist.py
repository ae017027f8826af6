"""Durable instance files at hundreds of writes a second: a write-ahead log with group commit.

Making one instance.json crash-safe on its own costs several fsyncs (file, rename, directory), each an ext4
journal commit of a millisecond or more, so a burst of STARTs would queue on the disk. Instead, each round of
the `Persister` takes every operation queued since the last round, appends one line per operation to
`<data_dir>/instances.wal` and calls `fdatasync` once. From then on the operation is durable: its caller's
`on_durable` is called (a START is acknowledged there). The operation is then applied to the instance dirs,
without fsync and several at once in worker threads (creating an inode takes about a millisecond on some
virtual disks, and those waits overlap), and the caller's `await` returns.

Files are written in place, not through a temp file: until the log has been replayed, nobody reads them, and
the replay rewrites any file a crash left torn. At start-up the log is replayed onto the instance dirs
(idempotent: write this content, remove this dir), the file system is flushed with `syncfs`, and the log is
emptied; while running, once the log passes `checkpoint_bytes`, everything logged has been applied, so a
`syncfs` and an empty log suffice. Either way, after a crash every acknowledged write is on disk before
anything reads the instance dirs.

An operation that fails after it was logged (e.g. ENOSPC) raises in its caller, which undoes it with another
logged operation (a failed START removes its dir), so a replay ends in the state the callers reported. So that
this is so even on a file system that fills up, a round's creates and writes are logged only while the file
system has room for them applied (each file and dir, at least a block each) and for their undo, plus
`ROOM_MARGIN_BYTES`: otherwise they fail with ENOSPC before anything is logged or made (one statvfs per round).
Removals are always logged: they are how room is made. Without that, an append
that fits in the log's last page could be acknowledged, its apply then fail, and its undo find no room to be
logged, leaving a refused START's dir behind, and its record in the log for the next replay.
Callers must not start two operations on one path at once (an actor awaits each of its own).

The log is self-delimiting and checked record by record: each line is ``<crc32, 8 hex digits> <JSON>\n``. An
append that fails (a full disk, a failed fdatasync) fails every operation of its round, and the log is cut back
to its length before the round, so no fragment is left for the next round's records to be glued onto (should
even the cut fail, the next round starts with a newline, which ends the fragment). A replay applies every good
record and skips a bad one (torn, wrong checksum, not a record, or one that cannot be applied) without losing
those after it; each skipped record is logged and passed to `on_dropped`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from launcher.durable import datadir
from launcher.plugin import files

if TYPE_CHECKING:
    import outcome

log = logging.getLogger(__name__)

WAL_FILE = "instances.wal"
ROOM_MARGIN_BYTES = 256 << 10  # free space a round must leave on the data dir's file system (module doc)
BLOCK_BYTES = 4096  # what a new file or dir takes at least
MAX_BATCH = 1024
APPLY_THREADS = 4  # own limit, so slow applies never keep a log round (the acknowledgements) waiting


@attrs.define(eq=False)
class _Op:
    kind: str  # "create" (new dir + file), "write" (replace a file) or "remove" (a whole dir)
    path: Path  # the file for create/write, the dir for remove
    data: bytes = b""
    on_durable: Callable[[], None] | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    error: OSError | None = None


class Persister:
    """The instance files of `data_dir`, written through the write-ahead log `instances.wal` (module doc).

    Start :meth:`run` in a nursery (``await nursery.start(persister.run)``) before any write: it replays the log,
    then serves rounds until cancelled. :meth:`create`, :meth:`write` and :meth:`remove` return once their
    operation is durable and applied; they raise OSError if it could not be done, after which the caller undoes
    it with another operation. Two operations on one path must not run at once.
    """

    def __init__(self, data_dir: Path, limiter: trio.CapacityLimiter, *, checkpoint_bytes: int = 16 << 20,
                 on_dropped: Callable[[str], object] | None = None) -> None:
        """Worker threads for the log go through `limiter`; the log is emptied once it passes `checkpoint_bytes`.
        `on_dropped(detail)` hears of each log record the start-up replay had to skip."""
        self.data_dir = data_dir
        self.limiter = limiter
        self.checkpoint_bytes = checkpoint_bytes
        self._on_dropped = on_dropped
        self._wal = -1  # fd of the log, O_APPEND
        self._wal_bytes = 0
        self._fragment = False  # a failed append may have left a partial line that could not be cut off
        self._send, self._recv = trio.open_memory_channel[_Op](math.inf)
        self._apply_limiter = trio.CapacityLimiter(APPLY_THREADS)
        self._applying = 0  # logged operations not yet applied
        self._all_applied = trio.Event()

    async def create(self, path: Path, data: bytes, *, on_durable: Callable[[], None] | None = None) -> None:
        """Make `path`'s directory (which must not exist: FileExistsError) and write `path` in it."""
        await self._submit(_Op("create", path, data, on_durable))

    async def write(self, path: Path, data: bytes) -> None:
        """Replace `path` with `data`."""
        await self._submit(_Op("write", path, data))

    async def remove(self, directory: Path, *, on_durable: Callable[[], None] | None = None) -> None:
        """Remove a directory tree."""
        await self._submit(_Op("remove", directory, on_durable=on_durable))

    async def _submit(self, op: _Op) -> None:
        self._send.send_nowait(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replay what an earlier run logged, then serve rounds until cancelled."""
        dropped = await trio.to_thread.run_sync(self._open, limiter=self.limiter)
        for detail in dropped:
            log.error("instance log replay: skipped %s", detail)
            if self._on_dropped is not None:
                self._on_dropped(detail)
        try:
            async with trio.open_nursery() as applying:
                task_status.started()
                while True:
                    batch = [await self._recv.receive()]
                    while len(batch) < MAX_BATCH:
                        try:
                            batch.append(self._recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    await self._log(batch)
                    logged = []
                    for op in batch:
                        if op.error is not None:
                            op.done.set()
                            continue
                        if op.on_durable is not None:
                            op.on_durable()
                        logged.append(op)
                    # One thread call per chunk, not per op: a thread hand-off costs the event loop too.
                    for n in range(min(APPLY_THREADS, len(logged))):
                        chunk = logged[n::APPLY_THREADS]
                        self._applying += len(chunk)
                        applying.start_soon(self._apply, chunk)
                    if self._wal_bytes > self.checkpoint_bytes:
                        await self._checkpoint_when_applied()
        finally:
            os.close(self._wal)

    async def _log(self, batch: list[_Op]) -> None:
        """Append the operations to the log and make them durable (or fail them all).

        The append is a few KiB into the page cache, so it is done right here; only fdatasync goes to a
        thread: each return from a thread has to win the GIL back from the busy event loop."""
        batch = self._refuse_without_room(batch)
        if not batch:
            return
        data = b"".join(_record(self.data_dir, op) for op in batch)
        if self._fragment:
            data = b"\n" + data
        before = self._wal_bytes
        try:
            files.write_all(self._wal, data)
            self._wal_bytes += len(data)
            self._fragment = False
            await _in_thread(os.fdatasync, self._wal)
        except OSError as exc:
            log.error("instance log: cannot append to %s: %s", WAL_FILE, exc)
            self._cut_back(before)
            for op in batch:
                op.error = exc

    def _refuse_without_room(self, batch: list[_Op]) -> list[_Op]:
        """Fail the round's creates and writes with ENOSPC if the file system has no room for them (module doc);
        the operations left to log. Removals are always tried: they are how room is made."""
        adding = [op for op in batch if op.kind != "remove"]
        if not adding:
            return batch
        problem = _no_room(self.data_dir, adding)
        if problem is None:
            return batch
        log.error("instance log: %s", problem.strerror)
        for op in adding:
            op.error = problem
        return [op for op in batch if op.kind == "remove"]

    def _cut_back(self, length: int) -> None:
        """Cut the log back to `length` after a failed append (a quick metadata change, done right here)."""
        self._wal_bytes = length
        try:
            os.ftruncate(self._wal, length)
        except OSError as exc:
            log.error("instance log: cannot cut %s back after a failed append: %s", WAL_FILE, exc)
            self._fragment = True

    async def _apply(self, chunk: list[_Op]) -> None:
        try:
            await trio.to_thread.run_sync(_apply_all, chunk, limiter=self._apply_limiter)
        finally:
            for op in chunk:
                op.done.set()
            self._applying -= len(chunk)
            if self._applying == 0:
                self._all_applied.set()
                self._all_applied = trio.Event()

    async def _checkpoint_when_applied(self) -> None:
        """Once the log is long and every logged operation is on the file system: flush, empty the log."""
        while self._applying:
            await self._all_applied.wait()
        await trio.to_thread.run_sync(self._flush_and_truncate, limiter=self.limiter)

    # ----------------------------------------------------------------- worker-thread side

    def _open(self) -> list[str]:
        """Replay what an earlier run logged (it may not all be on the file system), then empty the log.
        Returns what the replay skipped."""
        path = self.data_dir / WAL_FILE
        self._wal = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        dropped = replay_log(self.data_dir, path.read_bytes())
        self._flush_and_truncate()
        return dropped

    def _flush_and_truncate(self) -> None:
        syncfs(self.data_dir)
        os.ftruncate(self._wal, 0)
        os.fsync(self._wal)
        self._wal_bytes = 0


def _no_room(data_dir: Path, ops: list[_Op]) -> OSError | None:
    """OSError(ENOSPC) if the data dir's file system lacks room for `ops`: their log lines (twice: with the
    undo's), the files applied (each rounded up to blocks, plus a block for its dir), and `ROOM_MARGIN_BYTES`;
    else None. One statvfs."""
    need = ROOM_MARGIN_BYTES + sum(3 * (len(op.data) + 512) + 2 * BLOCK_BYTES for op in ops)
    st = os.statvfs(data_dir)
    free = st.f_bavail * st.f_frsize
    if free >= need:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free in {data_dir}, "
                                 f"{len(ops)} writes need {need})")


async def _in_thread(fn: Callable[[int], None], fd: int) -> None:
    """fn(fd) in a worker thread, for the log's fdatasync.

    Not trio.to_thread.run_sync: taking a limiter token first is a checkpoint, so the thread would start only
    on the event loop's next pass, and every acknowledgement of the round waits for it. There is never more
    than one of these threads (rounds do not overlap), so the shared limiter has nothing to bound. Like
    to_thread.run_sync without abandon_on_cancel, it is not abandoned on cancel: a round is short, and its
    callers must learn how it ended."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: outcome.Outcome[None]) -> None:  # in the worker thread
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(lambda: fn(fd), deliver, name="launcher wal fdatasync")
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


def _apply_all(chunk: list[_Op]) -> None:
    for op in chunk:
        try:
            _apply(op)
        except OSError as exc:
            op.error = exc


def _apply(op: _Op) -> None:
    """Carry out one operation on the file system, without fsync (blocking)."""
    if op.kind == "remove":
        doomed = datadir.doomed_path(op.path)
        if op.path.exists():
            os.replace(op.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif op.kind == "create":
        op.path.parent.mkdir(mode=files.INSTANCE_DIR_MODE)
        _write(op.path, op.data, os.O_EXCL)
    else:
        _write(op.path, op.data)


def _record(data_dir: Path, op: _Op) -> bytes:
    """One log line: `<crc32 of the JSON, 8 hex digits> <JSON>\n`."""
    where = _relative(data_dir, op.path)
    body = {"remove": where} if op.kind == "remove" else {"write": where, "data": op.data.decode()}
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(encoded), encoded)


def replay_log(data_dir: Path, log_bytes: bytes) -> list[str]:
    """Redo every good record of a log onto `data_dir` (blocking); a description of each record skipped.

    Records are independent (write this file, remove this dir), so a bad one is skipped and the replay goes
    on. A last line without its newline is a torn append, whose round was never acknowledged."""
    dropped = []
    lines = log_bytes.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        torn = number == len(lines)
        try:
            _replay(data_dir, _parse_record(line))
        except (ValueError, OSError) as exc:
            dropped.append(f"record {number} of {WAL_FILE}" + (" (torn, never acknowledged)" if torn else "")
                           + f": {exc}")
    return dropped


def _parse_record(line: bytes) -> dict[str, str]:
    """The operation of one log line; ValueError if the line is not a whole, intact record.

    A line that starts with `{` was written by a launcher before checksums (replayed once after an upgrade)."""
    if line.startswith(b"{"):
        encoded = line
    else:
        checksum, _, encoded = line.partition(b" ")
        if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(encoded):
            raise ValueError("bad checksum")
    record = json.loads(encoded)
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise ValueError("not a log record")
    if set(record) not in ({"remove"}, {"write", "data"}):
        raise ValueError(f"not a log record: keys {sorted(record)}")
    return record


def _relative(data_dir: Path, path: Path) -> str:
    """str(path.relative_to(data_dir)) for a path under data_dir, by string: relative_to costs ~4 us."""
    prefix, text = f"{data_dir}{os.sep}", str(path)
    if not text.startswith(prefix):
        raise ValueError(f"{path} is not under {data_dir}")
    return text[len(prefix) :]


def _replay(data_dir: Path, record: dict[str, str]) -> None:
    """Redo one logged operation; doing it again when it already happened changes nothing."""
    relative = record.get("write") or record.get("remove")
    if not relative or ".." in Path(relative).parts or Path(relative).is_absolute():
        raise ValueError(f"not a path inside the data dir: {relative!r}")
    path = data_dir / relative
    if "remove" in record:
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.parent.mkdir(mode=files.INSTANCE_DIR_MODE, parents=True, exist_ok=True)
        _write(path, record["data"].encode())


def _write(path: Path, data: bytes, flags: int = 0) -> None:
    """Write `path` in place; no fsync.

    An existing file is overwritten from offset 0 and then cut to length, not opened with O_TRUNC: on ext4,
    closing a file that was truncated to zero and written again starts its writeback right away (auto_da_alloc),
    which made the second write of every START cost ~0.1-0.5 ms instead of ~20 us. Torn content is no concern
    here: until the log has been replayed nobody reads these files, and the replay rewrites them."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, files.INSTANCE_FILE_MODE)
    try:
        files.write_all(fd, data)
        if not flags & os.O_EXCL:  # a file just created is empty: nothing to cut
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush everything written to the file system that holds `path` (Linux syncfs(2)), blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)
