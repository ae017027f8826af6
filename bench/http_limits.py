"""What idle connections and readers that never read cost a real `launcher serve` (simulation, memory mode).

    .venv/bin/python bench/http_limits.py [--idle 2000] [--stalled 200] [--journal-events 200000]

1. Opens `--idle` connections that send nothing, then times GET /v1/instances on a new connection and checks
   that every idle connection is still open.
2. With a journal of `--journal-events` events (~250 bytes each) written before the launcher starts, opens
   `--stalled` followers of GET /v1/events?since=0&follow=1 that never read, and samples the launcher's RSS
   for 10 s (a reader that does not read holds at most one chunk in the launcher; the rest is socket buffers,
   which are the kernel's). The launcher's `http.send_timeout_s` is 5 s here, so they are dropped meanwhile.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import LauncherProcess  # noqa: E402
from http_faults import address, head, is_open  # noqa: E402
from test_http_robustness import seed_journal  # noqa: E402


def rss_mib(launcher: LauncherProcess) -> float:
    assert launcher.proc is not None
    return psutil.Process(launcher.proc.pid).memory_info().rss / 2**20


def established(launcher: LauncherProcess) -> int:
    """The launcher's established TCP connections."""
    assert launcher.proc is not None
    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(launcher.proc.pid).net_connections("tcp"))


def timed_call(launcher: LauncherProcess) -> float:
    started = time.perf_counter()
    launcher.client().request("GET", "/v1/instances")
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--journal-events", type=int, default=200_000)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="launcher-http-limits-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        size = seed_journal(data_dir, args.journal_events)
        launcher = LauncherProcess(data_dir, {"http": {"send_timeout_s": 5.0}})
        launcher.start()
        try:
            print(f"launcher RSS at start: {rss_mib(launcher):.1f} MiB; journal {size / 2**20:.0f} MiB")
            idle = [socket.create_connection(address(launcher)) for _ in range(args.idle)]
            time.sleep(1)
            print(f"{args.idle} idle connections: GET /v1/instances took {timed_call(launcher):.1f} ms; "
                  f"{sum(is_open(s) for s in idle)} still open; launcher RSS {rss_mib(launcher):.1f} MiB")
            for sock in idle:
                sock.close()
            time.sleep(1)
            base = rss_mib(launcher)
            stalled = []
            for _ in range(args.stalled):
                sock = socket.create_connection(address(launcher))
                sock.sendall(head(launcher, "GET", "/v1/events?since=0&follow=1"))
                stalled.append(sock)
            peak = base
            for second in range(10):
                time.sleep(1)
                peak = max(peak, rss_mib(launcher))
                print(f"  t={second + 1:2d} s: RSS {rss_mib(launcher):.1f} MiB, GET /v1/instances "
                      f"{timed_call(launcher):.1f} ms, launcher's open connections {established(launcher)}")
            print(f"{args.stalled} followers that never read (journal {size / 2**20:.0f} MiB each to send): RSS "
                  f"{base:.1f} MiB before, peak {peak:.1f} MiB (+{peak - base:.1f} MiB)")
        finally:
            launcher.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
