"""The event journal's files on disk: their names, appending to them, rotating them, recovering them at start-up
and reading events back from them (docs/architecture.md §4.5).

On disk the journal is ``events.jsonl`` plus up to ``keep_files`` rotated files ``events.jsonl.1`` (newest) ..
``events.jsonl.N`` (oldest); each holds a contiguous run of seqs, one compact JSON object per line, each line
ending in a newline. A file is named here by ``k``: 0 is ``events.jsonl``, k >= 1 the k-th newest rotated file;
a reader names a file by the first seq it holds instead, which survives rotation.

Contract: every function here blocks on the file system; :class:`~launcher.durable.events.EventJournal` calls
them in a worker thread, one at a time for writing, and serializes rotation against reading. What they promise:

- :func:`append_batch` leaves either the whole batch on disk and fsync'd, or (raising OSError) the file cut back
  to its size before the call;
- :func:`rotate_files` changes nothing when it fails before the renames (it makes the new file first);
- :func:`recover` repairs what a crash can leave (a torn last line, a half-done rotation, a hole in the numbers)
  so that the files again hold gap-free, contiguous seqs;
- readers (:func:`read_events`, :func:`recover`) skip a line that is not an event, with a warning, and it never
  hides the events after it; a last line without its newline is being appended and is not read.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from launcher.plugin.files import fsync_dir, make_dirs, write_all

log = logging.getLogger(__name__)

Event = dict[str, Any]

JOURNAL_FILE = "events.jsonl"
_FRESH_FILE = JOURNAL_FILE + ".fresh"  # the next events.jsonl, while a rotation makes it
# Bytes of journal a reader parses per worker-thread call when it catches up from disk. Each reader holds one
# such batch, parsed (about 4x its size), until its client has taken it: with 1 MiB, 200 readers that never read
# held 440 MiB (bench/http_limits.py); with 64 KiB, see docs/api.md, "HTTP robustness".
_READ_CHUNK_BYTES = 64 << 10
# Initial size of the window scanned backwards for the last complete line at start-up.
_TAIL_WINDOW_BYTES = 1 << 16


class Cursor(NamedTuple):
    """Where a reader catching up from disk stopped: the file (named by the first seq it holds, which survives
    rotation), the byte offset in it, and the seq expected next."""

    first_seq: int
    offset: int
    next_seq: int


def journal_path(directory: Path, k: int) -> Path:
    """Journal file k in ``directory``: 0 is events.jsonl, k >= 1 the k-th newest rotated file."""
    return directory / (JOURNAL_FILE if k == 0 else f"{JOURNAL_FILE}.{k}")


# -- writing ---------------------------------------------------------------------------------------------------------


def append_batch(fd: int, size: int, batch: list[Event]) -> list[int]:
    """Append and fsync the batch to the file of `size` bytes; the encoded size of each event. On OSError
    the file is cut back to `size` first (if even that fails, the next start-up cuts the torn tail)."""
    encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
    lines = [(encode(event) + "\n").encode() for event in batch]
    try:
        write_all(fd, b"".join(lines))
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    return [len(line) for line in lines]


def rotate_files(directory: Path, keep_files: int, fd: int) -> int:
    """events.jsonl.N-1 -> .N, ..., events.jsonl -> .1 (the oldest beyond keep_files is overwritten), then a
    fresh events.jsonl; closes `fd` and returns the new file's fd. The new file is made first (under a temp name),
    so that a failure (a full disk) changes nothing. Raises OSError."""
    fresh = directory / _FRESH_FILE
    new_fd = _open_append(fresh)
    for k in range(keep_files, 0, -1):
        if journal_path(directory, k - 1).exists():
            os.replace(journal_path(directory, k - 1), journal_path(directory, k))
    os.replace(fresh, journal_path(directory, 0))
    fsync_dir(directory)  # the renames and the new file's entry, before anything is written into it
    os.close(fd)
    return new_fd


# -- opening ---------------------------------------------------------------------------------------------------------


def recover(directory: Path, keep_files: int) -> tuple[int, int, list[int], int]:
    """Recover the journal in `directory` (made if missing): returns (append fd of events.jsonl, its size, first
    seq per file oldest first, last seq). The last entry of the seqs is events.jsonl's; for an empty file it is the
    seq the file will get next. Raises OSError."""
    make_dirs(directory)
    (directory / _FRESH_FILE).unlink(missing_ok=True)  # a rotation that did not finish
    rotated = _compact_rotated(directory, keep_files)
    current = journal_path(directory, 0)
    last_seq = _truncate_torn_tail(current) if current.exists() else None
    if last_seq is None:  # events.jsonl is empty (just rotated) or missing: the newest event is further back
        found = (_last_seq_in(journal_path(directory, k)) for k in range(1, rotated + 1))
        last_seq = next((seq for seq in found if seq is not None), 0)
    fd = _open_append(current)
    fsync_dir(directory)
    # Walk newest to oldest: an empty file "starts" where the file after it does.
    segments = [_first_seq_in(current) or last_seq + 1]
    for k in range(1, rotated + 1):
        segments.insert(0, _first_seq_in(journal_path(directory, k)) or segments[0])
    return fd, os.fstat(fd).st_size, segments, last_seq


def _compact_rotated(directory: Path, keep_files: int) -> int:
    """Renumber rotated files 1..n without holes (a crash mid-rotation can leave one), drop those beyond
    keep_files, and return how many are left."""
    prefix = JOURNAL_FILE + "."
    indices = sorted(
        int(p.name[len(prefix) :]) for p in directory.glob(prefix + "*") if p.name[len(prefix) :].isdigit()
    )
    for new, old in enumerate(indices, start=1):
        if new != old:
            os.replace(journal_path(directory, old), journal_path(directory, new))
    for k in range(keep_files + 1, len(indices) + 1):
        journal_path(directory, k).unlink()
    return min(len(indices), keep_files)


# -- reading ---------------------------------------------------------------------------------------------------------


def read_events(paths: list[Path], segments: list[int], cursor: Cursor, durable_seq: int) -> tuple[list[Event], Cursor]:
    """Read about _READ_CHUNK_BYTES worth of events from cursor on, never past durable_seq, across files
    (``paths`` and ``segments`` oldest first); returns them and where to go on. The caller keeps the files from
    being rotated meanwhile. Raises OSError if a file cannot be read."""
    index = bisect.bisect_right(segments, cursor.first_seq) - 1
    offset, next_seq = cursor.offset, cursor.next_seq
    events: list[Event] = []
    budget = _READ_CHUNK_BYTES
    while True:
        with open(paths[index], "rb") as file:
            file.seek(offset)
            for line in file:
                # A line without its newline is being appended right now; it cannot be durable yet.
                if not line.endswith(b"\n"):
                    break
                event = _event_of(line)
                if event is None:  # not an event: skipped, never a reason to stop
                    log.warning("event journal: %s, byte %d: skipped a line that is not an event", paths[index],
                                offset)
                    offset += len(line)
                    continue
                if event["seq"] > durable_seq:
                    break
                offset += len(line)
                if event["seq"] >= next_seq:
                    events.append(event)
                    next_seq = event["seq"] + 1
                    budget -= len(line)
                    if budget <= 0 or next_seq > durable_seq:
                        break
        if budget <= 0 or next_seq > durable_seq or index == len(paths) - 1:
            return events, Cursor(segments[index], offset, next_seq)
        index += 1
        offset = 0


# -- file helpers ----------------------------------------------------------------------------------------------------


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _event_of(line: bytes) -> Event | None:
    """The event on a journal line, or None if the line holds none (a JSON object with an integer seq)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or type(event.get("seq")) is not int:
        return None
    return event


