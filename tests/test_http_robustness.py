"""Client faults injected for real into a real `launcher serve`: whatever one client does, the launcher serves on.

Each test drives a raw socket (resets with SO_LINGER 0, half-closes, garbage, stalls) and then checks that the
launcher process is alive and still answers."""

from __future__ import annotations

import socket

from conftest import LauncherProcess
from http_faults import assert_serving, connect, head, read_until, reset, status_of


def test_reset_of_an_events_follower_leaves_the_launcher_serving(launcher: LauncherProcess) -> None:
    for _ in range(5):
        sock = connect(launcher)
        sock.sendall(head(launcher, "GET", "/v1/events?since=0&follow=1"))
        assert status_of(read_until(sock, b"\r\n\r\n")) == 200
        reset(sock)
    assert_serving(launcher)
