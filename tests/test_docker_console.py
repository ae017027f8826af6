"""The docker virtualizer's console log: the engine's multiplexed stream taken apart, and console.log rotated as
virtlogd rotates a VM's (real files)."""

from __future__ import annotations

import struct
from pathlib import Path

from virtualizers.docker.console import ConsoleFile, Demux
from virtualizers.docker.userdata import UserDataError, read_user_data


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(data)) + data


def test_demux_takes_frames_apart_whatever_the_chunks() -> None:
    stream = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"more")
    for size in (1, 3, 7, len(stream)):
        demux = Demux()
        got = b"".join(demux.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        assert got == b"out\nerr\nmore"


def test_the_console_log_rotates_past_its_bound(tmp_path: Path) -> None:
    console = ConsoleFile(tmp_path / "console.log", max_bytes=10, backups=2)
    for text in (b"aaaaaa", b"bbbbbb", b"cccccc", b"dddddd"):
        console.append(text)
    assert (tmp_path / "console.log").read_bytes() == b"dddddd"
    assert (tmp_path / "console.log.1").read_bytes() == b"cccccc"
    assert (tmp_path / "console.log.2").read_bytes() == b"bbbbbb"
    assert not (tmp_path / "console.log.3").exists()
    assert (tmp_path / "console.log").stat().st_mode & 0o777 == 0o600


def test_runcmd_rules() -> None:
    assert read_user_data("").command is None
    assert read_user_data("#cloud-config\nruncmd:\n - [sleep, '5']\n").command == ("sleep", "5")
    several = read_user_data("#cloud-config\nruncmd:\n - echo a b\n - [touch, 'x y']\n").command
    assert several == ("sh", "-c", "echo a b\ntouch 'x y'")
    parsed = read_user_data("#cloud-config\npackages: [vim]\nusers: []\nruncmd: [date]\n")
    assert parsed.ignored == ("packages", "users")
    for bad, message in (("runcmd: 3", "user-data.runcmd: must be a non-empty list"),
                         ("runcmd: [{}]", "user-data.runcmd[0]: must be a command"),
                         ("write_files: [{path: /a, append: true}]", "user-data.write_files[0].append"),
                         ("write_files: [{path: /a, permissions: '999'}]", "user-data.write_files[0].permissions"),
                         ("write_files: [{path: /a, owner: 'www-data'}]", "user-data.write_files[0].owner"),
                         ("[1, 2]", "user-data: must be a cloud-config mapping")):
        try:
            read_user_data(bad)
        except UserDataError as exc:
            assert str(exc).startswith(message), exc
        else:
            raise AssertionError(f"{bad!r} was accepted")
