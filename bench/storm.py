"""Storm benchmark: START 10 000 memory-mode instances over HTTP, then STOP and DELETE them.

Runs a real `launcher serve` process (simulation virtualizer, memory mode) on a free port and drives it with
a concurrent keep-alive HTTP/1.1 client written on Trio. Prints, per phase: requests/s accepted, p50/p99
request latency and the time until every instance reached the phase's state; launcher RSS per idle
instance; the time of one GET /v1/stats with every instance present; and, between STOP and DELETE, how long
SIGTERM takes to end the launcher and how long a new one takes to recover every instance.

    .venv/bin/python bench/storm.py [--instances 10000] [--connections 32]

Targets on a 2-core machine: ≥ 500 STARTs/s accepted, ≤ 50 KiB RSS per idle instance, /v1/stats < 250 ms.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio
import yaml

ROOT = Path(__file__).resolve().parent.parent


class Connection:
    """One keep-alive HTTP/1.1 connection; answers must carry Content-Length (the launcher's do)."""

    def __init__(self, stream: trio.SocketStream, host: str, token: str) -> None:
        self.stream = stream
        self.head = f"Host: {host}\r\nAuthorization: Bearer {token}\r\n"
        self.buffer = b""

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self._receive()
        header, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length"))
        while len(self.buffer) < length:
            self.buffer += await self._receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, body

    async def _receive(self) -> bytes:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the launcher closed the connection")
        return data


def start_payload(uuid: str, as_json: bool = False) -> bytes:
    """A ciao START: the YAML text controllers send, or the same as JSON."""
    if as_json:
        return json.dumps({"start": {
            "instance_uuid": uuid, "tenant_uuid": "67d86208-000-4465-9018-fe14087d415f", "image_uuid": "bench-image",
            "fw_type": "legacy", "requested_resources": [{"type": "vcpus", "value": 1, "mandatory": True},
                                                        {"type": "mem_mb", "value": 16, "mandatory": True}]}}).encode()
    return (f"start:\n  instance_uuid: {uuid}\n  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f\n"
            f"  image_uuid: bench-image\n  fw_type: legacy\n  requested_resources:\n"
            f"    - type: vcpus\n      value: 1\n      mandatory: true\n"
            f"    - type: mem_mb\n      value: 16\n      mandatory: true\n").encode()


async def run_phase(name: str, host: str, port: int, token: str, connections: int,
                    requests: list[tuple[str, str, bytes, str]]) -> list[float]:
    """Send every request over `connections` parallel keep-alive connections; return the latencies."""
    latencies: list[float] = []
    failures: dict[int, int] = {}
    work = iter(requests)

    async def worker() -> None:
        stream = await trio.open_tcp_stream(host, port)
        conn = Connection(stream, f"{host}:{port}", token)
        async with stream:
            for method, path, body, content_type in work:
                started = time.perf_counter()
                status, _ = await conn.request(method, path, body, content_type)
                latencies.append(time.perf_counter() - started)
                if status >= 300:
                    failures[status] = failures.get(status, 0) + 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{name}: unexpected answers {failures}")
    lat = sorted(latencies)
    print(f"{name:<7} {len(lat):>6} requests in {elapsed:6.2f} s = {len(lat) / elapsed:7.0f} req/s accepted   "
          f"latency p50 {statistics.median(lat) * 1000:6.2f} ms  p99 {lat[int(len(lat) * 0.99) - 1] * 1000:7.2f} ms")
    return lat


async def wait_for(conn: Connection, predicate: Any, timeout: float = 600.0) -> float:
    """Poll GET /v1/node until predicate(node) holds; return how long it took."""
    started = time.perf_counter()
    with trio.fail_after(timeout):
        while True:
            _, body = await conn.request("GET", "/v1/node")
            if predicate(json.loads(body)):
                return time.perf_counter() - started
            await trio.sleep(0.2)


async def serve(config: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    """Start `launcher serve` and return once it is listening."""
    (data_dir / "api-url").unlink(missing_ok=True)
    log = open(data_dir.parent / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(config),
                             "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    while not (data_dir / "api-url").exists():
        if proc.poll() is not None:
            raise SystemExit((data_dir.parent / "serve.log").read_text())
        await trio.sleep(0.05)
    return proc


def endpoint(data_dir: Path) -> tuple[str, str, str]:
    host, port = (data_dir / "api-url").read_text().removeprefix("http://").rsplit(":", 1)
    return host, port, (data_dir / "api-token").read_text().strip()


async def storm(args: argparse.Namespace, data_dir: Path) -> None:
    config = data_dir.parent / "storm.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0",
        "virtualizer": "simulation",
        "simulation": {"mode": "memory", "boot_delay_s": 0.05},
        "admission": {"max_instances": args.instances + 10, "vcpu_overcommit": 100000.0,
                      "memory_overcommit": 1000.0, "keep_free_memory_mb": 0},
        "log_max_bytes": 65536,
    }))
    proc = await serve(config, data_dir)
    try:
        host, port, token = endpoint(data_dir)
        probe_stream = await trio.open_tcp_stream(host, int(port))
        probe = Connection(probe_stream, f"{host}:{port}", token)
        launcher = psutil.Process(proc.pid)
        await trio.sleep(1.0)
        rss_empty = launcher.memory_info().rss

        uuids = [f"5a7e0000-0000-4000-8000-{n:012x}" for n in range(args.instances)]
        n, c = args.instances, args.connections
        content_type = "application/json" if args.json else "application/yaml"
        print(f"storm: {n} instances, {c} connections, {content_type} STARTs, launcher pid {proc.pid}")

        await run_phase("START", host, int(port), token, c,
                        [("POST", "/v1/instances", start_payload(u, args.json), content_type) for u in uuids])
        took = await wait_for(probe, lambda node: node["instance_states"].get("running", 0) == n)
        print(f"        all {n} running {took:.2f} s after the last START was accepted")

        await trio.sleep(args.settle)  # let the first stats polls and the log flushes finish
        rss_full = launcher.memory_info().rss
        print(f"RSS     {rss_empty / 2**20:.1f} MiB empty, {rss_full / 2**20:.1f} MiB with {n} idle instances: "
              f"{(rss_full - rss_empty) / n / 1024:.1f} KiB per instance")
        times = []
        size = 0
        for _ in range(5):
            started = time.perf_counter()
            _, body = await probe.request("GET", "/v1/stats")
            times.append(time.perf_counter() - started)
            size = len(body)
            await trio.sleep(0.5)
        print(f"/v1/stats with {n} instances: median {statistics.median(times) * 1000:.1f} ms "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}), {size / 2**20:.1f} MiB")

        await run_phase("STOP", host, int(port), token, c,
                        [("POST", f"/v1/instances/{u}/stop", b"", "") for u in uuids])
        took = await wait_for(probe, lambda node: node["instance_states"].get("exited", 0) == n)
        print(f"        all {n} exited {took:.2f} s after the last STOP was accepted")

        await probe_stream.aclose()
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        print(f"SIGTERM with {n} instances: the launcher exited in {time.perf_counter() - started:.2f} s "
              f"(status {proc.returncode})")
        started = time.perf_counter()
        proc = await serve(config, data_dir)
        host, port, token = endpoint(data_dir)
        probe_stream = await trio.open_tcp_stream(host, int(port))
        probe = Connection(probe_stream, f"{host}:{port}", token)
        await wait_for(probe, lambda node: node["instance_states"].get("exited", 0) == n)
        print(f"restart: {n} instances recovered {time.perf_counter() - started:.2f} s after the new launcher started")

        await run_phase("DELETE", host, int(port), token, c,
                        [("DELETE", f"/v1/instances/{u}", b"", "") for u in uuids])
        took = await wait_for(probe, lambda node: node["instances"] == 0)
        print(f"        all {n} deleted {took:.2f} s after the last DELETE was accepted")
        await probe_stream.aclose()
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="send STARTs as JSON instead of ciao YAML")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds idle before measuring RSS")
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        trio.run(storm, args, data_dir)


if __name__ == "__main__":
    main()
