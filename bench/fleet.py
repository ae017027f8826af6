"""A fleet on NATS JetStream: placements per second through auctions, and event end-to-end latency, across real
launchers, with one launcher killed and the NATS server restarted during the run.

    .venv/bin/python bench/fleet.py [--launchers 4] [--starts 10000] [--concurrency 64] [--paced-rate 100]
                                    [--paced-s 10] [--no-faults] [--json]

One nats-server (JetStream) and `--launchers` real `launcher serve` processes (simulation, memory mode), each
admitting `--per-node` instances, so that the fleet is nearly full at the end. The reference controller
(`launcher.cli.fleet_client.FleetClient`, `--concurrency` placements at a time) places `--starts` STARTs: an
auction (bids for 100 ms or until every node with a key has bid), the START sent to the best bidder with its bid
(answered once accepted, not waited for), the other bids released. A follower of the events stream times each
event from its `time` (the launcher's clock, when it was journaled) to its arrival.

Faults, during the placements: at a third of them the first launcher is killed (SIGKILL) and started again 3 s
later; at two thirds the NATS server is killed and started again 2 s later (same store). A placement that fails
meanwhile is tried again with the same START (idempotent: a START accepted whose answer was lost is not doubled),
and one that finds no bidder (NATS back before the launchers) up to NO_BID_TRIES times. Event latency percentiles
leave out events journaled from 1 s before a fault to 10 s after it (the backlog those leave is what the no-gap rule
is about, not latency). Those placements, `--concurrency` at a time, keep the machine saturated: their event latency
is mostly queueing. So a paced phase follows: STARTs placed at `--paced-rate` a second for `--paced-s` seconds (an
open loop), whose events are timed apart (`event_latency_paced_*`).

The CPU each process used during the placements is divided by the placements (`cpu_ms_per_placement`: the
launchers together, the server, this process).

After the run, each node's journal (`GET /v1/events`) is compared with its events in the stream: `events_missing`
(journal events not in the stream), `events_duplicated` (stream messages whose id came before), and
`overcommitted_nodes` (nodes with more instances than they admit, or more promised than their capacity).

Prints the figures; with --json the last line is one JSON object with `launchers`, `placed`, `placements_per_s`,
`overcommitted_nodes`, `events_missing`, `events_duplicated`, `event_latency_p50_ms`, `event_latency_p99_ms` (the
saturated placements, outside the faults), `event_latency_paced_p50_ms`, `event_latency_paced_p99_ms`, and more.
Not a test: the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuid_module
from pathlib import Path

import yaml
from bench_launcher import ROOT, percentile, work_dir
from fleet_support import NatsServer  # tests/fleet_support.py (bench_launcher put tests/ on sys.path)

from launcher.cli.client import Client
from launcher.cli.fleet_client import FleetClient, NoBid

CLUSTER = "bench"
NO_BID_TRIES = 10  # placements of a START that found no bidder, 0.5 s apart, before it counts as refused
FAULT_MARGIN_S = (1.0, 10.0)  # event latencies left out around a fault: from 1 s before to 10 s after


class Launcher:
    """One `launcher serve` of the fleet, in its own work dir; `start` again after `kill` is a restart."""

    def __init__(self, work: Path, name: str, server: NatsServer, per_node: int) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir()
        self.data_dir = self.dir / "data"
        self.config = self.dir / "launcher.yaml"
        self.config.write_text(yaml.safe_dump({
            "listen": "127.0.0.1:0", "virtualizer": "simulation",
            "admission": {"max_instances": per_node, "vcpu_overcommit": 100000.0, "memory_overcommit": 1000.0},
            "fleet": {"servers": [server.url], "cluster": CLUSTER, "node": name, "refresh_s": 1,
                      "liveness_ttl_s": 4}}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(mode=0o711, exist_ok=True)
        (self.data_dir / "api-url").unlink(missing_ok=True)
        with open(self.dir / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "serve", "--config", str(self.config),
                                          "--data-dir", str(self.data_dir)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (self.data_dir / "api-url").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start:\n{(self.dir / 'serve.log').read_text()}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def client(self) -> Client:
        return Client.discover(None, self.data_dir)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process `pid` has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server: NatsServer, launchers: list[Launcher]) -> dict[str, float]:
    """CPU seconds so far of the launchers (together), the server, and this process (the controller and the
    follower)."""
    return {"launchers": sum(cpu_s(launcher.proc.pid) for launcher in launchers if launcher.proc),
            "nats_server": cpu_s(server.proc.pid) if server.proc else 0.0, "controller": cpu_s(os.getpid())}


def start_json(uuid: str) -> bytes:
    return json.dumps({"start": {"instance_uuid": uuid, "image_uuid": "img",
                                 "requirements": {"vcpus": 1, "mem_mb": 64}}}).encode()


async def place_all(server: NatsServer, launchers: list[Launcher], starts: int, concurrency: int,
                    faults: list[tuple[str, float]], with_faults: bool) -> tuple[int, int, float, dict[str, float]]:
    """Place `starts` STARTs, `concurrency` at a time, with the faults (noted in `faults`) unless not
    `with_faults`; (placed, no bid, seconds, CPU seconds used meanwhile as in `cpu_snapshot`)."""
    fleet = await FleetClient.connect([server.url], CLUSTER, reconnect_attempts=-1)
    await fleet.prepare()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(starts):
        queue.put_nowait(n)
    placed = refused = 0
    fault_at = {starts // 3: "launcher", 2 * starts // 3: "nats"} if with_faults else {}
    fault_tasks: list[asyncio.Task[None]] = []

    async def fault(kind: str) -> None:
        faults.append((kind, time.time()))
        if kind == "launcher":
            await asyncio.to_thread(launchers[0].kill)
            await asyncio.sleep(3)
            await asyncio.to_thread(launchers[0].start)
        else:
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(2)
            await asyncio.to_thread(server.start)

    async def worker() -> None:
        nonlocal placed, refused
        while not queue.empty():
            n = queue.get_nowait()
            if n in fault_at:
                fault_tasks.append(asyncio.create_task(fault(fault_at.pop(n))))
            expected, start, no_bids = len(launchers), start_json(str(uuid_module.uuid4())), 0
            for _ in range(100):  # a placement that fails in a fault is tried again: the same START (idempotent)
                try:
                    answer = (await fleet.place(start, expected=expected)).answer
                    if "error" in answer:
                        raise RuntimeError(answer)
                    placed += 1
                    break
                except NoBid:
                    no_bids += 1
                    if no_bids == NO_BID_TRIES:  # not a fault's moment (NATS back before the launchers): full
                        refused += 1
                        break
                    await asyncio.sleep(0.5)
                except Exception:  # noqa: BLE001 - NATS away, a node killed: try again
                    expected = 0
                    await asyncio.sleep(0.2)

    started, cpu_before = time.perf_counter(), cpu_snapshot(server, launchers)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    cpu = {name: used - cpu_before[name] for name, used in cpu_snapshot(server, launchers).items()}
    await asyncio.gather(*fault_tasks)  # a restart still under way when the placements ended
    await fleet.close()
    return placed, refused, seconds, cpu


async def place_paced(server: NatsServer, launchers: int, rate: float, seconds: float) -> tuple[int, float, float]:
    """Place STARTs at `rate` a second for `seconds`, each in a task of its own started on time whatever the
    others do (an open loop, unlike `place_all`); (placed, wall time of the first, of the end)."""
    fleet = await FleetClient.connect([server.url], CLUSTER, reconnect_attempts=-1)
    placed = 0

    async def one() -> None:
        nonlocal placed
        try:
            answer = (await fleet.place(start_json(str(uuid_module.uuid4())), expected=launchers)).answer
        except NoBid:
            return
        placed += "error" not in answer

    tasks = []
    began = time.time()
    for n in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, began + n / rate - time.time()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    ended = time.time()
    await fleet.close()
    return placed, began, ended


async def follow_events(server: NatsServer, latencies: list[tuple[float, float]]) -> None:
    """(journaled at, latency s) of each event that reaches the stream, the first time it arrives; until
    cancelled. After NATS is restarted, it follows again from the stream seq after the last one it had."""
    seen: set[tuple[str, int]] = set()
    next_seq = 1
    while True:
        try:
            fleet = await FleetClient.connect([server.url], CLUSTER, reconnect_attempts=-1)
            async for node, stream_seq, event in fleet.events(from_seq=next_seq, follow=True):
                next_seq = stream_seq + 1
                if (node, event["seq"]) in seen:
                    continue
                seen.add((node, event["seq"]))
                at = datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
                latencies.append((at, time.time() - at))
        except Exception:  # noqa: BLE001 - NATS restarted: follow again
            await asyncio.sleep(0.5)


def check_stream(server: NatsServer, launchers: list[Launcher]) -> tuple[int, int]:
    """(events missing from the stream, duplicated in it), over every node."""
    async def read() -> dict[str, list[str]]:
        fleet = await FleetClient.connect([server.url], CLUSTER, reconnect_attempts=-1)
        ids: dict[str, list[str]] = {launcher.name: [] for launcher in launchers}
        sub = await fleet.js.subscribe(f"launcher.{CLUSTER}.node.*.events", ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:  # noqa: BLE001 - nothing more
                break
            ids[msg.subject.split(".")[3]].append((msg.headers or {}).get("Nats-Msg-Id", ""))
        await fleet.close()
        return ids

    ids = asyncio.run(read())
    missing = duplicated = 0
    for launcher in launchers:
        lines = b"".join(launcher.client().stream("/v1/events", read_timeout=30)).splitlines()
        journal = {f"{launcher.name}:{json.loads(line)['seq']}" for line in lines if line}
        stored = ids[launcher.name]
        missing += len(journal - set(stored))
        duplicated += len(stored) - len(set(stored))
    return missing, duplicated


def overcommitted(launchers: list[Launcher], per_node: int) -> int:
    count = 0
    for launcher in launchers:
        node = launcher.client().request("GET", "/v1/node")
        allocated, capacity = node["allocated"], node["capacity"]
        if node["instances"] > per_node or any(allocated[k] > capacity[k] for k in ("vcpus", "mem_mb", "disk_mb")):
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launchers", type=int, default=4)
    parser.add_argument("--starts", type=int, default=10000)
    parser.add_argument("--per-node", type=int, default=0, help="instances each node admits (default: a fleet "
                                                                  "4 %% larger than --starts)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-faults", action="store_true", help="no launcher killed, no NATS restart (to compare)")
    parser.add_argument("--paced-rate", type=float, default=100.0, help="placements a second of the paced phase "
                                                                        "(after the others; 0: none)")
    parser.add_argument("--paced-s", type=float, default=10.0, help="how long the paced phase lasts")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    paced = round(args.paced_rate * args.paced_s)
    per_node = args.per_node or -(-(args.starts * 104 // 100 + paced) // args.launchers)

    work = work_dir("fleet-")
    server = NatsServer(work / "nats")
    server.start()
    launchers = [Launcher(work, f"n{i}", server, per_node) for i in range(args.launchers)]
    faults: list[tuple[str, float]] = []
    latencies: list[tuple[float, float]] = []
    try:
        for launcher in launchers:
            launcher.start()

        async def run() -> tuple[int, int, float, dict[str, float], tuple[int, float, float]]:
            follower = asyncio.create_task(follow_events(server, latencies))
            try:
                placements = await place_all(server, launchers, args.starts, args.concurrency, faults,
                                             with_faults=not args.no_faults)
                await asyncio.sleep(3)  # the backlog of the saturated phase is gone
                window = await place_paced(server, args.launchers, args.paced_rate, args.paced_s) if paced else \
                    (0, time.time(), time.time())
                return (*placements, window)
            finally:
                await asyncio.sleep(3)  # the last events reach the follower
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

        placed, refused, seconds, cpu, (paced_placed, paced_from, paced_to) = asyncio.run(run())
        missing, duplicated = check_stream(server, launchers)
        over = overcommitted(launchers, per_node)
    finally:
        for launcher in launchers:
            launcher.kill()
        server.kill()
        shutil.rmtree(work, ignore_errors=True)

    calm = [latency for at, latency in latencies if at < paced_from
            and not any(t - FAULT_MARGIN_S[0] <= at <= t + FAULT_MARGIN_S[1] for _, t in faults)]
    paced_latencies = [latency for at, latency in latencies if paced_from <= at <= paced_to]
    figures = {
        "launchers": args.launchers, "starts": args.starts, "per_node": per_node, "placed": placed,
        "no_bid": refused, "placement_s": round(seconds, 2), "placements_per_s": round(placed / seconds, 1),
        "overcommitted_nodes": over, "events_missing": missing, "events_duplicated": duplicated,
        "events_timed": len(calm), "event_latency_p50_ms": round(percentile(calm, 0.5) * 1000, 2),
        "event_latency_p99_ms": round(percentile(calm, 0.99) * 1000, 2),
        "faults": [kind for kind, _ in faults],
        "cpu_ms_per_placement": {name: round(used * 1000 / max(placed, 1), 3) for name, used in cpu.items()},
        "paced_rate": args.paced_rate if paced else 0, "paced_placed": paced_placed,
        "event_latency_paced_p50_ms": round(percentile(paced_latencies, 0.5) * 1000, 2) if paced_latencies else None,
        "event_latency_paced_p99_ms": round(percentile(paced_latencies, 0.99) * 1000, 2) if paced_latencies else None,
    }
    print(f"fleet: {args.launchers} launchers (simulation) admitting {per_node} each, one nats-server; "
          f"{args.starts} STARTs, {args.concurrency} at a time; faults: {', '.join(figures['faults'])}")
    print(f"  placed {placed} ({refused} found no bidder) in {seconds:.1f} s: {figures['placements_per_s']} "
          "placements/s")
    print(f"  event latency (journal → controller, {len(calm)} events outside the faults): "
          f"p50 {figures['event_latency_p50_ms']} ms, p99 {figures['event_latency_p99_ms']} ms")
    if paced:
        print(f"  paced phase, {args.paced_rate:g} placements/s for {args.paced_s:g} s ({paced_placed} placed): event "
              f"latency p50 {figures['event_latency_paced_p50_ms']} ms, p99 {figures['event_latency_paced_p99_ms']} ms "
              f"({len(paced_latencies)} events)")
    print(f"  events missing {missing}, duplicated {duplicated}; overcommitted nodes {over}")
    print("  CPU per placement: " + ", ".join(f"{name} {ms} ms" for name, ms in figures["cpu_ms_per_placement"].items())
          + (" (a killed launcher's CPU is not counted)" if faults else ""))
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
