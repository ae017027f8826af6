"""Group commit of instance directories and records: many actors' writes made durable together.

Writing one instance.json crash-safely costs several fsyncs (file, rename, directory); at hundreds of STARTs
a second that serialises on the disk. The `Persister` takes every operation queued since its last round and,
in one worker-thread call: writes each new file as a temp file (and makes new dirs, or renames doomed dirs
aside), calls `syncfs` once, renames the temp files over their targets, and calls `syncfs` again. Each
caller's `await` returns once its own operation is durable, or raises its own error (e.g. FileExistsError).

What a crash can leave: a dir holding only `.instance.json.tmp` (a START that was never acknowledged, which
recovery discards) and `.deleting-<uuid>` dirs (which recovery finishes removing).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from launcher import store

MAX_BATCH = 512


@attrs.define(eq=False)
class _Op:
    kind: str  # "create" (new dir + file), "write" (replace a file) or "remove" (a whole dir)
    path: Path  # the file for create/write, the dir for remove
    data: bytes = b""
    done: trio.Event = attrs.Factory(trio.Event)
    error: OSError | None = None

    @property
    def tmp(self) -> Path:
        return store.tmp_path(self.path)


class Persister:
    def __init__(self, root: Path, limiter: trio.CapacityLimiter) -> None:
        self.root = root  # any path on the file system that holds the instance dirs
        self.limiter = limiter
        self._send, self._recv = trio.open_memory_channel[_Op](math.inf)

    async def create(self, path: Path, data: bytes) -> None:
        """Make `path`'s directory (which must not exist: FileExistsError) and write `path` in it."""
        await self._submit(_Op("create", path, data))

    async def write(self, path: Path, data: bytes) -> None:
        """Replace `path` with `data`: a crash leaves the old or the new content."""
        await self._submit(_Op("write", path, data))

    async def remove(self, directory: Path) -> None:
        """Remove a directory tree; once this returns, a crash cannot bring it back."""
        await self._submit(_Op("remove", directory))

    async def _submit(self, op: _Op) -> None:
        self._send.send_nowait(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            batch = [await self._recv.receive()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            # Not abandoned on cancel: a round is short, and its callers must learn how it ended.
            await trio.to_thread.run_sync(self._commit, batch, limiter=self.limiter)
            for op in batch:
                op.done.set()

    def _commit(self, batch: list[_Op]) -> None:
        for op in batch:
            _guard(op, _stage, op)
        try:
            syncfs(self.root)
            for op in batch:
                if op.error is None and op.kind != "remove":
                    _guard(op, os.replace, op.tmp, op.path)
            syncfs(self.root)
        except OSError as exc:
            for op in batch:
                op.error = op.error or exc
        for op in batch:
            if op.kind == "remove" and op.error is None:
                shutil.rmtree(store.doomed_path(op.path), ignore_errors=True)


def _stage(op: _Op) -> None:
    """First half of an operation, before the first sync."""
    if op.kind == "remove":
        if op.path.exists():
            os.replace(op.path, store.doomed_path(op.path))
        return
    if op.kind == "create":
        op.path.parent.mkdir(mode=0o755)
    with open(op.tmp, "wb") as f:
        f.write(op.data)


def _guard(op: _Op, fn: Callable[..., object], *args: object) -> None:
    """Run one step of `op`, recording its failure on the op rather than failing the whole batch."""
    try:
        fn(*args)
    except OSError as exc:
        op.error = exc


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
