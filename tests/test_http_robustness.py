"""Client faults injected for real into a real `launcher serve`: whatever one client does, the launcher serves on.

Each test drives raw sockets (resets with SO_LINGER 0, half-closes, garbage, stalls, thousands of idle
connections) and then checks that the launcher process is alive and still answers (`assert_serving`)."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LauncherProcess
from http_faults import (
    assert_serving,
    connect,
    head,
    is_closed_by_peer,
    is_open,
    json_body,
    read_all,
    read_for,
    read_until,
    reset,
    status_of,
)

SHORT = {"idle_timeout_s": 1.0, "body_timeout_s": 1.0, "send_timeout_s": 1.0}
HANG_UUID = "5a5a0000-0000-4000-8000-000000000001"  # the simulation hangs in `ensure` for this one


def start_yaml(uuid: str) -> bytes:
    return f"start:\n  instance_uuid: {uuid}\n  image_uuid: test-image\n".encode()


# ----------------------------------------------------------------------------------------- resets


@pytest.mark.parametrize("target", ["/v1/events?since=0&follow=1", "/v1/stats?follow=1"])
def test_reset_of_an_events_follower_leaves_the_launcher_serving(launcher: LauncherProcess, target: str) -> None:
    for _ in range(5):
        sock = connect(launcher)
        sock.sendall(head(launcher, "GET", target))
        assert status_of(read_until(sock, b"\r\n\r\n")) == 200
        reset(sock)
    assert_serving(launcher)


def test_reset_of_a_log_follower_leaves_the_launcher_serving(launcher: LauncherProcess) -> None:
    uuid = "1b000000-0000-4000-8000-000000000001"
    launcher.client().request("POST", "/v1/instances", start_yaml(uuid), "application/yaml", wait=True)
    for _ in range(5):
        sock = connect(launcher)
        sock.sendall(head(launcher, "GET", f"/v1/instances/{uuid}/log?follow=1"))
        assert status_of(read_until(sock, b"\r\n\r\n")) == 200
        reset(sock)
    assert_serving(launcher)


@pytest.mark.parametrize("sent", [
    b"GET /v1/insta",  # in the request line
    b"POST /v1/instances HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nstart:\n  instance_",  # in the body
], ids=["head", "body"])
def test_reset_in_the_middle_of_a_request(launcher: LauncherProcess, sent: bytes) -> None:
    for _ in range(5):
        sock = connect(launcher)
        sock.sendall(sent)
        time.sleep(0.05)
        reset(sock)
    assert_serving(launcher)


def test_reset_while_a_command_is_waited_for(launcher_factory: Any) -> None:
    launcher = launcher_factory({"simulation": {"failures": [{"phase": "ensure", "match": "^5a5a", "action": "hang"}]}})
    body = start_yaml(HANG_UUID)
    sock = connect(launcher)
    sock.sendall(head(launcher, "POST", "/v1/instances?wait=1&timeout=1",
                      f"Content-Type: application/yaml\r\nContent-Length: {len(body)}\r\n") + body)
    time.sleep(0.3)
    reset(sock)  # the launcher's answer, one second later, meets a reset connection
    time.sleep(1.5)
    assert_serving(launcher)


# ----------------------------------------------------------------------------------------- half-closed sockets


def test_a_request_then_a_half_close_is_answered(launcher: LauncherProcess) -> None:
    sock = connect(launcher)
    sock.sendall(head(launcher, "GET", "/v1/instances"))
    sock.shutdown(socket.SHUT_WR)
    answer = read_all(sock)
    assert status_of(answer) == 200 and json_body(answer) == {"instances": []}
    assert_serving(launcher)


def test_a_half_close_in_the_middle_of_a_head_is_answered_400(launcher: LauncherProcess) -> None:
    sock = connect(launcher)
    sock.sendall(b"GET /v1/instances HTTP/1.1\r\nHost: x\r\n")
    sock.shutdown(socket.SHUT_WR)
    answer = read_all(sock)
    assert status_of(answer) == 400 and json_body(answer)["error"] == "invalid_payload"
    assert_serving(launcher)


# ----------------------------------------------------------------------------------------- malformed requests


MALFORMED = {
    "garbage": (b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n", 400),
    "bad header line": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
    "header name with a space": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
    "no Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "oversize head": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
    "bad chunk size": (b"POST /v1/instances HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nab\r\n", 400),
    "chunk longer than its size": (b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\nabcdef\r\n0\r\n\r\n", 400),
    "Content-Length not a number": (b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
    "two Content-Lengths": (b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                            b"\r\nab", 400),
    "Content-Length over max_payload_bytes": (b"POST /v1/commands HTTP/1.1\r\nHost: x\r\n"
                                              b"Content-Length: 999999999\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_is_answered_with_a_code_and_the_connection_closed(
        launcher: LauncherProcess, name: str) -> None:
    sent, status = MALFORMED[name]
    sock = connect(launcher)
    sock.sendall(sent)
    answer = read_all(sock)  # the launcher answers, then closes
    assert status_of(answer) == status, answer[:300]
    assert json_body(answer)["error"] == "invalid_payload"
    assert "malformed HTTP request" in str(json_body(answer)["reason"]) or "larger than the limit" in str(
        json_body(answer)["reason"])
    assert_serving(launcher)


def test_a_body_shorter_than_its_content_length_is_answered_408_after_body_timeout(launcher_factory: Any) -> None:
    launcher = launcher_factory({"http": SHORT})
    sock = connect(launcher)
    sock.sendall(b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nstop:")
    answer = read_all(sock)
    assert status_of(answer) == 408 and json_body(answer)["error"] == "request_timeout"
    assert_serving(launcher)


def test_a_body_cut_short_by_a_half_close_is_answered_400(launcher: LauncherProcess) -> None:
    sock = connect(launcher)
    sock.sendall(b"POST /v1/commands HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nstop:")
    sock.shutdown(socket.SHUT_WR)
    answer = read_all(sock)
    assert status_of(answer) == 400 and json_body(answer)["error"] == "invalid_payload"
    assert_serving(launcher)


def test_bytes_beyond_the_content_length_are_the_next_request(launcher: LauncherProcess) -> None:
    body = b'{"stop": {"instance_uuid": "ab"}}'
    sock = connect(launcher)
    sock.sendall(head(launcher, "POST", "/v1/commands", f"Content-Type: application/json\r\nContent-Length: "
                                                        f"{len(body)}\r\n") + body + b"trailing garbage\r\n\r\n")
    answers = read_all(sock)
    assert answers.count(b"HTTP/1.1 ") == 2
    assert b'"error":"no_instance"' in answers and b'"error":"invalid_payload"' in answers
    assert_serving(launcher)


# ----------------------------------------------------------------------------------------- idle and slow clients


def test_an_idle_connection_is_closed_after_idle_timeout(launcher_factory: Any) -> None:
    launcher = launcher_factory({"http": SHORT})
    idle, slowloris = connect(launcher), connect(launcher)
    slowloris.sendall(b"GET /heal")  # a head that never completes
    assert read_all(idle) == b"" and read_all(slowloris) == b""
    assert_serving(launcher)


def seed_journal(data_dir: Path, events: int, pad: int = 200) -> int:
    """Write an event journal of `events` events before the launcher starts; its size in bytes."""
    with open(data_dir / "events.jsonl", "w") as journal:
        for seq in range(1, events + 1):
            journal.write(json.dumps({"seq": seq, "time": "2026-01-01T00:00:00.000000Z", "type": "test",
                                      "pad": "x" * pad}, separators=(",", ":")) + "\n")
    return (data_dir / "events.jsonl").stat().st_size


def test_a_follower_that_does_not_read_is_dropped_and_blocks_nobody(launcher_factory: Any, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    size = seed_journal(tmp_path / "data", 100_000)  # ~25 MB: more than any socket buffers
    launcher = launcher_factory({"http": SHORT})
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.settimeout(30)
    stalled.connect(connect(launcher).getpeername())
    stalled.sendall(head(launcher, "GET", "/v1/events?since=0&follow=1"))
    time.sleep(0.5)
    assert_serving(launcher)  # while it stalls, others are answered
    reader = launcher.client().stream("/v1/events", since=99_990)
    seqs = [json.loads(line)["seq"] for line in b"".join(reader).splitlines()]
    assert seqs[:10] == list(range(99_991, 100_001))
    time.sleep(3)  # beyond send_timeout_s
    received, closed = read_for(stalled, 20)  # what the socket buffers held, then the end: the launcher gave up
    assert closed and 0 < len(received) < size
    assert_serving(launcher)


# ----------------------------------------------------------------------------------------- many connections


def test_at_max_connections_the_longest_idle_connection_makes_room(launcher_factory: Any) -> None:
    launcher = launcher_factory({"http": {"max_connections": 20}})
    idle = []
    for _ in range(20):
        idle.append(connect(launcher))
        time.sleep(0.01)  # so that they are idle in this order
    time.sleep(0.3)
    assert_serving(launcher)  # the new connection is served ...
    assert is_closed_by_peer(idle[0])  # ... in place of the longest idle one
    assert is_open(idle[-1])


def test_at_max_connections_with_none_idle_a_new_one_is_answered_503(launcher_factory: Any) -> None:
    launcher = launcher_factory({"http": {"max_connections": 3}})
    followers = []
    for _ in range(3):
        sock = connect(launcher)
        sock.sendall(head(launcher, "GET", "/v1/events?since=0&follow=1"))
        assert status_of(read_until(sock, b"\r\n\r\n")) == 200
        followers.append(sock)
    answer = read_all(connect(launcher))
    assert status_of(answer) == 503 and json_body(answer)["error"] == "too_many_connections"
    followers.pop().close()
    time.sleep(0.3)
    assert_serving(launcher)


@pytest.fixture
def open_file_soft_limit_1024() -> Iterator[None]:
    """Children started meanwhile inherit a soft limit of 1024 open files (a distribution's default); this
    process gets its hard limit back for the test's own sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4000:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for 2000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_two_thousand_idle_connections_stay_open_and_the_api_answers(
        launcher_factory: Any, open_file_soft_limit_1024: None) -> None:
    launcher = launcher_factory()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = [connect(launcher) for _ in range(2000)]
    try:
        assert_serving(launcher)
        assert sum(is_open(sock) for sock in idle) == 2000
    finally:
        for sock in idle:
            sock.close()


def test_head_is_answered_with_the_head_of_get(launcher: LauncherProcess) -> None:
    """Found by the fuzzer: a HEAD got no answer at all (h11 refused the body of the 404 it was given)."""
    for target, status in (("/healthz", 200), ("/v1/instances", 200), ("/v1/events", 200), ("/nowhere", 404)):
        sock = connect(launcher)
        sock.sendall(head(launcher, "HEAD", target, "Connection: close\r\n"))
        answer = read_all(sock)
        assert status_of(answer) == status, answer
        assert answer.endswith(b"\r\n\r\n")  # a head, no body
    assert "Traceback" not in launcher.output()
    assert_serving(launcher)