def _seq_of(line: bytes) -> int | None:
    event = _event_of(line)
    return None if event is None else int(event["seq"])


def _first_seq_in(path: Path) -> int | None:
    """The seq of the first event in the file (lines that hold none are skipped)."""
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                return None
            seq = _seq_of(line)
            if seq is not None:
                return seq
    return None


def _last_line(file: BinaryIO, end: int) -> tuple[int, int | None]:
    """Scan backwards from ``end`` for the last complete line holding an event: (the offset just past it, its
    seq), or (0, None) if there is none."""
    window = _TAIL_WINDOW_BYTES
    while True:
        start = max(0, end - window)
        file.seek(start)
        data = file.read(end - start)
        stop = len(data)
        while (newline := data.rfind(b"\n", 0, stop)) >= 0:
            line_start = data.rfind(b"\n", 0, newline) + 1
            if line_start == 0 and start > 0:
                break  # the line may begin before the window
            seq = _seq_of(data[line_start:newline])
            if seq is not None:
                return start + newline + 1, seq
            stop = line_start
        if start == 0:
            return 0, None
        window *= 4


def _last_seq_in(path: Path) -> int | None:
    with open(path, "rb") as file:
        return _last_line(file, file.seek(0, os.SEEK_END))[1]


def _truncate_torn_tail(path: Path) -> int | None:
    """Cut whatever follows the last complete event (a write torn by a crash) and return that event's seq."""
    with open(path, "r+b") as file:
        end = file.seek(0, os.SEEK_END)
        good_end, seq = _last_line(file, end)
        if good_end < end:
            file.truncate(good_end)
            os.fsync(file.fileno())
    return seq
